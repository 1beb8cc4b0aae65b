"""LoRA: invariants (init = base, merged = unmerged, disabled = base), freezing, save/load, named
adapters, and parity with Hugging Face peft in both directions on a tiny random Llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.adapters.files import export_peft, import_peft, load_adapter, save_adapter, save_lora
from lmlab.adapters.lora import (
    DEFAULT,
    LoRAConfig,
    LoRALinear,
    adapters_per_row,
    add_adapter,
    apply_lora,
    disable_lora,
    lora_parameters,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    set_active_adapter,
    unmerge_lora,
)
from lmlab.errors import CheckpointError, ConfigError
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.weights.build import build_model, to_interleaved, to_rotate_half
from lmlab.weights.checkpoint import load_checkpoint
from lmlab.weights.hf import load_hf

ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]


def tiny(**kw) -> Transformer:
    cfg = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32,
               tie_embeddings=False)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


class Classifier(nn.Module):
    """A backbone plus a head on the last hidden state, as the classification recipes build it."""

    def __init__(self, backbone: Transformer, n_classes: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.dim, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(tokens, return_hidden=True)[:, -1])


def tokens(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, scale: float = 0.1) -> None:
    """Non-zero B everywhere, so the adapter actually changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.normal_(0, scale)


def train_steps(model: nn.Module, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps of next-token loss on one batch; returns the losses."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr)
    x = tokens(4, 16, seed=7)
    losses = []
    model.train()
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------- invariants

def test_init_equals_base_and_base_names_kept():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, target_modules=ALL, dropout=0.5))
    x = tokens()
    assert torch.equal(model(x), base(x))
    model.train()  # dropout sits on the LoRA path only: with B = 0 the output is still exactly the base's
    assert torch.equal(model(x), base(x))
    keys = set(model.state_dict())
    assert {k for k in keys if ".lora_" not in k} == set(base.state_dict())
    assert "layers.0.attention.wq.lora_a.default.weight" in keys
    assert isinstance(model.layers[1].feed_forward.w2, LoRALinear)
    assert model.layers[0].attention.wq.weight is not None and model.output.bias is None


def test_default_targets_are_q_and_v():
    model = apply_lora(tiny())
    wrapped = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"wq", "wv"}
    want = {f"layers.{i}.attention.{w}.lora_{ab}.weight" for i in range(2) for w in ("wq", "wv") for ab in "ab"}
    assert set(lora_state_dict(model)) == want


def test_merged_equals_unmerged_and_unmerge_restores():
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, target_modules=ALL))
    randomize_b(model)
    original = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    x = tokens()
    unmerged = model(x)
    merge_lora(model)
    assert model.layers[0].attention.wq.merged == "default"
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(model.layers[0].attention.wq.weight, original["layers.0.attention.wq.weight"])
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)


def test_disabled_equals_base_also_when_merged():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, target_modules=ALL))
    randomize_b(model)
    x = tokens()
    adapted = model(x)
    assert not torch.allclose(adapted, base(x), atol=1e-3)
    with disable_lora(model):
        torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)
    merge_lora(model)
    with disable_lora(model):
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=0)
    assert model.layers[0].attention.wq.merged == "default"
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)


def test_rslora_scaling():
    layer = LoRALinear(nn.Linear(8, 8), rank=4, alpha=8, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / 2)
    assert LoRALinear(nn.Linear(8, 8), rank=4, alpha=8).scaling["default"] == pytest.approx(2)


# ---------------------------------------------------------------- what trains

def test_only_lora_and_trainable_params_get_gradients():
    model = Classifier(tiny())
    apply_lora(model, LoRAConfig(rank=4, target_modules=["wq", "wv", "w1"], trainable=["head"]))
    params = lora_parameters(model)
    names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    want = {f"backbone.layers.{i}.{m}.lora_{ab}.default.weight" for i in range(2)
            for m in ("attention.wq", "attention.wv", "feed_forward.w1") for ab in "ab"}
    assert names == want | {"head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    opt = torch.optim.AdamW(params, lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    model(tokens()).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == names


def test_flops_per_token_skips_weight_gradients_of_the_frozen_base():
    """MFU counts 6 FLOPs per weight per token in full training; a frozen base weight needs no weight
    gradient, so LoRA costs 4 per base weight + 6 per adapter weight (else MFU reads above 1)."""
    for tie in (False, True):
        model = tiny(tie_embeddings=tie)
        c = model.config
        attention = 12 * c.n_layers * c.n_heads * c.head_dim * 32
        matmul = model.num_params(non_embedding=True) + (c.vocab_size * c.dim if tie else 0)
        assert model.flops_per_token(32) == 6 * matmul + attention
        apply_lora(model, LoRAConfig(rank=4))
        adapter = sum(p.numel() for p in lora_parameters(model))
        assert model.flops_per_token(32) == 4 * (matmul + adapter) + 2 * adapter + attention


def test_lora_training_lowers_the_loss():
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, target_modules=ALL))
    base_w = model.layers[0].attention.wq.weight.clone()
    losses = train_steps(model, steps=10)
    assert losses[-1] < losses[0] - 0.1
    assert torch.equal(model.layers[0].attention.wq.weight, base_w)  # the base never moves


