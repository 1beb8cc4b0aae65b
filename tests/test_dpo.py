"""DPO: the losses (hand-computed values, TRL's DPOTrainer on the same batch), completion log-probs (masks
from lengths: with pad == eos the closing EOS counts), the three references agreeing (disabled adapters, a
frozen copy, precomputed and cached), preference data (TRL and HH-RLHF formats, truncation, the split),
bad input (one error naming the file and line, nothing written over an earlier run) and a tiny run."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch
from helpers import hh_pairs, tiny_smol, val_rows
from safetensors.torch import load_file

from lmlab.adapters.lora import apply_lora, lora_modules
from lmlab.cli import main
from lmlab.data.preference import (
    Pair,
    PairBatches,
    PreferenceFormat,
    collate_pairs,
    encode_pairs,
    hh_messages,
    parse_pair,
    read_pairs,
    split_pairs,
)
from lmlab.errors import ConfigError, DataError
from lmlab.model.transformer import Transformer
from lmlab.precision import Precision
from lmlab.schema.dpo import DPOConfig, DPOLoRA
from lmlab.schema.load import load_config
from lmlab.tasks.dpo import run_dpo
from lmlab.train.losses import linear_token_logprobs
from lmlab.train.preference import (
    DPOSettings,
    ReferenceCache,
    dpo_loss,
    dpo_pair_losses,
    frozen_reference,
    lora_reference,
    model_fingerprint,
    pair_logps,
    sequence_logps,
)
from lmlab.weights.checkpoint import save_checkpoint

CPU = Precision(torch.device("cpu"), "fp32")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tok(smol_tok):
    return smol_tok


def tiny(seed: int = 0) -> Transformer:
    return tiny_smol(seed=seed)


def conv(prompt: str, chosen: str, rejected: str, where: str = "") -> Pair:
    a = lambda t: [{"role": "assistant", "content": t}]
    return Pair([{"role": "user", "content": prompt}], a(chosen), a(rejected), where)


PAIRS = [conv("What is 2 + 2?", "4.", "Five, I think."), conv("Name a colour.", "Blue.", "A car."),
         conv("Say hi.", "Hi!", "No."), conv("Is ice cold?", "Yes, it is frozen water.", "No.")]


@pytest.fixture(scope="module")
def encoded(tok):
    return encode_pairs(PAIRS, PreferenceFormat(tok, max_len=128, max_prompt_len=64)).pairs


def lora_model(seed: int = 0) -> Transformer:
    """A tiny model with an adapter whose B is not zero, so policy and reference differ."""
    model = tiny(seed)
    apply_lora(model, DPOLoRA(), name="dpo")
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_b["dpo"].weight.normal_(0, 0.5)
    return model


# ---------------------------------------------------------------------------------------------------- losses

PC, PR = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])  # policy log-probs: chosen, rejected
RC, RR = torch.tensor([-11.0, -19.0]), torch.tensor([-11.5, -16.0])  # reference
# log-ratio margins h = (pc - rc) - (pr - rr) = [1.5, -2.0]; beta h = [0.15, -0.2]


def test_losses_equal_hand_computed_values():
    loss = partial(dpo_pair_losses, PC, PR, RC, RR, beta=0.1)
    # sigmoid: -log s(beta h) = log(1 + exp(-beta h))
    torch.testing.assert_close(loss(kind="sigmoid"), torch.tensor([0.6209570478, 0.7981388694]))
    # cDPO: 0.9 log(1 + e^-0.15) + 0.1 log(1 + e^0.15), and for the second pair with -0.2
    torch.testing.assert_close(loss(kind="sigmoid", label_smoothing=0.1), torch.tensor([0.6359570478, 0.7781388694]))
    # hinge: max(0, 1 - beta h)
    torch.testing.assert_close(loss(kind="hinge"), torch.tensor([0.85, 1.2]))
    # ipo: log-ratios per token, h = 1/4 - (-0.5)/2 = 0.5 and -1/5 - 1/10 = -0.3; (h - 1/(2 beta))^2
    ipo = loss(kind="ipo", chosen_tokens=torch.tensor([4, 5]), rejected_tokens=torch.tensor([2, 10]))
    torch.testing.assert_close(ipo, torch.tensor([20.25, 28.09]))
    with pytest.raises(ConfigError, match="dpo.loss='kto'"):
        loss(kind="kto")


def test_objective_metrics_are_sums_under_trl_names(tok, encoded):
    model = tiny()
    batch = collate_pairs(encoded, tok.pad_id, ref_logps=torch.tensor([[-30.0, -31.0]] * len(encoded)))
    out = dpo_loss(model, batch, settings=DPOSettings(beta=0.5, sft_weight=0.3))
    logps, n = sequence_logps(model, batch)
    pc, pr = logps.chunk(2)
    chosen, rejected = 0.5 * (pc + 30), 0.5 * (pr + 31)
    sigmoid = -torch.nn.functional.logsigmoid(chosen - rejected)
    nll = -pc / n.chunk(2)[0]
    assert out.count == len(encoded) and out.tokens == int(batch["lengths"].sum())
    torch.testing.assert_close(out.loss, (sigmoid + 0.3 * nll).sum())
    m = out.metrics
    torch.testing.assert_close(m["rewards/chosen"], chosen.sum())
    torch.testing.assert_close(m["rewards/rejected"], rejected.sum())
    torch.testing.assert_close(m["rewards/margins"], (chosen - rejected).sum())
    assert int(m["rewards/accuracies"]) == int((chosen > rejected).sum())
    torch.testing.assert_close(m["logps/chosen"], pc.sum())
    torch.testing.assert_close(m["logps/rejected"], pr.sum())
    torch.testing.assert_close(m["sft/nll"], nll.sum())


def test_per_row_fused_logprobs_equal_the_direct_path_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    weights = torch.randn(37)  # per-row upstream gradients, as a DPO pair weighs its tokens
    fused = linear_token_logprobs(hidden, head, targets, chunk_elems=300 * 8)  # several chunks
    (fused * weights).sum().backward()
    g_fused = hidden.grad.clone()
    hidden.grad = None
    direct = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    (direct * weights).sum().backward()
    torch.testing.assert_close(fused, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_fused, hidden.grad, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- log-probs

def test_completion_logprobs_count_the_closing_eos_when_pad_is_eos(tok, encoded):
    assert tok.pad_id == tok.eos_id  # SmolLM2: pad == eos == <|im_end|>
    model = tiny().eval()
    for p in encoded:
        assert p.chosen[-1] == tok.eos_id and p.rejected[-1] == tok.eos_id  # each response closes with it
    batch = collate_pairs(encoded, tok.pad_id)
    assert (batch["input_ids"] == tok.eos_id).sum() > 2 * len(encoded)  # right padding adds more of the same id
    logps, counts = sequence_logps(model, batch)
    rows = [p.prompt + p.chosen for p in encoded] + [p.prompt + p.rejected for p in encoded]
    responses = [p.chosen for p in encoded] + [p.rejected for p in encoded]
    with torch.no_grad():
        for r, (row, response) in enumerate(zip(rows, responses)):
            logp = torch.log_softmax(model(torch.tensor([row]))[0], -1)  # each row alone, no padding
            start = len(row) - len(response)
            want = sum(logp[t - 1, row[t]] for t in range(start, len(row)))  # every response token, EOS included
            assert counts[r] == len(response)
            torch.testing.assert_close(logps[r], want, atol=1e-4, rtol=0)


def test_chosen_and_rejected_go_through_one_forward_pass(tok, encoded):
    model = tiny()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    dpo_loss(model, collate_pairs(encoded, tok.pad_id), settings=DPOSettings(), reference=frozen_reference(tiny(1)))
    assert calls == [(2 * len(encoded), calls[0][1])]  # the policy's one call, all 2B rows (the reference is another model)


# ---------------------------------------------------------------------------------------------------- references

def test_disabled_adapters_equal_a_frozen_copy_and_precomputed_equals_on_the_fly(tok, encoded):
    policy = lora_model()
    base = tiny()  # the same seed: the very weights the adapters sit on
    batch = collate_pairs(encoded, tok.pad_id)
    via_lora = lora_reference(policy)(batch)
    via_copy = frozen_reference(copy.deepcopy(base))(batch)
    torch.testing.assert_close(via_lora, via_copy, atol=1e-6, rtol=0)
    assert not torch.allclose(sequence_logps(policy, batch)[0], via_lora, atol=1e-3)  # the adapter matters
    precomputed = pair_logps(base, encoded, batch_size=3, pad_id=tok.pad_id, precision=CPU)  # other batches
    torch.testing.assert_close(torch.cat([precomputed[:, 0], precomputed[:, 1]]), via_lora, atol=1e-5, rtol=0)
    # and the objective gives the same loss from either
    s = DPOSettings()
    on_the_fly = dpo_loss(policy, batch, settings=s, reference=lora_reference(policy))
    cached = dpo_loss(policy, collate_pairs(encoded, tok.pad_id, precomputed), settings=s)
    torch.testing.assert_close(on_the_fly.loss, cached.loss, atol=1e-5, rtol=0)


def test_reference_cache_is_reused_and_invalidated(tmp_path, tok, encoded):
    calls = []

    def compute(model, pairs):
        calls.append(len(pairs))
        return pair_logps(model, pairs, 4, tok.pad_id, CPU)

    model = tiny()
    cache = ReferenceCache(tmp_path, model_fingerprint(model), CPU, {"template": "auto"})
    first, hit = cache.load_or_compute(encoded, lambda: compute(model, encoded))
    assert not hit and calls == [4] and cache.path(encoded).is_file()
    again = ReferenceCache(tmp_path, model_fingerprint(tiny()), CPU, {"template": "auto"})  # a later run
    second, hit = again.load_or_compute(encoded, lambda: compute(model, encoded))
    assert hit and calls == [4] and torch.equal(first, second)
    fewer = encoded[:3]  # the data changed
    assert not again.load_or_compute(fewer, lambda: compute(model, fewer))[1]
    other = tiny(seed=1)  # the model changed
    changed = ReferenceCache(tmp_path, model_fingerprint(other), CPU, {"template": "auto"})
    logps, hit = changed.load_or_compute(encoded, lambda: compute(other, encoded))
    assert not hit and not torch.allclose(logps, first)
    template = ReferenceCache(tmp_path, model_fingerprint(model), CPU, {"template": "plain"})  # the template changed
    assert template.path(encoded) != cache.path(encoded)
    assert calls == [4, 3, 4]


# ---------------------------------------------------------------------------------------------------- data

def test_hh_rlhf_file_pairs_and_the_seeded_split(shared_data):
    read = read_pairs([shared_data / "hh-rlhf-harmless-base" / "test.jsonl"])
    assert len(read.pairs) == 2307 and dict(read.skipped) == {"prompt_mismatch": 5}
    assert [int(w.rsplit(":", 1)[1]) for w in read.skipped_where] == [1255, 1689, 1951, 1953, 2037]
    first = read.pairs[0]
    assert first.prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.chosen[0]["content"].startswith("No, sorry!  All of these involve a pen")
    splits = split_pairs(read.pairs, (8, 1, 1), 42)
    assert [len(v) for v in splits.values()] == [1846, 231, 230]
    again = split_pairs(read_pairs([shared_data / "hh-rlhf-harmless-base" / "test.jsonl"]).pairs, (8, 1, 1), 42)
    assert [p.where for p in again["test"]] == [p.where for p in splits["test"]]


def test_formats_trl_standard_conversational_implicit_and_hh():
    std = parse_pair({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "f:1")
    assert (std.prompt, std.chosen, std.rejected) == ("The sky is", " blue.", " green.")
    u, a = {"role": "user", "content": "Hi"}, lambda t: {"role": "assistant", "content": t}
    implicit = parse_pair({"chosen": [u, a("Hello!")], "rejected": [u, a("Go away.")], "margin": 2}, "f:2")
    assert implicit.prompt == [u] and implicit.chosen == [a("Hello!")] and implicit.margin == 2.0
    hh = parse_pair({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}, "f:3")
    assert hh.prompt == [{"role": "user", "content": "Hi"}] and hh.rejected == [a("No.")]
    assert hh_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', "chosen and rejected are identical"),
    (b'{"prompt": "  ", "chosen": "a", "rejected": "b"}', "empty prompt"),
    (b'{"chosen": "\\n\\nHuman:  \\n\\nAssistant: a", "rejected": "\\n\\nHuman:  \\n\\nAssistant: b"}', "empty prompt"),
    (b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}', "not UTF-8"),
    (b'{"prompt": "p", "chosen": 3, "rejected": "b"}', "must be a string or a list of chat messages"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b"', "not valid JSON"),
])
def test_bad_lines_are_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n' + line + b"\n")
    with pytest.raises(DataError, match=rf"pairs.jsonl:3: .*{message}"):
        read_pairs([path])


def test_truncation_keeps_the_prompt_end_and_the_responses_start(tok):
    long = conv("one two three four five six seven eight nine ten " * 8 + "Final question?", "A " * 80, "B " * 80)
    fmt = PreferenceFormat(tok, max_len=64, max_prompt_len=24)
    data = encode_pairs([long], fmt)
    p = data.pairs[0]
    full_prompt = fmt.encode_prompt(long.prompt)
    assert p.prompt == full_prompt[-24:] and tok.decode(p.prompt).endswith("Final question?<|im_end|>\n<|im_start|>assistant\n")
    assert p.chosen == fmt.encode_response(long.prompt, long.chosen)[:40] and len(p.rejected) == 40
    assert (data.truncated_prompts, data.truncated_responses) == (1, 1)
    # with no prompt budget, a prompt that fills max_len leaves no completion token: an error naming the line
    long.where = "data.jsonl:7"
    with pytest.raises(DataError, match="data.jsonl:7: no completion token left"):
        encode_pairs([long], PreferenceFormat(tok, max_len=64, max_prompt_len=0))
    with pytest.raises(ConfigError, match="max_prompt_len=64 must be below"):
        PreferenceFormat(tok, max_len=64, max_prompt_len=64)


def test_plain_pairs_get_eos_and_batches_put_chosen_first(tok):
    pairs = [parse_pair({"prompt": "The sky is", "chosen": " blue.", "rejected": " very green."}, "f:1")]
    enc = encode_pairs(pairs, PreferenceFormat(tok)).pairs[0]
    assert enc.chosen == tok.encode(" blue.") + [tok.eos_id]
    batch = collate_pairs([enc], tok.pad_id)
    assert batch["input_ids"][0, : batch["lengths"][0]].tolist() == enc.prompt + enc.chosen
    assert batch["input_ids"][1, : batch["lengths"][1]].tolist() == enc.prompt + enc.rejected
    assert batch["prompt_lens"].tolist() == [len(enc.prompt)] * 2


def test_pair_batches_are_reproducible_and_cover_each_epoch(tok, encoded):
    from lmlab.data.preference import PreferenceData

    data = PreferenceData(encoded * 3)  # 12 pairs, 3 steps of 2 x 2 per epoch
    a, b = PairBatches(data, 2, 2, 7, tok.pad_id), PairBatches(data, 2, 2, 7, tok.pad_id)
    assert all(torch.equal(a(s, m)["input_ids"], b(s, m)["input_ids"]) for s in range(4) for m in range(2))
    epoch = sorted(i for s in range(3) for i in a.step_items(s))
    assert epoch == list(range(12))


# ---------------------------------------------------------------------------------------------------- runs

def _recipe(tmp_path, data, extra=()) -> list[str]:
    return [f"out_dir={tmp_path / 'run'}", f"model.spec={tmp_path / 'base'}", f"data.paths=[{json.dumps(str(data))}]",
            "data.max_len=96", "data.max_prompt_len=48", "data.split=[6,1,1]", "train.batch_size=2",
            "train.grad_accum=2", "eval.batch_size=4", "precision.dtype=fp32", "logging.progress=false",
            "logging.log_every=1", "schedule.warmup_steps=0", *extra]


@pytest.mark.slow
def test_tiny_dpo_run_raises_reward_accuracy_on_its_training_pairs(tmp_path, tok, shared_data):
    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = hh_pairs(shared_data, tmp_path, 16)
    cfg = load_config(None, _recipe(tmp_path, data, ["train.max_steps=18", "optim.lr=3e-3"]), schema=DPOConfig)
    s = run_dpo(cfg)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split", "train") == "train" and "rewards/accuracies" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and train[0]["rewards/accuracies"] == 0
    assert train[-1]["loss"] < 0.62 and train[-1]["rewards/accuracies"] >= 0.75  # from ln 2 = 0.693 and 0
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(
        next(r for r in rows if r.get("split") == "val"))
    assert s["reference"] == {"mode": "lora-disabled"} and s["data"]["train"]["pairs"] == 12
    assert {"reference_preference"} == set(s["before"]["test"]) and "implicit_accuracy" in s["after"]["test"]
    for name in ("pairs/train.jsonl", "pairs/val.jsonl", "pairs/test.jsonl", "adapters/dpo/adapter.safetensors",
                 "adapters/dpo-peft/adapter_model.safetensors", "plots/rewards_accuracies.png", "test-logps.jsonl"):
        assert (run / name).is_file(), name
    # the written split reads back as the same pairs (any tool can re-score it)
    again = read_pairs([run / "pairs" / "test.jsonl"]).pairs
    assert [p.prompt for p in again] == [json.loads(x)["prompt"] for x in (run / "pairs/test.jsonl").read_text().splitlines()]
    # the peft folder carries the same adapter as the lmlab one
    from lmlab.adapters.files import load_adapter
    from lmlab.weights.loading import load_model

    x = torch.randint(0, 49152, (1, 10))
    outs = []
    for folder in ("dpo", "dpo-peft"):
        m = load_model(tmp_path / "base").model
        load_adapter(m, run / "adapters" / folder, name="dpo")
        outs.append(m.eval()(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    # a finished run is not trained again
    assert run_dpo(cfg)["train"]["steps"] == s["train"]["steps"]


def test_checkpoint_best_keeps_the_step_with_the_lowest_validation_loss(tmp_path, tok, shared_data):
    """With checkpoint.best the saved adapter (and the after-training test scores) is the evaluated step
    with the lowest validation DPO loss: its weights are checkpoints/best's, the first such step on ties."""
    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = hh_pairs(shared_data, tmp_path, 16)
    s = run_dpo(load_config(None, _recipe(tmp_path, data, [
        "train.max_steps=8", "train.eval_every=2", "checkpoint.best=true", "checkpoint.every=0", "optim.lr=2e-2"]),
        schema=DPOConfig))
    run = tmp_path / "run"
    val = val_rows(run)
    assert [r["step"] for r in val] == [2, 4, 6, 8]
    chosen = min(val, key=lambda r: r["loss"])
    assert s["train"]["kept_step"] == chosen["step"] == s["train"]["best"]["step"]
    best = load_file(str(run / "checkpoints" / "best" / "trainable.safetensors"))
    saved = load_file(str(run / "adapters" / "dpo" / "adapter.safetensors"))
    final = load_file(str(run / "checkpoints" / "step_0000008" / "trainable.safetensors"))
    assert len(best) == len(saved) > 0
    for key, tensor in best.items():  # (a checkpoint names the adapter: wq.lora_a.dpo.weight)
        assert torch.equal(saved[key.replace(".dpo.", ".")], tensor), key
    assert chosen is val[-1] or any(not torch.equal(final[k], t) for k, t in best.items())  # not the last step


