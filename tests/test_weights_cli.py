"""`load_model` specs, `lmlab convert` and `lmlab info`, and the bad-input errors of model loading."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.errors import CheckpointError, ConfigError
from lmlab.model.config import ModelConfig
from lmlab.weights.loading import load_model


def _cli(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_convert_llama2c_to_lmlab_and_hf(shared_data, tmp_path, capsys) -> None:
    src = shared_data / "stories260K" / "stories260K.bin"
    original = load_model(src)
    x = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    _cli(capsys, "convert", str(src), "--to", "lmlab", "--out", str(tmp_path / "ours"))
    ours = load_model(tmp_path / "ours")
    assert ours.kind == "lmlab" and ours.tokenizer.kind == original.tokenizer.kind
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), original.model(x), atol=0, rtol=0)
    # lmlab checkpoint -> HF folder -> transformers
    transformers = pytest.importorskip("transformers")
    _cli(capsys, "convert", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, original.model(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_convert_smollm2_gguf_to_hf_with_tokenizer(tmp_path, capsys) -> None:
    """The GGUF's embedded tokenizer is written as tokenizer.json + tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    _cli(capsys, "convert", "smollm2-135m-instruct", "--to", "hf", "--out", str(tmp_path / "hf"), "--dtype", "bf16")
    ours = load_model(tmp_path / "hf")  # bf16 weights, upcast to fp32
    assert ours.kind == "hf" and ours.tokenizer.chat_template
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello there!\nThe year 2024 was   interesting, wasn't it?"
    ids = ours.tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.eos_token_id == ours.tokenizer.eos_id and hf_tok.bos_token_id == ours.tokenizer.bos_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, ours.model(torch.tensor([ids])), atol=1e-3, rtol=0)


def test_info_command(shared_data, capsys) -> None:
    out = _cli(capsys, "info", str(shared_data / "stories260K" / "stories260K.bin"))
    assert "parameters: 260,032" in out  # the file's 264,128 floats minus the 2 x 512 x 4 RoPE table and "tokenizer: llama2c, vocab 512" in out
    info = json.loads(_cli(capsys, "info", "preset:gpt2-124m", "--json"))
    assert info["parameters"] == 124_439_808  # GPT-2 small, tied head counted once
    assert info["memory_bf16_mb"] == pytest.approx(124_439_808 * 2 / 2**20)


def test_preset_spec_and_dtype() -> None:
    loaded = load_model("preset:llama2c-stories260k", dtype="bf16")
    assert loaded.kind == "preset" and loaded.tokenizer is None
    assert loaded.model.tok_embeddings.weight.dtype == torch.bfloat16 and not loaded.model.training
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        load_model("preset:nope")
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        load_model("preset:llama2c-stories260k", dtype="fp8")


def test_lmlab_config_with_unknown_key(tmp_path) -> None:
    from lmlab.weights.checkpoint import save_checkpoint

    save_checkpoint(load_model("preset:llama2c-stories260k").model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["n_layer"] = 5  # a typo of n_layers
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"ckpt/config\.json: unknown model config key\(s\) \['n_layer'\]"):
        load_model(tmp_path / "ckpt")


def test_shape_mismatch_in_lmlab_checkpoint(tmp_path) -> None:
    from lmlab.weights.checkpoint import save_checkpoint

    save_checkpoint(load_model("preset:llama2c-stories260k").model, tmp_path / "ckpt")
    config = ModelConfig.load(tmp_path / "ckpt" / "config.json")
    config.hidden_dim = 180
    config.save(tmp_path / "ckpt" / "config.json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor layers\.0\.feed_forward\.w\d\.weight has shape"):
        load_model(tmp_path / "ckpt")


def test_unknown_specs(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.bin: no such file or folder \(expected a registered name"):
        load_model(tmp_path / "missing.bin")
    (tmp_path / "weights.npz").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"weights\.npz: unknown model file type '\.npz'"):
        load_model(tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: folder is neither an lmlab checkpoint"):
        load_model(tmp_path / "empty")


@pytest.mark.skip(reason="needs network access to the Hugging Face hub, which this machine does not have; "
                         "lmlab.weights.hub.snapshot is kept for machines that do")
def test_hub_name_downloads(tmp_path) -> None:
    loaded = load_model("HuggingFaceTB/SmolLM2-135M")
    assert loaded.kind == "hf" and loaded.model.config.dim == 576 and loaded.tokenizer is not None
