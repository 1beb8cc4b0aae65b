"""Tokenizers: parity with the reference implementations on real text, save/load round trips,
streaming detokenization, errors and the CLI."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from lmlab.cli import main as cli_main
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.paths import smollm2_gguf
from lmlab.tokenization import (
    CharTokenizer,
    StreamDecoder,
    from_gpt2_files,
    load_tokenizer,
    read_gguf_metadata,
    tokenizer_from_gguf,
    train_bpe,
)
from lmlab.tokenization.llama2c import from_sentencepiece_pieces
from lmlab.tokenization.spm import SentencePieceTokenizer, sentencepiece_proto

TRICKY = [
    "Hello world", "12345", "I have 3 apples and 12345 pears, 3.14159!", "  multiple   spaces\n\nnew line",
    "héllo ünïcode 日本語 Ελληνικά русский", "emoji 😀👍🏽 🇫🇷", "def f(x):\n    return x**2  # sq\n\tindented",
    "don't I'll we're THEY'RE", "trailing space ", "\n\n\n", " leading", "",
]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"}]


# ---- fixtures: every tokenizer is loaded once per session


@pytest.fixture(scope="session")
def stories(shared_data: Path) -> str:
    return (shared_data / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tok512_sp(shared_data):
    return load_tokenizer(shared_data / "stories260K" / "tok512.model")


@pytest.fixture(scope="session")
def tok512_bin(shared_data):
    return load_tokenizer(shared_data / "stories260K" / "tok512.bin")


@pytest.fixture(scope="session")
def llama_sp(shared_data):
    return load_tokenizer(shared_data / "llama2-tokenizer" / "tokenizer.model")


@pytest.fixture(scope="session")
def llama_bin(shared_data):
    return load_tokenizer(shared_data / "llama2-tokenizer" / "tokenizer.bin")


@pytest.fixture(scope="session")
def gpt2(shared_data):
    return load_tokenizer(shared_data / "gpt2-tokenizer")


@pytest.fixture(scope="session")
def smollm():
    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="session")
def smollm_hf():
    """The reference: the tokenizer transformers builds from the same GGUF (about 5 s, offline)."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def char_tok(shared_data):
    return CharTokenizer.from_files([shared_data / "tinyshakespeare" / "input.txt"])


