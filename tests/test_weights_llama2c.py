"""llama2.c checkpoints: the real stories260K (NLL on TinyStories, greedy text of the reference C
implementation), and every export format of llama2.c's export.py / train.py written here by a faithful
re-implementation and loaded back."""

from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import CheckpointError
from lmlab.model.config import ModelConfig, get_preset
from lmlab.model.transformer import Transformer
from lmlab.tokenization import load_tokenizer
from lmlab.weights.loading import load_model

# ---- the real stories260K

@pytest.fixture(scope="module")
def stories(shared_data):
    return load_model(shared_data / "stories260K" / "stories260K.bin")


def test_stories260k_config_and_tokenizer(stories) -> None:
    assert stories.kind == "llama2c"
    c, preset = stories.model.config, get_preset("llama2c-stories260k")
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len", "tie_embeddings"):
        assert getattr(c, key) == getattr(preset, key), key
    assert stories.tokenizer is not None and stories.tokenizer.vocab_size == 512  # tok512.bin found beside it


def test_stories260k_nll_on_tinystories(stories, shared_data) -> None:
    """MANIFEST: an independent NumPy forward pass measured 1.25 nats/token on this sample."""
    tok = load_tokenizer(shared_data / "stories260K" / "tok512.model")
    text = (shared_data / "tinystories" / "tinystories_sample.txt").read_text()
    total, count = 0.0, 0
    with torch.no_grad():
        for story in (s.strip() for s in text.split("<|endoftext|>")):
            if story:
                ids = torch.tensor([tok.encode(story, bos=True)])
                logits = stories.model(ids[:, :-1])
                total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
    assert abs(total / count - 1.25) < 0.05


def test_stories260k_greedy_matches_reference_c(stories, shared_data) -> None:
    """run.c -t 0 -n 200: 200 argmax tokens after BOS; here with full recomputation (no cache)."""
    ids = [stories.tokenizer.bos_id]
    with torch.no_grad():
        for _ in range(200):
            ids.append(int(stories.model(torch.tensor([ids]))[0, -1].argmax()))
    reference = (shared_data / "stories260K" / "reference-greedy-200.txt").read_text()
    assert stories.tokenizer.decode(ids) == reference


# ---- llama2.c export.py, re-implemented (the model's parameter names are llama2.c's own)

def _f32(f, t: torch.Tensor) -> None:
    f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())


def legacy_export(model: Transformer, path) -> None:
    c = model.config
    shared = torch.equal(model.tok_embeddings.weight, model.output.weight)
    with open(path, "wb") as f:
        f.write(struct.pack("iiiiiii", c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                            c.vocab_size if shared else -c.vocab_size, c.max_seq_len))
        _f32(f, model.tok_embeddings.weight)
        for get in (lambda l: l.attention_norm, lambda l: l.attention.wq, lambda l: l.attention.wk,
                    lambda l: l.attention.wv, lambda l: l.attention.wo, lambda l: l.ffn_norm,
                    lambda l: l.feed_forward.w1, lambda l: l.feed_forward.w2, lambda l: l.feed_forward.w3):
            for layer in model.layers:
                _f32(f, get(layer).weight)
        _f32(f, model.norm.weight)
        freqs = 1.0 / 10000.0 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)
        angles = torch.outer(torch.arange(c.max_seq_len).float(), freqs)
        _f32(f, angles.cos())
        _f32(f, angles.sin())
        if not shared:
            _f32(f, model.output.weight)


def _matrices(model: Transformer) -> list[torch.Tensor]:
    layers = model.layers
    return [model.tok_embeddings.weight,
            *[l.attention.wq.weight for l in layers], *[l.attention.wk.weight for l in layers],
            *[l.attention.wv.weight for l in layers], *[l.attention.wo.weight for l in layers],
            *[l.feed_forward.w1.weight for l in layers], *[l.feed_forward.w2.weight for l in layers],
            *[l.feed_forward.w3.weight for l in layers]]


def _versioned_header(f, model: Transformer, version: int, shared: bool) -> None:
    c = model.config
    f.write(struct.pack("I", 0x616B3432))
    f.write(struct.pack("i", version))
    f.write(struct.pack("iiiiiii", c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
                        c.max_seq_len))
    f.write(struct.pack("B", int(shared)))


