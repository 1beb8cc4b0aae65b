"""Tokenizers: one interface (`Tokenizer`) over SentencePiece, llama2.c tokenizer.bin, Hugging Face
tokenizer.json, GPT-2 vocab/merges, GGUF-embedded vocabularies, trained byte-level BPE and characters.

    tok = load_tokenizer("checkpoints/run1")        # or a .model / .bin / .gguf / tokenizer.json
    ids = tok.encode("Once upon a time", bos=tok.add_bos)
    text = tok.decode(ids)
"""

from lmlab.tokenization.base import SIDECAR, StreamDecoder, Tokenizer, decode_continuation
from lmlab.tokenization.char import CharTokenizer
from lmlab.tokenization.gguf_vocab import read_gguf_metadata, tokenizer_from_gguf
from lmlab.tokenization.hf import HFTokenizer, from_gpt2_files, from_tokenizer_json, train_bpe
from lmlab.tokenization.llama2c import Llama2cTokenizer
from lmlab.tokenization.loader import load_tokenizer, train_tokenizer
from lmlab.tokenization.spm import SentencePieceTokenizer

__all__ = [
    "SIDECAR", "CharTokenizer", "HFTokenizer", "Llama2cTokenizer", "SentencePieceTokenizer", "StreamDecoder",
    "Tokenizer", "decode_continuation", "from_gpt2_files", "from_tokenizer_json", "load_tokenizer",
    "read_gguf_metadata", "tokenizer_from_gguf", "train_bpe", "train_tokenizer",
]