@pytest.mark.slow
def test_precomputed_and_full_runs_use_their_references(tmp_path, tok, shared_data):
    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = hh_pairs(shared_data, tmp_path, 8)
    base = _recipe(tmp_path, data, ["train.max_steps=2", f"dpo.cache_dir={tmp_path / 'cache'}"])
    runs = {}
    for name, extra in [("lora", []), ("cached", ["dpo.precompute_reference=true"]),
                        ("again", ["dpo.precompute_reference=true"]), ("full", ["dpo.method=full"])]:
        cfg = load_config(None, base + extra, schema=DPOConfig)
        cfg.out_dir = str(tmp_path / name)
        runs[name] = run_dpo(cfg)
    assert runs["cached"]["reference"]["cache_hit"] == {"train": False, "val": False, "test": False}
    assert runs["again"]["reference"]["cache_hit"] == {"train": True, "val": True, "test": True}
    assert runs["full"]["reference"] == {"mode": "frozen-copy"} and (tmp_path / "full" / "model").is_dir()
    # at step 1 the policy is the reference whichever way it is computed: loss ln 2, the same log-probs
    firsts = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in runs]
    for r in firsts:
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert r["logps/chosen"] == pytest.approx(firsts[0]["logps/chosen"], abs=1e-4)
    for name in ("lora", "cached"):  # the same run with and without the cache: the same curve
        assert runs[name]["train"]["train_loss"] == pytest.approx(runs["lora"]["train"]["train_loss"], abs=1e-5)


