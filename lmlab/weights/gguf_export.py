"""Writing GGUF files (llama.cpp, Ollama) with the `gguf` package's GGUFWriter.

The inverse of lmlab/weights/gguf.py, in llama.cpp's own conventions (its convert_hf_to_gguf.py):
- architectures `llama` (interleaved q/k rows, as lmlab keeps them), `qwen2` and `gemma3` (q/k rows,
  biases and q/k norm channels in Hugging Face's rotate-half layout, which llama.cpp runs as NEOX RoPE);
  the family comes from lmlab.weights.hf.hf_family, so a config with no llama.cpp equivalent is refused;
- norms and biases stay F32; matrices are f32, f16, bf16, q8_0 or q4_0, quantized by `gguf.quants`.
  A matrix whose rows are not whole 32-blocks falls back to f16. With q4_0 the token embedding that
  doubles as the output head (and an untied output head) is q8_0: llama.cpp's own Q4_0 files keep the
  output at Q6_K, which the gguf package cannot write;
- Gemma's (1 + w) norm weights are stored as lmlab holds them (GGUF holds 1 + w too), its local/global
  layers as `attention.sliding_window_pattern` (one bool per layer) and `rope.freq_base_swa`;
- the tokenizer goes into `tokenizer.ggml.*`: SentencePiece as `llama` (pieces, scores, types, read
  from the model proto so user-defined pieces keep their type), byte-level BPE as `gpt2` (tokens,
  merges, types, and the `tokenizer.ggml.pre` name whose split llama.cpp reproduces), plus the special
  ids, add_bos and the chat template. The vocabulary is padded with `[PADn]` to the embedding's rows.
A model must come with its LoRA adapters merged (`lmlab convert --adapter` merges them before the export).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn as nn

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import unwrap
from lmlab.tokenization.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer
from lmlab.tokenization.hf import HFTokenizer
from lmlab.tokenization.spm import CONTROL, NORMAL, UNUSED, USER_DEFINED, SentencePieceTokenizer
from lmlab.weights.build import to_rotate_half
from lmlab.weights.checkpoint import model_state
from lmlab.weights.gguf import LAYER_NAMES, ROTATE_HALF_ARCHS, TOP_NAMES
from lmlab.weights.hf import hf_family

Q = gguf.GGMLQuantizationType
GGUF_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}  # hf_family -> GGUF architecture
# a text whose pre-tokenization tells llama.cpp's split rules apart (digits, contractions, scripts, spaces)
PRE_PROBE = ("Hello world! I've 12345 apples, 3.14 pies and 1,000,000 dreams;\n\n\t  indented  "
             "'RE you SURE? We'Ve  CAN'T   x\r\n ünïcödé 我想在apple工作1314151天 нещо 🦙🦙  ...!!!?? ```")


def _layer_names() -> dict[str, str]:
    """lmlab parameter (without its suffix) -> GGUF tensor base name, both levels."""
    names = {lm: f"blk.{{i}}.{g}" for g, lm in LAYER_NAMES.items()}
    return names | {lm: g for g, lm in TOP_NAMES.items()}


def gguf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight` (the inverse of gguf.lmlab_name)."""
    base, _, suffix = name.rpartition(".")
    names = _layer_names()
    if base in names:
        return f"{names[base]}.{suffix}"
    parts = base.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in names:
        return f"{names[parts[2]].format(i=parts[1])}.{suffix}"
    raise ConfigError(f"parameter {name!r} has no GGUF tensor name")


def _tensor_type(name: str, tensor: torch.Tensor, kind: str, c: ModelConfig) -> Q:
    if tensor.dim() == 1:
        return Q.F32
    want = GGUF_TYPES[kind]
    head = name == "output.weight" or (name == "tok_embeddings.weight" and c.tie_embeddings)
    if kind == "q4_0" and head:
        want = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[want][0]
    return want if tensor.shape[-1] % block == 0 else Q.F16