# ---------------------------------------------------------------- save / load

def test_adapters_added_to_an_eval_model_do_not_drop_out(tmp_path):
    """A dropout adapter loaded or added into a model in eval mode scores deterministically (an evaluation
    right after load_adapter used to run with the new adapter's dropout on)."""
    base = tiny().eval()
    trained = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, dropout=0.5))
    randomize_b(trained)
    save_adapter(trained, tmp_path / "ad")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), loaded(x), atol=0, rtol=0)
        torch.testing.assert_close(loaded(x), trained.eval()(x), atol=0, rtol=0)
    add_adapter(loaded, "second", LoRAConfig(rank=4, dropout=0.5))
    assert not any(m.training for m in loaded.modules())
    set_active_adapter(loaded, DEFAULT)
    loaded.train()  # and training still drops out
    assert not torch.equal(loaded(x), loaded(x))


def test_save_load_adapter_roundtrip_with_head(tmp_path):
    base = tiny()
    model = apply_lora(Classifier(copy.deepcopy(base)), LoRAConfig(rank=4, target_modules=ALL, trainable=["head"]))
    randomize_b(model)
    with torch.no_grad():
        model.head.weight.normal_()
    x = tokens()
    want = model(x)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["lora"]["trainable"] == ["head"] and meta["trainable_weights"] == ["head.bias", "head.weight"]
    fresh = Classifier(copy.deepcopy(base))  # same base weights, a new random head
    load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_save_merged_and_both(tmp_path):
    base = tiny()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, target_modules=ALL))
    train_steps(model, steps=3)
    x = tokens()
    want = model(x)
    save_lora(model, tmp_path / "both", adapter=True, merged=True)
    plain = load_checkpoint(tmp_path / "both")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert isinstance(plain.layers[0].attention.wq, nn.Linear)
    torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=0)
    again = load_adapter(copy.deepcopy(base), tmp_path / "both")
    torch.testing.assert_close(again(x), want, atol=0, rtol=0)
    assert isinstance(model.layers[0].attention.wq, LoRALinear)  # saving merged left the model as it was
    unloaded = merge_and_unload(model)
    torch.testing.assert_close(unloaded(x), want, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in unloaded.parameters())


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(tiny(), tmp_path / "nowhere")
    model = apply_lora(tiny(), LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(CheckpointError, match="adapter.safetensors.*shape"):
        load_adapter(tiny(dim=64, n_heads=4), tmp_path / "ad")
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(tiny(n_layers=3), tmp_path / "ad")
    with pytest.raises(ConfigError, match="'wz'"):
        apply_lora(tiny(), LoRAConfig(target_modules=["wz"]))
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="unknown LoRA config key"):
        LoRAConfig.from_dict({"rnak": 4})


def test_merging_a_tied_output_is_refused():
    model = apply_lora(tiny(tie_embeddings=True), LoRAConfig(target_modules=["output"]))
    assert model.output.weight is model.tok_embeddings.weight
    with pytest.raises(ConfigError, match="tied"):
        merge_lora(model)


# ---------------------------------------------------------------- named adapters on one base

def test_switching_named_adapters(tmp_path):
    base = tiny()
    model = copy.deepcopy(base)
    add_adapter(model, "qa", LoRAConfig(rank=4, target_modules=["wq", "wv"]))
    randomize_b(model)
    add_adapter(model, "mcq", LoRAConfig(rank=2, target_modules=["w1", "w2"]))
    with torch.no_grad():
        for layer in model.layers:
            layer.feed_forward.w2.lora_b["mcq"].weight.normal_(0, 0.1)
    x = tokens()
    out_mcq = model(x)
    set_active_adapter(model, "qa")
    out_qa = model(x)
    assert not torch.allclose(out_qa, out_mcq, atol=1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".qa." in n for n in trainable)
    set_active_adapter(model, "mcq")
    torch.testing.assert_close(model(x), out_mcq, atol=0, rtol=0)
    set_active_adapter(model, None)
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    set_active_adapter(model, "qa")
    merge_lora(model)  # switching a merged model re-merges with the new adapter
    set_active_adapter(model, "mcq")
    assert model.layers[0].feed_forward.w2.merged == "mcq" and model.layers[0].attention.wq.merged is None
    torch.testing.assert_close(model(x), out_mcq, atol=1e-5, rtol=0)
    unmerge_lora(model)
    # save one by name, reload it onto a fresh base under another name
    save_adapter(model, tmp_path / "qa", name="qa")
    other = load_adapter(copy.deepcopy(base), tmp_path / "qa", name="task")
    torch.testing.assert_close(other(x), out_qa, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="already exists"):
        add_adapter(model, "qa", LoRAConfig())
    with pytest.raises(ConfigError, match="unknown adapter"):
        set_active_adapter(model, "nope")