def test_bad_data_is_one_line_error_and_leaves_an_earlier_run_untouched(tmp_path, tok, shared_data, capsys):
    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = hh_pairs(shared_data, tmp_path, 8)
    lines = data.read_text().splitlines()
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("train: {max_steps: 1}\n")
    args = ["dpo", str(recipe), *_recipe(tmp_path, data)]
    with pytest.raises(SystemExit) as ok:
        main(args)
    assert ok.value.code == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for bad in (b'{"prompt": "p", "chosen": "a"}', b'{"prompt": "p", "chosen": "x", "rejected": "x"}',
                b'{"prompt": "", "chosen": "a", "rejected": "b"}', b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}'):
        data.write_bytes("\n".join(lines[:4]).encode() + b"\n" + bad + b"\n")
        with pytest.raises(SystemExit) as err:
            main(args)
        message = capsys.readouterr().err.strip()
        assert err.value.code == 1 and message.count("\n") == 0 and f"{data}:5: " in message, message
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_trl_dpo_trainer_gives_the_same_loss_and_metrics(tmp_path, tok):
    trl = pytest.importorskip("trl", reason="TRL parity needs trl (the test extra installs it)")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.weights.hf import save_hf
    from lmlab.weights.loading import load_model

    save_hf(tiny(), tmp_path / "hf", tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():  # a policy that differs from its reference
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in PAIRS]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, bf16=False, gradient_checkpointing=False,
                         report_to="none", use_cpu=True, max_length=None, per_device_train_batch_size=4)
    trainer = trl.DPOTrainer(model=hf, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(str(tmp_path / "hf")))
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = trainer.data_collator(examples)
    # lmlab encodes the same responses; TRL's end one "\n" later (the template's newline after <|im_end|>)
    ours = encode_pairs(PAIRS, PreferenceFormat(tok, max_len=512, max_prompt_len=0)).pairs
    for mine, theirs in zip(ours, examples):
        assert mine.prompt == theirs["prompt_ids"] and theirs["chosen_ids"] == mine.chosen + tok.encode("\n")
    # the same token rows through both: lmlab's policy (TRL's weights, loaded back) and its frozen reference
    mask, completion = inputs["attention_mask"], inputs["completion_mask"]
    batch = {"input_ids": inputs["input_ids"], "lengths": mask.sum(1), "prompt_lens": completion.argmax(1)}
    hf.save_pretrained(tmp_path / "policy")
    policy = load_model(tmp_path / "policy").model
    reference = frozen_reference(load_model(tmp_path / "hf").model)
    trainer.model.train()
    for kind in ("sigmoid", "ipo", "hinge"):
        trainer.loss_types, trainer.loss_weights = [kind], [1.0]
        trainer._metrics["train"].clear()
        theirs = trainer._compute_loss(trainer.model, inputs, False)
        out = dpo_loss(policy, batch, settings=DPOSettings(beta=0.2, kind=kind), reference=reference)
        torch.testing.assert_close(out.loss / out.count, theirs.detach(), atol=2e-5, rtol=1e-5)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                     "logps/rejected"):
            assert float(out.metrics[name]) / out.count == pytest.approx(trainer._metrics["train"][name][0], abs=1e-4), name
