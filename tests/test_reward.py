"""Reward models: the Bradley-Terry loss (hand-computed, TRL's RewardTrainer on the same scores), the head on
the last real token (transformers' sequence classifier; with pad == eos the closing EOS is read), a tiny run
that learns its pairs, saving with the head and `lmlab reward score`."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from helpers import hh_pairs, tiny_smol, val_rows
from torch import nn

from lmlab.cli import main
from lmlab.data.preference import PreferenceFormat, collate_pairs, encode_pairs, parse_pair
from lmlab.model.heads import SequenceClassifier
from lmlab.model.transformer import Transformer
from lmlab.schema.load import load_config
from lmlab.schema.reward import RewardConfig
from lmlab.tasks.reward import load_reward_model, run_reward, score_file
from lmlab.train.preference import bradley_terry_losses, reward_loss
from lmlab.weights.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tok(smol_tok):
    return smol_tok


def tiny(seed: int = 0) -> Transformer:
    return tiny_smol(seed=seed)


class FixedScores(nn.Module):
    """A stand-in reward model returning given scores (both APIs: lmlab's lengths=, transformers' **inputs)."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def forward(self, *args, **kwargs):
        return SimpleNamespace(logits=self.scores[:, None]) if "attention_mask" in kwargs else self.scores[:, None]


def test_bradley_terry_equals_hand_computed_values():
    chosen, rejected, margin = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), torch.tensor([0.5, 0.0])
    # -log s(1 - 0 - 0.5) + 0.01 (1 + 0)^2 and -log s(-0.5 - 0.5) + 0.01 (-0.5 + 0.5)^2
    torch.testing.assert_close(bradley_terry_losses(chosen, rejected, margin, 0.01),
                               torch.tensor([0.4840769842, 1.3132616875]))
    torch.testing.assert_close(bradley_terry_losses(chosen, rejected), torch.tensor([0.3132616875, 1.3132616875]))


@pytest.mark.slow
def test_reward_loss_equals_trl_reward_trainer_on_the_same_scores():
    trl = pytest.importorskip("trl", reason="TRL parity needs trl (the test extra installs it)")
    scores = torch.tensor([2.0, -1.0, 0.5, 0.3, 1.5, 0.7])  # 3 chosen, then 3 rejected
    margin = torch.tensor([0.5, 0.0, 1.0])
    ids = torch.ones(6, 4, dtype=torch.long)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=0.01),
                              accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    theirs = trl.RewardTrainer.compute_loss(trainer, FixedScores(scores),
                                            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "margin": margin})
    batch = {"input_ids": ids, "lengths": torch.full((6,), 4), "margin": margin}
    out = reward_loss(FixedScores(scores), batch, center=0.01)
    torch.testing.assert_close(out.loss / out.count, theirs)
    m = trainer._metrics["train"]
    for name in ("accuracy", "margin", "mean_reward"):
        assert float(out.metrics[name]) / out.count == pytest.approx(m[name][0]), name


def test_head_reads_the_last_real_token_as_transformers_and_the_closing_eos(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    from lmlab.weights.hf import save_hf

    backbone = tiny()
    model = SequenceClassifier(backbone, 1, dropout=0.0, bias=False).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    rows = [[5, 17, 99, 400, 12], [7, 8, 9]]
    ids = torch.tensor([rows[0], rows[1] + [0, 0]])  # padded with 0, a token no row ends on
    lengths = torch.tensor([5, 3])
    ours = model(ids, lengths=lengths).squeeze(-1)
    masked = model(ids, (torch.arange(5)[None] < lengths[:, None]).long()).squeeze(-1)
    torch.testing.assert_close(ours, masked, atol=1e-5, rtol=0)
    save_hf(backbone, tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), num_labels=1,
                                                                         pad_token_id=0, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.score.weight.copy_(model.head.weight)
        torch.testing.assert_close(hf(input_ids=ids).logits.squeeze(-1), ours, atol=1e-4, rtol=0)
    # with pad == eos (SmolLM2) the EOS that closes a response is read, padding after it is not
    pair = encode_pairs([parse_pair({"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go."}, "f:1")],
                        PreferenceFormat(tok)).pairs[0]
    assert pair.chosen[-1] == tok.eos_id == tok.pad_id
    batch = collate_pairs([pair], tok.pad_id)
    together = model(batch["input_ids"], lengths=batch["lengths"]).squeeze(-1)
    alone = model(torch.tensor([pair.prompt + pair.rejected])).squeeze(-1)  # the shorter row, unpadded
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)


def _overrides(tmp_path, data, extra=()) -> list[str]:
    return [f"out_dir={tmp_path / 'rm'}", f"model.spec={tmp_path / 'base'}", f"data.paths=[{json.dumps(str(data))}]",
            "data.max_len=96", "data.max_prompt_len=48", "data.split=[6,1,1]", "train.batch_size=2",
            "train.grad_accum=2", "precision.dtype=fp32", "logging.progress=false", "logging.log_every=1",
            "schedule.warmup_steps=0", *extra]


