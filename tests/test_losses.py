"""The fused chunked linear cross-entropy equals the plain projection + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.losses import linear_cross_entropy


@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_matches_plain_loss_and_gradients(frozen_head: bool) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=False)
    head.weight.requires_grad_(not frozen_head)
    ref_head = nn.Linear(16, 300, bias=False)
    ref_head.load_state_dict(head.state_dict())
    ref_head.weight.requires_grad_(not frozen_head)
    h = torch.randn(70, 16, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_()
    y = torch.randint(0, 300, (70,))
    loss = linear_cross_entropy(h, head, y, chunk_elems=300 * 16)  # 16-row chunks: several chunks
    ref = F.cross_entropy(ref_head(h_ref), y, reduction="sum")
    (2 * loss).backward()
    (2 * ref).backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-5)
    if frozen_head:
        assert head.weight.grad is None
    else:
        torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=1e-5, rtol=1e-5)


def test_no_grad_takes_the_direct_path() -> None:
    head = nn.Linear(8, 20, bias=False)
    h, y = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, head, y), F.cross_entropy(head(h), y, reduction="sum"))
