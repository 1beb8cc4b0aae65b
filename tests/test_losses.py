"""The fused chunked linear cross-entropy equals the plain projection + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.train.losses import _compute_weight, linear_cross_entropy


@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize(("vocab", "chunk_rows", "scale"), [
    (300, 16, 2.0),      # several row chunks: the weight gradient is accumulated in fp32
    (300, None, 1.0),    # one chunk, backward of the plain sum (the trainer's case: no rescaling)
    (40000, None, 2.0),  # large vocabulary: the in-place softmax runs in 26-row slices
])
def test_fused_matches_plain_loss_and_gradients(frozen_head: bool, vocab: int, chunk_rows: int | None,
                                                scale: float) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, vocab, bias=False)
    head.weight.requires_grad_(not frozen_head)
    ref_head = nn.Linear(16, vocab, bias=False)
    ref_head.load_state_dict(head.state_dict())
    ref_head.weight.requires_grad_(not frozen_head)
    h = torch.randn(70, 16, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_()
    y = torch.randint(0, vocab, (70,))
    kwargs = {"chunk_elems": vocab * chunk_rows} if chunk_rows else {}
    loss = linear_cross_entropy(h, head, y, **kwargs)
    ref = F.cross_entropy(ref_head(h_ref), y, reduction="sum")
    (scale * loss).backward()
    (scale * ref).backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-5)
    if frozen_head:
        assert head.weight.grad is None
    else:
        torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=1e-5, rtol=1e-5)


def test_reused_workspace_gives_the_same_answer_at_any_size() -> None:
    """The scratch matrix is shared between calls: a smaller call after a larger one, and a larger one
    after that, must each equal their own reference."""
    torch.manual_seed(1)
    head = nn.Linear(8, 50, bias=False)
    for n in (40, 7, 90):
        h = torch.randn(n, 8, requires_grad=True)
        y = torch.randint(0, 50, (n,))
        loss = linear_cross_entropy(h, head, y)
        loss.backward()
        h_ref = h.detach().clone().requires_grad_()
        ref = F.cross_entropy(F.linear(h_ref, head.weight.detach()), y, reduction="sum")
        ref.backward()
        torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_is_close_to_fp32() -> None:
    """Under bf16 autocast the logits are bf16 (as in autograd's own path) but the softmax is fp32."""
    torch.manual_seed(2)
    head = nn.Linear(32, 1000, bias=False)
    h = torch.randn(64, 32, requires_grad=True)
    y = torch.randint(0, 1000, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, head, y)
    loss.backward()
    h_ref = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(head(h_ref), y, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0.0)
    cos = F.cosine_similarity(h.grad.flatten(), h_ref.grad.flatten(), dim=0)
    assert cos > 0.999, cos


def test_no_grad_takes_the_direct_path() -> None:
    head = nn.Linear(8, 20, bias=False)
    h, y = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, head, y), F.cross_entropy(head(h), y, reduction="sum"))


def test_frozen_head_cast_is_reused_and_follows_in_place_changes() -> None:
    """A frozen fp32 head under bf16 autocast is cast to bf16 once, not every step; changing the weight
    in place (a LoRA merge, a load) must give the new weight's loss, never the stale copy's."""
    torch.manual_seed(3)
    head = nn.Linear(16, 200, bias=False).requires_grad_(False)
    h = torch.randn(12, 16, requires_grad=True)
    y = torch.randint(0, 200, (12,))

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, head, y)

    def ref() -> torch.Tensor:
        w = head.weight.to(torch.bfloat16)
        return F.cross_entropy((h.detach().to(torch.bfloat16) @ w.T).float(), y, reduction="sum")

    first = loss()
    torch.testing.assert_close(first, ref(), rtol=1e-3, atol=0.0)
    cast = _compute_weight(head.weight, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and _compute_weight(head.weight, torch.bfloat16) is cast  # cast once
    torch.testing.assert_close(loss(), first, rtol=0.0, atol=0.0)  # same copy, same answer
    with torch.no_grad():
        head.weight.mul_(3.0)
    changed = loss()
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, ref(), rtol=1e-3, atol=0.0)
    head.weight.data = torch.randn(200, 16)  # new storage
    torch.testing.assert_close(loss(), ref(), rtol=1e-3, atol=0.0)