@pytest.fixture(scope="session")
def bpe512(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe512")
    return train_bpe([shared_data / "tinystories" / "tinystories_val.txt"], 512, out)


# ---- SentencePiece and llama2.c


def test_sentencepiece_special_ids_and_roundtrip(tok512_sp, llama_sp):
    for tok, size in ((tok512_sp, 512), (llama_sp, 32000)):
        assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("sentencepiece", size, 1, 2, None)
        ids = tok.encode("Once upon a time", bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == "Once upon a time"
        assert tok.stop_ids == {2}
    assert llama_sp.encode("Hello world") == [15043, 3186]  # Llama 2's well-known ids


def test_llama2c_encode_equals_sentencepiece_tok512(tok512_sp, tok512_bin, stories):
    """run.c's encoder reproduces SentencePiece on every TinyStories line. tok512 was trained with
    SentencePiece's remove_extra_whitespaces, which run.c does not do: compare on normalized lines."""
    lines = [" ".join(line.split()) for line in stories.splitlines()]
    for line in lines:
        ids = tok512_sp.encode(line)
        assert tok512_bin.encode(line) == ids, line
        assert tok512_bin.decode(ids) == tok512_sp.decode(ids) == line
    assert tok512_bin.encode("a  b") != tok512_sp.encode("a  b")  # the documented difference


def test_llama2c_encode_equals_sentencepiece_32k(llama_sp, llama_bin, stories):
    """The Llama 2 model keeps whitespace as is, so raw text (unicode, byte fallback) must match."""
    samples = stories.splitlines()[:1500] + TRICKY + [stories[:3000], "ĉ̸̢ 𝔘𝔫𝔦 \x01\x7f", "<s> </s>"]
    for text in samples:
        ids = llama_sp.encode(text)
        assert llama_bin.encode(text) == ids, text
        assert llama_bin.decode(ids) == llama_sp.decode(ids) == text
        assert llama_bin.decode([1, *ids]) == text  # run.c strips the leading space after BOS
    assert llama_bin.encode("x", bos=True, eos=True) == llama_sp.encode("x", bos=True, eos=True)


def test_llama2c_decode_random_ids_like_sentencepiece(llama_sp, llama_bin):
    """Including runs of byte tokens that are not valid UTF-8 (one U+FFFD per bad byte, as sp)."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(259, 32000)]) for _ in range(rng.randrange(1, 12))]
        assert llama_bin.decode(ids) == llama_sp.decode(ids), ids


def test_llama2c_exported_from_sentencepiece_is_the_shipped_file(llama_sp, llama_bin, shared_data, tmp_path):
    """llama2.c's tokenizer.py export, redone here, writes the exact bytes of tokenizer.bin."""
    exported = from_sentencepiece_pieces(llama_sp.pieces())
    exported.max_token_length = llama_bin.max_token_length
    exported.save(tmp_path)
    shipped = (shared_data / "llama2-tokenizer" / "tokenizer.bin").read_bytes()
    assert (tmp_path / "tokenizer.bin").read_bytes() == shipped


def test_sentencepiece_proto_rebuilt_from_pieces(llama_sp, stories):
    """The hand-written ModelProto (used for GGUF 'llama' vocabularies) encodes like the original."""
    rebuilt = SentencePieceTokenizer(sentencepiece_proto(llama_sp.pieces()))
    text = stories[:20000] + "".join(TRICKY)
    assert rebuilt.encode(text) == llama_sp.encode(text)
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (1, 2, None)


def test_gguf_llama_vocabulary(tok512_sp, stories, tmp_path):
    gguf = pytest.importorskip("gguf")
    pieces = tok512_sp.pieces()
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _, _ in pieces])
    writer.add_token_scores([s for _, s, _ in pieces])
    writer.add_token_types([k for _, _, k in pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = load_tokenizer(path)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == ("sentencepiece", 512, 1, 2, True)
    lines = [" ".join(line.split()) for line in stories.splitlines()[:300]]
    assert [tok.encode(x) for x in lines] == [tok512_sp.encode(x) for x in lines]
    assert tok.apply_chat_template(CHAT[:1]) == "[user] Hi\n"


# ---- GGUF byte-level BPE (SmolLM2) against transformers


def test_smollm2_special_ids(smollm):
    assert (smollm.kind, smollm.vocab_size, smollm.bos_id, smollm.eos_id, smollm.pad_id) == ("gguf", 49152, 1, 2, 2)
    assert smollm.id_to_token(2) == "<|im_end|>" and smollm.add_bos is False
    assert smollm.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>


def test_smollm2_encode_decode_match_transformers(smollm, smollm_hf, stories):
    for text in [*TRICKY, "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b", stories[:20000]]:
        ids = smollm.encode(text)
        assert ids == smollm_hf.encode(text, add_special_tokens=False), text
        assert smollm.decode(ids) == smollm_hf.decode(ids) == text
        assert smollm.decode(ids, skip_special_tokens=True) == smollm_hf.decode(ids, skip_special_tokens=True)
    assert smollm.encode("12345") == [33, 34, 35, 36, 37]  # "smollm" pre-tokenizer: one digit per token


def test_smollm2_chat_template_matches_transformers(smollm, smollm_hf):
    system = [{"role": "system", "content": "Be brief."}]
    for messages in (CHAT, system + CHAT, CHAT[:1]):
        for gen in (True, False):
            expected = smollm_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert smollm.apply_chat_template(messages, add_generation_prompt=gen) == expected
    assert smollm.apply_chat_template(CHAT[:1]).endswith("<|im_start|>assistant\n")


def test_gguf_reader_and_fast_metadata_agree(smollm):
    gguf = pytest.importorskip("gguf")
    path = smollm2_gguf()
    meta = read_gguf_metadata(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    from_reader = tokenizer_from_gguf(gguf.GGUFReader(path))
    text = "".join(TRICKY)
    assert from_reader.encode(text) == smollm.encode(text)
    assert (from_reader.bos_id, from_reader.eos_id, from_reader.chat_template) == (1, 2, smollm.chat_template)


# ---- GPT-2, tokenizer.json, char, trained BPE


def test_gpt2_known_ids(gpt2):
    assert (gpt2.kind, gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id) == ("gpt2", 50257, 50256, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello") == [18435]
    assert gpt2.encode("Hello<|endoftext|>") == [15496, 50256]
    assert gpt2.encode("hi", bos=True) == [50256, 5303]
    for text in TRICKY:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_files_by_name(shared_data):
    folder = shared_data / "gpt2-tokenizer"
    by_merges = load_tokenizer(folder / "gpt2_merges.txt")
    direct = from_gpt2_files(folder / "gpt2_vocab.json", folder / "gpt2_merges.txt")
    assert by_merges.encode("Hello world") == direct.encode("Hello world") == [15496, 995]


def test_tokenizer_json_with_config(smollm, tmp_path):
    """A transformers-style folder: tokenizer.json + tokenizer_config.json (tokens as dicts, a named template list)."""
    import json

    smollm.tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False,
              "chat_template": [{"name": "default", "template": smollm.chat_template}, {"name": "x", "template": "no"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id) == ("hf", 1, 2, 0)
    assert tok.apply_chat_template(CHAT) == smollm.apply_chat_template(CHAT)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path / "tokenizer.json").apply_chat_template(CHAT) == "Hi"


def test_char_tokenizer(char_tok, shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    assert char_tok.vocab_size == 65 and char_tok.kind == "char"
    assert char_tok.encode("\n !") == [0, 1, 2]  # sorted characters, as nanoGPT's shakespeare_char
    assert char_tok.decode(char_tok.encode(text[:5000])) == text[:5000]
    with pytest.raises(DataError, match="'é'"):
        char_tok.encode("café")
    with pytest.raises(ConfigError, match="bos_id"):
        char_tok.encode("a", bos=True)


def test_train_bpe_roundtrip(bpe512, stories):
    assert (bpe512.kind, bpe512.vocab_size, bpe512.eos_id, bpe512.bos_id) == ("bpe", 512, 0, 0)
    assert bpe512.id_to_token(0) == "<|endoftext|>"
    sample = stories[-3000:] + "".join(TRICKY)
    ids = bpe512.encode(sample)
    assert bpe512.decode(ids) == sample
    assert len(bpe512.encode(stories[-3000:])) < 3000 * 0.45  # merges learned: well under 1 token per byte
    assert bpe512.encode("The end.<|endoftext|>")[-1] == 0


# ---- every kind: save + load, streaming


KINDS = ["tok512_sp", "tok512_bin", "llama_bin", "gpt2", "smollm", "char_tok", "bpe512"]


@pytest.mark.parametrize("name", KINDS)
def test_save_load_roundtrip(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert type(back) is type(tok) and back.kind == tok.kind
    assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id, back.add_bos, back.chat_template) == \
        (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.chat_template)
    assert back.stop_ids == tok.stop_ids
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak."]
    texts += [] if name == "char_tok" else TRICKY
    for text in texts:
        ids = tok.encode(text)
        assert back.encode(text) == ids
        assert back.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("name", KINDS)
def test_stream_decoder_concatenates_to_decode(name, request, stories):
    tok = request.getfixturevalue(name)
    texts = ["First Citizen:\nYou are all resolved rather to die than to famish?"]
    if name != "char_tok":
        texts += [stories[:1500], " ".join(TRICKY), "日本語 😀👍🏽🇫🇷 ünï"]
    for text in texts:
        ids = tok.encode(text, bos=tok.bos_id is not None and name != "char_tok")
        stream = StreamDecoder(tok)
        pieces = [stream.put(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)  # no half characters reach the terminal


def test_stream_decoder_sentencepiece_spaces(llama_sp):
    ids = llama_sp.encode("Once upon a time", bos=True)
    stream = StreamDecoder(llama_sp)
    assert [stream.put(i) for i in ids] == ["", "Once", " upon", " a", " time"]


def test_stream_decoder_skip_ids(smollm):
    ids = smollm.encode("<|im_start|>assistant\nHi there!<|im_end|>")
    stream = StreamDecoder(smollm, skip_ids={1, 2})
    assert "".join(stream.put(i) for i in ids) + stream.flush() == "assistant\nHi there!"


def test_stream_decoder_holds_split_character(tok512_bin):
    ids = tok512_bin.encode("😀")  # " " + four byte tokens
    stream = StreamDecoder(tok512_bin)
    assert [stream.put(i) for i in ids] == ["", "", "", "", "😀"]
    stream.put(ids[1])  # a lone lead byte: held, then flushed as U+FFFD like decode()
    assert stream.flush() == "\ufffd"


# ---- chat templates and errors


def test_chat_template_errors(tok512_sp, smollm):
    with pytest.raises(ConfigError, match="no chat_template"):
        tok512_sp.apply_chat_template(CHAT)
    from lmlab.tokenization.hf import HFTokenizer

    strict = HFTokenizer(smollm.tok, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match="roles must alternate"):
        strict.apply_chat_template(CHAT)
    sandboxed = HFTokenizer(smollm.tok, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(DataError):
        sandboxed.apply_chat_template(CHAT)


def test_errors_name_the_file(shared_data, tmp_path):
    with pytest.raises(CheckpointError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    truncated = tmp_path / "tokenizer.bin"
    truncated.write_bytes((shared_data / "stories260K" / "tok512.bin").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="tokenizer.bin.*truncated"):
        load_tokenizer(truncated)
    with pytest.raises(CheckpointError, match="stories260K.bin.*llama2.c tokenizer.bin"):
        load_tokenizer(shared_data / "stories260K" / "stories260K.bin")  # a model, not a tokenizer
    unknown = tmp_path / "vocab.txt"
    unknown.write_text("hello")
    with pytest.raises(CheckpointError, match="vocab.txt: unknown tokenizer format"):
        load_tokenizer(unknown)
    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a proto")
    with pytest.raises(CheckpointError, match="bad.model: not a SentencePiece model"):
        load_tokenizer(bad_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        load_tokenizer(empty)
    fake_gguf = tmp_path / "x.gguf"
    fake_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7)
    with pytest.raises(CheckpointError, match="x.gguf: truncated or corrupt"):
        load_tokenizer(fake_gguf)


# ---- CLI


def test_cli_train_encode_decode(shared_data, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    shutil.copyfile(shared_data / "tinystories" / "tinystories_sample.txt", corpus)
    out = tmp_path / "tok"
    cli_main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out)])
    assert "300 tokens" in capsys.readouterr().out
    cli_main(["tokenizer", "encode", str(out), "--text", "Once upon a time", "--eos"])
    ids = capsys.readouterr().out.split()
    assert ids[-1] == "0"
    cli_main(["tokenizer", "decode", str(out), "--ids", ",".join(ids[:-1])])
    assert capsys.readouterr().out == "Once upon a time\n"
    cli_main(["tokenizer", "encode", str(shared_data / "gpt2-tokenizer"), "--text", "Hello world"])
    assert capsys.readouterr().out == "15496 995\n"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["tokenizer", "info", str(tmp_path / "missing")])
    assert exit_info.value.code == 1
    assert "missing: no such tokenizer" in capsys.readouterr().err
