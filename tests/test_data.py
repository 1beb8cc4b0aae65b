"""Pretraining data: readers, cached token shards, random windows and padded chunks, bad corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab.data.batch import IGNORE_INDEX
from lmlab.data.corpus import read_documents
from lmlab.data.pretrain import (
    Layout,
    PaddedChunks,
    RandomWindows,
    build_shards,
    check_length,
    token_eval_batches,
    token_dtype,
)
from lmlab.errors import DataError
from lmlab.tokenization.char import CharTokenizer


class CountingChar(CharTokenizer):
    calls = 0

    def encode(self, text, bos=False, eos=False):
        CountingChar.calls += 1
        return super().encode(text, bos, eos)


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree\n")
    assert read_documents(str(tmp_path / "a.txt"), separator="line")[0] == ["one", "two", "three"]
    assert read_documents(str(tmp_path / "a.txt"), separator="blank_line")[0] == ["one", "two\nthree"]
    (tmp_path / "a.jsonl").write_text('{"text": "x y"}\n\n{"text": "z"}\n')
    assert read_documents(str(tmp_path / "a.jsonl"))[0] == ["x y", "z"]
    (tmp_path / "a.json").write_text(json.dumps([{"body": "p"}, {"body": "q"}]))
    assert read_documents(str(tmp_path / "a.json"), field="body")[0] == ["p", "q"]
    (tmp_path / "a.csv").write_text('id,story\n1,"hello, world"\n2,bye\n')
    assert read_documents(str(tmp_path / "a.csv"), column="story")[0] == ["hello, world", "bye"]


def test_reader_errors_name_file_and_line(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: record has no field 'text'"):
        read_documents(str(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{bad\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        read_documents(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"d\.csv: no column 'text'"):
        read_documents(str(tmp_path / "d.csv"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="not found"):
        read_documents(str(tmp_path / "missing.txt"))


def test_too_short_corpus_is_an_error(tmp_path):
    tok = CharTokenizer.from_text("abcdefghij")
    train, val = build_shards(["abcdefghij" * 3], "h", tok, "char", cache_dir=tmp_path, val_fraction=0.2)
    check_length(train, 16, "train", "tiny.txt")
    with pytest.raises(DataError, match=r"tiny\.txt: the validation split has 6 tokens, shorter than one window"):
        check_length(val, 16, "validation", "tiny.txt")


def test_shards_are_cached_by_content_and_split(tmp_path, shared_data):
    docs, digest = read_documents(str(shared_data / "tinyshakespeare" / "input.txt"))
    tok = CountingChar.from_text(docs[0])
    CountingChar.calls = 0
    train, val = build_shards(docs, digest, tok, "char", cache_dir=tmp_path)
    assert CountingChar.calls == 1 and tok.vocab_size == 65
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    n = len(docs[0])
    assert len(train) == int(n * 0.9) and len(train) + len(val) == n  # nanoGPT's 90/10 split
    assert tok.decode(val.tokens[:20].tolist()) == docs[0][int(n * 0.9):][:20]
    build_shards(docs, digest, tok, "char", cache_dir=tmp_path)
    assert CountingChar.calls == 1  # second build hit the cache
    build_shards(docs, digest, tok, "char", cache_dir=tmp_path, val_fraction=0.2)
    assert CountingChar.calls == 2  # other split -> other cache entry
    assert token_dtype(65) == np.uint16 and token_dtype(100_000) == np.uint32


def test_random_windows_are_seeded_shifted_and_partition_the_global_batch(tmp_path):
    tok = CharTokenizer.from_text("".join(chr(97 + i % 26) for i in range(26)))
    text = "".join(chr(97 + (i * 7) % 26) for i in range(5000))
    train, _ = build_shards([text], "x", tok, "char", cache_dir=tmp_path)
    one = RandomWindows(train, 16, Layout(batch_size=4), seed=3)
    b = one(5, 0)
    assert b["input_ids"].shape == (4, 16)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    assert torch.equal(one(5)["input_ids"], b["input_ids"]) and not torch.equal(one(6)["input_ids"], b["input_ids"])
    accum = RandomWindows(train, 16, Layout(batch_size=2, grad_accum=2), seed=3)
    ranks = [RandomWindows(train, 16, Layout(batch_size=2, rank=r, world=2), seed=3) for r in range(2)]
    assert torch.equal(torch.cat([accum(5, 0)["input_ids"], accum(5, 1)["input_ids"]]), b["input_ids"])
    assert torch.equal(torch.cat([ranks[0](5)["input_ids"], ranks[1](5)["input_ids"]]), b["input_ids"])


def test_padded_chunks_mask_padding_and_cover_every_token_once(tmp_path):
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz")
    docs = ["abcdefghij", "klm", "nopqrstuvwxyzabcdefghijklmn"] * 4
    train, _ = build_shards(docs, "y", tok, "char", cache_dir=tmp_path, val_fraction=0.25)
    source = PaddedChunks(train, 8, Layout(batch_size=3), seed=0, pad_id=0)
    targets = 0
    for step in range(source.steps_per_epoch):
        b = source(step)
        assert b["input_ids"].shape == (3, 8)
        targets += int((b["labels"] != IGNORE_INDEX).sum())
    n_train_docs = len(train.doc_offsets) - 1
    # one epoch predicts every token after each document's first (the last batch may wrap around)
    assert targets >= len(train) - n_train_docs
    short = [b for b in (source(s) for s in range(source.steps_per_epoch))]
    row = next(r for bb in short for r in range(3) if (bb["labels"][r] == IGNORE_INDEX).any())
    assert row is not None
    val = token_eval_batches(train, 8, 4, "chunks")
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in val) == len(train) - n_train_docs


def test_hugging_face_dataset_reader(tmp_path, monkeypatch):
    """`hf:NAME` goes through datasets.load_dataset; offline it is exercised on a local dataset folder
    (the same call resolves a hub name when online). Field errors and splits name what was asked."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "stories"
    folder.mkdir()
    rows = [{"story": f"Story number {i}. The end.", "id": i} for i in range(5)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "validation.jsonl").write_text(json.dumps({"story": "A held-out story.", "id": 9}) + "\n")
    docs, digest = read_documents(f"hf:{folder}", field="story")
    assert docs == [r["story"] for r in rows] and digest.startswith(f"hf:{folder}:train:")
    assert read_documents(f"hf:{folder}", field="story", hf_split="validation")[0] == ["A held-out story."]
    with pytest.raises(DataError, match=r"no field 'text'.*story"):
        read_documents(f"hf:{folder}")
    with pytest.raises(DataError, match="could not load"):
        read_documents(f"hf:{tmp_path / 'missing'}")
