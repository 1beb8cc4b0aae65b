"""lmlab's AdamW against torch.optim.AdamW, the decay groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.train.optim import AdamW, build_optimizer, param_groups
from lmlab.train.schedule import Schedule, lr_at


def _toy() -> nn.Module:
    return nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 11))


def _train(opt_cls, steps: int = 100, **kw) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = _toy()
    opt = opt_cls(param_groups(model, weight_decay=0.1), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.95)])
def test_adamw_matches_torch_over_100_steps(betas):
    kw = dict(lr=3e-3, betas=betas, eps=1e-8)
    ours, ref = _train(AdamW, **kw), _train(torch.optim.AdamW, **kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_weight_decay_is_decoupled():
    """With a zero gradient Adam's step is 0, so only the decay acts: p <- p * (1 - lr * wd)."""
    p = nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_param_groups_skip_norms_biases_and_embeddings():
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, norm="layernorm", pos="learned", mlp="gelu",
                      qkv_bias=True, tie_embeddings=False, max_seq_len=8)
    model = Transformer(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("weight") and "norm" not in n and "embeddings" not in n for n in decayed)
    assert "output.weight" in decayed and "layers.0.attention.wq.weight" in decayed
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"tok_embeddings.weight", "pos_embeddings.weight", "layers.0.attention.wq.bias"} <= skipped
    assert len(decayed) + len(skipped) == len(names)
    decay2, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert "tok_embeddings.weight" in {names[id(p)] for p in decay2["params"]}


@pytest.mark.parametrize("impl,flag", [("torch", None), ("torch-foreach", "foreach"), ("torch-fused", "fused")])
def test_build_optimizer_selects_torch_kernels(impl, flag):
    opt = build_optimizer(_toy(), impl=impl, lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    if flag:
        assert opt.defaults[flag] is True
    assert isinstance(build_optimizer(_toy(), impl="lmlab"), AdamW)
    with pytest.raises(ConfigError, match="optim.impl"):
        build_optimizer(_toy(), impl="sgd")


def test_schedule_values():
    s = Schedule(lr=1.0, warmup_steps=10, decay_steps=110, min_lr=0.1, kind="cosine")
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))  # halfway: 0.55
    assert s(110) == pytest.approx(0.1) and s(5000) == pytest.approx(0.1)
    assert lr_at(60, 1.0, 10, 110, 0.1, "linear") == pytest.approx(0.55)
    assert lr_at(500, 1.0, 10, 110, 0.1, "constant") == 1.0
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    with pytest.raises(ConfigError, match="schedule.kind"):
        Schedule(1.0, 0, 10, kind="step")
    with pytest.raises(ConfigError, match="min_lr"):
        Schedule(1.0, 0, 10, min_lr=2.0)