def test_adapters_per_row_equal_each_adapter_alone():
    """One forward over rows that ask for different adapters (a server's mixed batch) gives each row what
    the model with that adapter active gives it alone."""
    model = tiny()
    add_adapter(model, "a", LoRAConfig(rank=4, target_modules=["wq", "wv", "w2"]))
    add_adapter(model, "b", LoRAConfig(rank=2, target_modules=["wq", "w1", "output"]))
    randomize_b(model)
    x = tokens(B=5)
    names = ["a", None, "b", "a", "b"]
    with torch.no_grad(), adapters_per_row(model, names):
        mixed = model(x)
    for i, name in enumerate(names):
        set_active_adapter(model, name)
        torch.testing.assert_close(mixed[i], model(x[i : i + 1])[0], atol=1e-5, rtol=0)
    set_active_adapter(model, "a")
    with torch.no_grad():
        alone = model(x)
    set_active_adapter(model, "b")  # the active adapter is ignored inside the block
    with torch.no_grad(), adapters_per_row(model, ["a"] * 5):  # one group covering every row: no gather
        assert model.layers[0].attention.wq.row_groups == [("a", None)]
        torch.testing.assert_close(model(x), alone, atol=0, rtol=0)
    assert model.layers[0].attention.wq.row_groups is None
    head = Classifier(tiny())
    add_adapter(head, "h", LoRAConfig(rank=2, trainable=["head"]))
    with pytest.raises(ConfigError, match="cannot share a batch"), adapters_per_row(head, ["h"]):
        pass


def test_each_adapter_keeps_its_own_head():
    model = Classifier(tiny())
    add_adapter(model, "a", LoRAConfig(rank=2, trainable=["head"]))
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    add_adapter(model, "b", LoRAConfig(rank=2, trainable=["head"]))
    with torch.no_grad():
        model.head.weight.fill_(2.0)
    set_active_adapter(model, "a")
    assert torch.all(model.head.weight == 1.0)
    assert torch.all(lora_state_dict(model, "b")["head.weight"] == 2.0)
    set_active_adapter(model, "b")
    assert torch.all(model.head.weight == 2.0)


# ---------------------------------------------------------------- peft interop

def test_rope_permutation_roundtrip():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(to_interleaved(to_rotate_half(w, 4), 4), w)
    # one head of size 4: interleaved pairs (x0 y0 x1 y1) -> halves (x0 x1 y0 y1)
    assert to_rotate_half(torch.arange(4.0)[:, None], 1).flatten().tolist() == [0, 2, 1, 3]


def hf_llama(tie: bool = False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )
    torch.manual_seed(3)
    return transformers.LlamaForCausalLM(cfg).eval()


def lmlab_from_hf(hf, folder) -> Transformer:
    """The transformers model saved, then read back by lmlab's own HF loader (q/k rows permuted)."""
    hf.save_pretrained(str(folder))
    config, state = load_hf(folder)
    return build_model(config, state, str(folder))


def test_base_parity_with_transformers(tmp_path):
    hf = hf_llama()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(lmlab_from_hf(hf, tmp_path / "hf")(x), hf(x).logits, atol=1e-4, rtol=0)


def test_export_to_peft_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_llama()
    model = apply_lora(lmlab_from_hf(hf, tmp_path / "hf"), LoRAConfig(rank=4, alpha=8, target_modules=ALL))
    train_steps(model, steps=4)
    x = tokens()
    want = model(x)
    with torch.no_grad():
        assert not torch.allclose(want, hf(x).logits, atol=1e-3)  # the trained adapter matters
    export_peft(model, tmp_path / "peft", base_model_name_or_path="tiny-llama")
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert meta["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = peft_model(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_import_from_peft_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_llama(tie=True)  # SmolLM2-style tied head
    model = lmlab_from_hf(hf, tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random B: the adapter really changes the output
    peft_model = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    x = tokens()
    with torch.no_grad():
        want = peft_model(x).logits
    assert not torch.allclose(want, hf(x).logits, atol=1e-3)
    import_peft(model, tmp_path / "peft", name="from_hf")
    torch.testing.assert_close(model(x), want, atol=1e-4, rtol=0)
    # and back out again: lmlab -> peft reproduces the very same tensors
    export_peft(model, tmp_path / "again")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_options_lmlab_lacks_are_errors(tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_llama()
    peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(lmlab_from_hf(hf, tmp_path / "hf"), tmp_path / "dora")


def test_peft_export_refuses_what_hf_cannot_hold(tmp_path):
    model = apply_lora(Classifier(tiny()), LoRAConfig(trainable=["head"]))
    with pytest.raises(ConfigError, match="Transformer itself"):
        export_peft(model, tmp_path / "x")
    with pytest.raises(ConfigError, match="trainable"):
        export_peft(apply_lora(tiny(), LoRAConfig(trainable=["norm"])), tmp_path / "x")
    gpt2 = tiny(norm="layernorm", pos="learned", mlp="gelu", gelu_approximate="tanh", qkv_bias=True,
                out_bias=True, mlp_bias=True, tie_embeddings=True, n_kv_heads=4)
    with pytest.raises(ConfigError, match="Llama-family"):
        export_peft(apply_lora(gpt2), tmp_path / "x")
