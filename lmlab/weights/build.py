"""Foreign weight formats in and out: llama2.c, GGUF, Hugging Face (and the hub).

Every reader turns a file into `(ModelConfig, state dict in lmlab's names)`, and `build_model` makes
the ready model from that pair: built without random init and filled by *assigning* the tensors, so a
135M-parameter file is never copied twice nor randomly initialised first.

RoPE layouts: lmlab (like Meta's llama, llama2.c and GGUF's `llama` architecture) rotates adjacent
pairs (x[2i], x[2i+1]); Hugging Face Llama/Mistral/Qwen2 (and GGUF `qwen2`) rotate the two halves
(x[i], x[i + d/2]). The two are the same model after permuting the rows of wq and wk (and their
biases) inside each head; `to_interleaved` / `to_rotate_half` are that permutation and its inverse
(transformers' convert_llama_weights_to_hf.py `permute`, llama.cpp's LlamaModel.permute).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from lmlab.errors import CheckpointError
from lmlab.model.config import ModelConfig
from lmlab.model.quantize import Int8Weight, PackedInt4, install_quantized
from lmlab.model.transformer import Transformer


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows (HF) -> interleaved-pair rows (lmlab); w is (n_heads*head_dim, ...) or a bias."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `to_interleaved`: lmlab rows -> Hugging Face rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantized: dict[str, PackedInt4 | Int8Weight] | None = None,
    quantized_dtype: torch.dtype = torch.bfloat16,
) -> Transformer:
    """A ready eval-mode model whose parameters *are* the tensors of `state` (cast to `dtype` if given).

    `quantized` linear weights (lmlab/weights/gguf_packed.py) become quantized modules computing in
    `quantized_dtype`, their biases taken from `state`. Names and shapes are checked against the config first
    (errors name `source` and the tensors).
    """
    if dtype is not None:
        state = {k: v if v.dtype == dtype else v.to(dtype) for k, v in state.items()}
    with _no_random_init():
        model = Transformer(config)
    if quantized:
        install_quantized(model, quantized, state, quantized_dtype)
    load_state_into(model, state, source, assign=True)
    if config.tie_embeddings and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Build a model whose weights are about to be replaced without filling them randomly first.

    The parameters stay uninitialised (torch.empty: no page is touched), as in transformers'
    `no_init_weights`. Not the meta device: its first factory call imports torch._dynamo (~2 s here).
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def state_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of a state dict's parameters are stored in (the default when loading)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


__all__ = ["build_model", "to_interleaved", "to_rotate_half", "state_dtype", "nonfinite_tensors"]


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf: such weights only ever produce NaN, so no
    loader accepts them. A NaN or inf always makes the sum non-finite, so the sum (one fast pass, ~0.1 s
    for 135M weights) screens; the exact test (a bool tensor as large as the weights, ~30x slower) runs
    only where the sum overflowed."""
    def bad(v: torch.Tensor) -> bool:
        return v.is_floating_point() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all())
    return sorted(k for k, v in state.items() if bad(v))


def load_state_into(
    model: Transformer, state: dict[str, torch.Tensor], source: str, strict: bool = True, assign: bool = False
) -> None:
    """Copy `state` into `model`, with errors that name the file and the mismatching tensors.

    `assign=True` adopts the given tensors instead of copying (a model built on the meta device).
    """
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{source}: tensor(s) {bad[:4]} hold NaN or inf values (a diverged or damaged "
                              "model); not loading it")
    own = model.state_dict()
    if model.config.tie_embeddings:
        own.pop("output.weight", None)
        state = {k: v for k, v in state.items() if k != "output.weight"}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source}: weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=assign)