def version1_export(model: Transformer, path) -> None:
    shared = torch.equal(model.tok_embeddings.weight, model.output.weight)
    with open(path, "wb") as f:
        _versioned_header(f, model, 1, shared)
        f.write(b"\0" * (256 - f.tell()))
        weights = [*[l.attention_norm.weight for l in model.layers], *[l.ffn_norm.weight for l in model.layers],
                   model.norm.weight, *_matrices(model)]
        if not shared:
            weights.append(model.output.weight)
        for w in weights:
            _f32(f, w)


def quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float().reshape(-1, group_size)
    scale = w.abs().max(dim=1).values / 127.0
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def version2_export(model: Transformer, path, group_size: int = 64) -> None:
    while model.config.dim % group_size:
        group_size //= 2
    shared = torch.equal(model.tok_embeddings.weight, model.output.weight)
    weights = _matrices(model) + ([] if shared else [model.output.weight])
    with open(path, "wb") as f:
        _versioned_header(f, model, 2, shared)
        f.write(struct.pack("i", group_size))
        f.write(b"\0" * (256 - f.tell()))
        for w in [*[l.attention_norm.weight for l in model.layers], *[l.ffn_norm.weight for l in model.layers],
                  model.norm.weight]:
            _f32(f, w)
        scales = []
        for w in weights:
            q, s = quantize_q80(w, group_size)
            f.write(q.numpy().tobytes())
            scales.append(s)
        for s in scales:
            _f32(f, s)


def _tiny(tied: bool = True) -> Transformer:
    config = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                         max_seq_len=32, tie_embeddings=tied)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


X = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("export", [legacy_export, version1_export])
def test_fp32_exports_round_trip(export, tied: bool, tmp_path) -> None:
    model = _tiny(tied)
    export(model, tmp_path / "model.bin")
    loaded = load_model(tmp_path / "model.bin").model
    assert loaded.config.tie_embeddings == tied
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_version2_q80_round_trip(tied: bool, tmp_path) -> None:
    """Lossy: equal to the model with Q8_0-rounded weights, and close to the original."""
    model = _tiny(tied)
    version2_export(model, tmp_path / "q80.bin")
    loaded = load_model(tmp_path / "q80.bin").model
    rounded = _tiny(tied)
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for w in _matrices(rounded) + ([] if tied else [rounded.output.weight]):
            q, s = quantize_q80(w, 64)
            w.copy_((q.float() * s[:, None]).reshape(w.shape))
        torch.testing.assert_close(loaded(X), rounded(X), atol=1e-5, rtol=0)
        err = (loaded(X) - model(X)).abs().max().item()
    assert 0 < err < 0.02  # weights of std 0.02 rounded to 1/127 of their group's max


def test_train_py_checkpoint(tmp_path) -> None:
    """train.py: {"model": compiled model's state dict, "model_args", "optimizer", "iter_num", ...}."""
    model = _tiny()
    c = model.config
    model_args = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                      vocab_size=c.vocab_size, multiple_of=32, max_seq_len=c.max_seq_len, dropout=0.0,
                      hidden_dim=c.hidden_dim)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                  "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 10,
                  "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 8, "dataset": "tinystories"}}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    assert loaded.kind == "llama2c-pt" and loaded.model.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X), atol=0, rtol=0)
    checkpoint["model_args"]["lora_rank"] = 8
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: unknown model_args key\(s\) \['lora_rank'\]"):
        load_model(tmp_path / "bad.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pt_with_code_is_refused(tmp_path, capsys) -> None:
    torch.save({"model": {}, "model_args": {}, "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a readable weights-only PyTorch checkpoint"):
        load_model(tmp_path / "evil.pt")
    assert "pickled code ran" not in capsys.readouterr().out


def test_truncated_bin_names_file_and_size(shared_data, tmp_path) -> None:
    data = (shared_data / "stories260K" / "stories260K.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:500_000])
    with pytest.raises(CheckpointError, match=r"cut\.bin: truncated llama2\.c checkpoint: 500000 bytes, the header implies 1056540"):
        load_model(tmp_path / "cut.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(CheckpointError, match=r"tiny\.bin: truncated"):
        load_model(tmp_path / "tiny.bin")
    model = _tiny()
    version2_export(model, tmp_path / "q.bin")
    (tmp_path / "q.bin").write_bytes((tmp_path / "q.bin").read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"q\.bin: truncated"):
        load_model(tmp_path / "q.bin")


def test_tokenizer_override(shared_data) -> None:
    loaded = load_model(shared_data / "stories260K" / "stories260K.bin",
                        tokenizer=shared_data / "stories260K" / "tok512.model")
    assert loaded.tokenizer.kind == "sentencepiece"
    assert math.isclose(loaded.model.config.norm_eps, 1e-5)
