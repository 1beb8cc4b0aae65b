"""Run configs: every shipped recipe loads; unknown keys and wrong types name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.errors import ConfigError
from lmlab.model.config import get_preset
from lmlab.paths import REPO_ROOT
from lmlab.schema.load import field_docs, load_config, parse_scalar, save_config
from lmlab.schema.pretrain import PretrainConfig as RunConfig

# run recipes only: sweep files (a top-level `recipe:` key) are validated by the sweep tests
RECIPES = [p for p in sorted((REPO_ROOT / "recipes" / "pretrain").glob("*.yaml"))
           if "recipe" not in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_pretrain_recipe_loads_and_validates(recipe: Path, shared_data):
    cfg = load_config(recipe, schema=RunConfig)
    assert isinstance(cfg, RunConfig)
    if cfg.model.spec.startswith("preset:"):  # the model it names must build
        get_preset(cfg.model.spec.removeprefix("preset:"), **cfg.model.overrides)
    assert Path(cfg.data.path).is_file(), cfg.data.path
    if cfg.data.tokenizer != "char":
        assert Path(cfg.data.tokenizer).exists(), cfg.data.tokenizer


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, "train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml.*train\.max_stepz"):
        load_config(path, schema=RunConfig)
    with pytest.raises(ConfigError, match="unknown key optimizer"):
        load_config(None, ["optimizer.lr=1"], schema=RunConfig)
    with pytest.raises(ConfigError, match="model.n_layer"):
        load_config(None, ["model.n_layer=2"], schema=RunConfig)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size='big': expected int"):
        load_config(_write(tmp_path, "train: {batch_size: big}\n"), schema=RunConfig)
    with pytest.raises(ConfigError, match=r"train\.max_steps=1\.5"):
        load_config(None, ["train.max_steps=1.5"], schema=RunConfig)
    with pytest.raises(ConfigError, match=r"precision\.dtype='fp8'.*expected one of"):
        load_config(None, ["precision.dtype=fp8"], schema=RunConfig)
    with pytest.raises(ConfigError, match=r"model\.dim='wide'"):
        load_config(None, ["model.dim=wide"], schema=RunConfig)
    with pytest.raises(ConfigError, match=r"optim\.betas\[1\]"):
        load_config(None, ["optim.betas=[0.9, x]"], schema=RunConfig)


def test_overrides_parse_as_yaml_scalars(tmp_path):
    cfg = load_config(_write(tmp_path, "optim: {lr: 1e-3}\n"), ["train.max_steps=7", "optim.lr=3e-4",
                      "logging.progress=false", "model.n_layers=1", "sample.prompts=[a, b]"], schema=RunConfig)
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.logging.progress is False
    assert cfg.model.overrides == {"n_layers": 1} and cfg.sample.prompts == ["a", "b"]
    assert load_config(_write(tmp_path, "optim: {lr: 1e-3}\n"), schema=RunConfig).optim.lr == 1e-3  # 1e-3 is a float here
    assert parse_scalar("2") == 2 and parse_scalar("x") == "x" and parse_scalar("null") is None
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.max_steps"], schema=RunConfig)


def test_interpolation(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("MY_CORPUS", "/some/file.txt")
    cfg = load_config(_write(tmp_path, "data: {path: '${MY_CORPUS}', val_path: '${data_dir}/x.txt'}\n"), schema=RunConfig)
    assert cfg.data.path == "/some/file.txt" and cfg.data.val_path == f"{shared_data}/x.txt"
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        load_config(None, ["data.path=${NOT_SET_ANYWHERE}/a"], schema=RunConfig)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["model.n_layers=3", "optim.lr=0.01", "out_dir=x"], schema=RunConfig)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["n_layers"] == 3 and "overrides" not in saved["model"]
    assert load_config(tmp_path / "config.yaml", schema=RunConfig) == cfg


def test_every_field_has_a_docstring():
    docs = field_docs(RunConfig)
    for group in ("train", "optim", "schedule", "precision", "data", "checkpoint", "logging"):
        assert f"{group}.seed" in docs or any(k.startswith(f"{group}.") for k in docs)
    from pydantic import BaseModel

    def walk(cls, prefix=""):
        for name, info in cls.model_fields.items():
            assert f"{prefix}{name}" in docs, f"{prefix}{name} has no docstring"
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{prefix}{name}.")

    walk(RunConfig)