def _encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    data = tensor.detach().float().cpu().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def gguf_tensors(model: nn.Module, kind: str) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF name -> (data, type) for every parameter, q/k re-laid out for the rotate-half archs."""
    c = model.config
    arch = ARCHS[hf_family(c)]
    out = {}
    for name, tensor in model_state(model).items():
        if arch in ROTATE_HALF_ARCHS:
            if name.endswith(("wq.weight", "wq.bias")):
                tensor = to_rotate_half(tensor, c.n_heads)
            elif name.endswith(("wk.weight", "wk.bias")):
                tensor = to_rotate_half(tensor, c.n_kv_heads)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                tensor = to_rotate_half(tensor, 1)
        qtype = _tensor_type(name, tensor, kind, c)
        out[gguf_name(name)] = (_encode(tensor, qtype), qtype)
    return out


def _model_metadata(w: gguf.GGUFWriter, c: ModelConfig, arch: str) -> None:
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if c.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    if arch == "gemma3" and c.window is not None:
        w.add_sliding_window(c.window)
        w.add_sliding_window_pattern([c.is_local(i) or not c.global_every for i in range(c.n_layers)])
        w.add_rope_freq_base_swa(c.rope_local_theta)


def _is_byte_level(tok: HFTokenizer) -> bool:
    spec = json.loads(tok.tok.to_str())
    return spec["model"]["type"] == "BPE" and "ByteLevel" in json.dumps(spec.get("decoder"))


def pre_tokenizer_name(tok: HFTokenizer) -> str:
    """The `tokenizer.ggml.pre` whose split rules give this tokenizer's pre-tokenization of PRE_PROBE."""
    own = tok.tok.pre_tokenizer
    if own is None:
        raise ConfigError(f"{tok.kind} tokenizer has no pre-tokenizer; llama.cpp's 'gpt2' vocabularies need one")
    want = [piece for piece, _ in own.pre_tokenize_str(PRE_PROBE)]
    for name in dict.fromkeys(PRE_TOKENIZERS.values()):  # one name per distinct rule set
        first = next(n for n, v in PRE_TOKENIZERS.items() if v == name)
        if [piece for piece, _ in pre_tokenizer(first, "")[0].pre_tokenize_str(PRE_PROBE)] == want:
            return first
    raise ConfigError(f"the tokenizer's pre-tokenizer matches none of llama.cpp's known ones {sorted(PRE_TOKENIZERS)}")


def _byte_level_vocab(tok: HFTokenizer) -> tuple[list[str], list[int], list[str]]:
    spec = json.loads(tok.tok.to_str())
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(max(vocab.values()) + 1)]
    types = [UNUSED] * len(tokens)
    for text, i in vocab.items():
        tokens[i], types[i] = text, NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def _tokenizer_metadata(w: gguf.GGUFWriter, tok: Any, n_vocab: int) -> None:
    if isinstance(tok, SentencePieceTokenizer):
        pieces, settings = tok.proto_pieces()
        tokens, scores, types = (list(x) for x in zip(*pieces))
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_add_space_prefix(bool(settings["add_dummy_prefix"]))
        w.add_unk_token_id(int(settings["unk_id"]))
    elif isinstance(tok, HFTokenizer) and _is_byte_level(tok):
        tokens, types, merges = _byte_level_vocab(tok)
        scores = None
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(tok))
        w.add_token_merges(merges)
    else:
        raise ConfigError(f"a {tok.kind} tokenizer cannot be written to GGUF (SentencePiece and byte-level BPE can); "
                          "convert without it or use a model with one of those")
    if len(tokens) > n_vocab:
        raise ConfigError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size={n_vocab}")
    pad = n_vocab - len(tokens)  # llama.cpp wants one token per embedding row
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [UNUSED] * pad
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores + [-1000.0] * pad)
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if getattr(tok, f"{name}_id") is not None:
            add(getattr(tok, f"{name}_id"))
    w.add_add_bos_token(bool(tok.add_bos))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def save_gguf(model: nn.Module, path: str | Path, tokenizer: Any = None, kind: str = "f16") -> Path:
    """Write `model` and its tokenizer as one GGUF file. LoRA adapters must be merged first
    (lmlab.adapters.lora.merge_and_unload): GGUF has no place for them."""
    if kind not in GGUF_TYPES:
        raise ConfigError(f"--type {kind!r}: expected one of {sorted(GGUF_TYPES)}")
    raw = unwrap(model)
    if any(".lora_" in name for name, _ in raw.named_parameters()):
        raise ConfigError("the model carries LoRA adapters: merge them first (lmlab convert --adapter DIR does)")
    c = raw.config
    family = hf_family(c)
    if family not in ARCHS:
        raise ConfigError(f"model {c.name!r} is a {family} model; GGUF export supports the {sorted(ARCHS)} families")
    arch = ARCHS[family]
    tensors = gguf_tensors(raw, kind)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(c.name)
        w.add_file_type(FILE_TYPES[kind])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _model_metadata(w, c, arch)
        if tokenizer is not None:
            _tokenizer_metadata(w, tokenizer, c.vocab_size)
        for name, (data, qtype) in tensors.items():
            w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(Path(path), write)
    return Path(path)


__all__ = ["GGUF_TYPES", "gguf_name", "gguf_tensors", "pre_tokenizer_name", "save_gguf"]