@pytest.mark.slow
def test_tiny_reward_run_learns_saves_its_head_and_scores_files(tmp_path, tok, shared_data, capsys):
    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = hh_pairs(shared_data, tmp_path, 16)
    cfg = load_config(None, _overrides(tmp_path, data, ["train.max_steps=18", "optim.lr=3e-3", "reward.center=0.01"]),
                      schema=RewardConfig)
    s = run_reward(cfg)
    run = tmp_path / "rm"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split", "train") == "train" and "accuracy" in r]
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and train[0]["accuracy"] == 0  # the zero head
    assert train[-1]["loss"] < 0.6 and train[-1]["accuracy"] >= 0.75  # from ln 2 and 0
    val = next(r for r in rows if r.get("split") == "val")
    assert {"loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"} <= set(val)
    assert set(s["test"]) >= {"accuracy", "margin", "mean_reward", "min_reward", "max_reward", "shorter_response_baseline"}
    for name in ("reward_model.json", "adapter/adapter.safetensors", "test-scores.jsonl", "pairs/test.jsonl",
                 "plots/accuracy.png"):
        assert (run / name).is_file(), name
    assert "head.weight" in json.loads((run / "adapter/adapter_config.json").read_text())["trainable_weights"]
    # reloaded with its head, it gives the same scores; `lmlab reward score` reproduces the test split's
    saved = [json.loads(x) for x in (run / "test-scores.jsonl").read_text().splitlines()]
    scorer = load_reward_model(run, dtype="fp32")
    again = score_file(run, run / "pairs" / "test.jsonl", tmp_path / "scores.jsonl", dtype="fp32")
    assert again["accuracy"]["value"] == s["test"]["accuracy"]["value"]
    scored = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    for a, b in zip(saved, scored):
        assert a["chosen"] == pytest.approx(b["chosen"], abs=1e-4) and a["rejected"] == pytest.approx(b["rejected"], abs=1e-4)
    completions = tmp_path / "completions.jsonl"
    test = [json.loads(x) for x in (run / "pairs" / "test.jsonl").read_text().splitlines()]
    completions.write_text("".join(json.dumps({"prompt": t["prompt"], "completion": t["chosen"]}) + "\n" for t in test))
    single = scorer.score([(t["prompt"], t["chosen"]) for t in test])
    assert single.tolist() == pytest.approx([a["chosen"] for a in saved], abs=1e-4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["reward", "score", str(run), "--data", str(completions), "--out", str(tmp_path / "c.jsonl"),
              "--dtype", "fp32"])
    assert done.value.code == 0 and json.loads(capsys.readouterr().out)["kind"] == "completions"
    assert [json.loads(x)["reward"] for x in (tmp_path / "c.jsonl").read_text().splitlines()] == pytest.approx(
        single.tolist(), abs=1e-4)


def test_checkpoint_best_keeps_the_step_with_the_best_validation_accuracy(tmp_path, tok, shared_data):
    """With checkpoint.best the saved model (and its test scores) is the evaluated step whose validation
    accuracy was highest, the first such step on ties: scored again, the saved model gives that accuracy."""
    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = hh_pairs(shared_data, tmp_path, 48)
    s = run_reward(load_config(None, _overrides(tmp_path, data, [
        "train.max_steps=12", "train.eval_every=2", "checkpoint.best=true", "checkpoint.every=0", "optim.lr=1e-2"]),
        schema=RewardConfig))
    run = tmp_path / "rm"
    val = val_rows(run)
    assert [r["step"] for r in val] == [2, 4, 6, 8, 10, 12]
    best = max(r["accuracy"] for r in val)
    chosen = next(r for r in val if r["accuracy"] == best)
    assert s["train"]["kept_step"] == chosen["step"] == s["train"]["best"]["step"]  # (step 4 of 12 here)
    assert s["train"]["best"] == {"metric": "val.accuracy", "value": best, "step": chosen["step"]}
    again = score_file(run, run / "pairs" / "val.jsonl", dtype="fp32")  # the saved model is that step's
    assert again["accuracy"]["value"] == pytest.approx(best, abs=1e-9)
    assert again["margin"]["value"] == pytest.approx(chosen["margin"], abs=1e-5)
    assert chosen is val[-1] or chosen["margin"] != pytest.approx(val[-1]["margin"], abs=1e-5)  # not the last step's
    saved = [json.loads(x) for x in (run / "test-scores.jsonl").read_text().splitlines()]
    rescored = score_file(run, run / "pairs" / "test.jsonl", dtype="fp32")
    assert rescored["accuracy"]["value"] == s["test"]["accuracy"]["value"]
    assert len(saved) == rescored["accuracy"]["n"]


def test_full_reward_model_saves_weights_and_head(tmp_path, tok, shared_data):
    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = hh_pairs(shared_data, tmp_path, 8)
    s = run_reward(load_config(None, _overrides(tmp_path, data, ["train.max_steps=2", "reward.method=full",
                                                                 "optim.lr=1e-2"]), schema=RewardConfig))
    run = tmp_path / "rm"
    assert (run / "model").is_dir() and (run / "head.safetensors").is_file()
    saved = json.loads((run / "test-scores.jsonl").read_text().splitlines()[0])
    again = score_file(run, run / "pairs" / "test.jsonl", dtype="fp32")
    assert again["mean_reward"] == pytest.approx((saved["chosen"] + saved["rejected"]) / 2, abs=1e-4)
    assert s["train"]["trainable_params"] > 100_000  # every weight trained


def test_score_usage_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["reward", "score", str(tmp_path)])
    assert err.value.code == 1 and "usage: lmlab reward score RUN_DIR --data FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["reward", "score", str(tmp_path), "--data", str(tmp_path / "x.jsonl")])
    assert err.value.code == 1 and "no reward_model.json" in capsys.readouterr().err
