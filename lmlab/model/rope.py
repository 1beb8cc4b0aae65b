"""Rotary position embeddings (Su et al. 2021, "RoFormer"), Meta/llama2.c interleaved layout.

Each head vector is read as head_dim/2 pairs (x[2i], x[2i+1]); pair i at position p is rotated by the
angle p * theta^(-2i/head_dim). Weights from Hugging Face (which use the "rotate half" layout) are
permuted into this layout on load (lmlab/weights/hf.py), so one forward serves every checkpoint.

Context extension: `linear` divides positions by the factor (position interpolation, Chen et al.
2023); `ntk` stretches the base to theta * factor^(d/(d-2)) ("NTK-aware" scaling, bloc97 2023).
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: str | None = None, factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), shape (head_dim/2,), with NTK base scaling applied."""
    if scaling == "ntk" and factor != 1.0:
        theta = theta * factor ** (head_dim / (head_dim - 2))
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope_angles(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: str | None = None, factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, each (*positions.shape, head_dim/2) in fp32."""
    pos = positions.to(torch.float32)
    if scaling == "linear":
        pos = pos / factor
    angles = pos[..., None] * inv_freq.to(torch.float32)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of x (B, T, H, D) by the angles (B|1, T, 1, D/2).

    Computed in fp32 and cast back, as in the reference implementations; the pairs are read as
    complex numbers (Meta's formulation), one kernel instead of six on CPU.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2)
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).type_as(x)
