"""The GSM8K verifier: the scalar head (per-token values and pooled scores agree), the objective against a
hand computation, labelled batches, the labelled-set file, sampling + labelling, and a tiny verifier that
learns to separate right from wrong solutions on held-out problems."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmlab.data.batch import IGNORE_INDEX
from lmlab.data.verifier import (
    LabelledExample,
    Solution,
    collate_labelled,
    encode_solutions,
    read_solutions,
    write_solutions,
)
from lmlab.errors import ConfigError, DataError
from lmlab.fileio import FolderLock
from lmlab.model.config import ModelConfig
from lmlab.model.heads import ScalarHead
from lmlab.model.transformer import Transformer
from lmlab.schema.load import load_config
from lmlab.schema.verifier import VerifierConfig
from lmlab.tasks.verifier import (
    heldout_problems,
    label,
    problems,
    run_sample,
    run_train,
    sample_seeds,
    save_labelled,
)
from lmlab.train.losses import verifier_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_head(per_token: bool = True) -> ScalarHead:
    torch.manual_seed(0)
    backbone = Transformer(ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=64))
    head = ScalarHead(backbone, per_token=per_token)
    with torch.no_grad():
        head.head.weight.normal_()
        head.head.bias.fill_(0.3)
    return head.eval()


def test_scalar_head_starts_at_zero_and_pooled_equals_last_value():
    fresh = ScalarHead(Transformer(ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, max_seq_len=32)))
    assert torch.equal(fresh(torch.tensor([[1, 2, 3]])), torch.zeros(1))
    model = tiny_head()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    values = model(ids, mask)  # (B, T)
    scores = model(ids, mask, per_token=False)  # (B,)
    assert values.shape == (2, 6) and scores.shape == (2,)
    torch.testing.assert_close(scores, torch.stack([values[0, 3], values[1, 5]]))
    alone = model(ids[:1, :4], per_token=False)  # right padding changes nothing
    torch.testing.assert_close(alone, scores[:1])


def _examples() -> list[LabelledExample]:
    return [LabelledExample([3, 4, 5, 6, 7], 3, 1.0), LabelledExample([3, 4, 9, 9, 9, 9, 2], 2, 0.0),
            LabelledExample([8, 8, 8], 3, 0.0)]  # the last: an empty solution


def test_collate_marks_solution_tokens():
    tok = collate_labelled(_examples(), pad_id=0, target="token", lm=True)
    assert tok["value_mask"].tolist() == [
        [False, False, False, True, True, False, False],
        [False, False, True, True, True, True, True],
        [False, False, True, False, False, False, False]]  # empty solution: its last position
    assert tok["labels"].tolist() == [1.0, 0.0, 0.0]
    assert tok["lm_labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 3
    assert tok["lm_weight"][1].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    sol = collate_labelled(_examples(), pad_id=0, target="solution", lm=True)
    assert sol["value_mask"].sum(1).tolist() == [1, 1, 1] and bool(sol["value_mask"][1, 6])
    assert sol["lm_weight"][1].tolist() == pytest.approx([0.0] + [0.2] * 5 + [0.0])  # a 5-token solution counts once
    assert "lm_labels" not in collate_labelled(_examples(), 0)


def test_verifier_loss_against_a_hand_computation():
    model = tiny_head()
    batch = collate_labelled(_examples(), pad_id=0, target="token", lm=True)
    out = verifier_loss(model, batch, lm_coef=0.5)
    values = model(batch["input_ids"], batch["attention_mask"])
    logits = model.backbone(batch["input_ids"], batch["attention_mask"])
    value_sum, lm_sum, n, right = 0.0, 0.0, 0, 0
    for i, ex in enumerate(_examples()):
        positions = [t for t in range(len(ex.ids)) if batch["value_mask"][i, t]]
        for t in positions:
            value_sum += float(F.binary_cross_entropy_with_logits(values[i, t].detach(), torch.tensor(ex.label)))
            right += int((values[i, t] > 0) == (ex.label > 0.5))
        n += len(positions)
        for t in range(ex.n_prompt - 1, len(ex.ids) - 1):
            lm_sum += float(F.cross_entropy(logits[i, t].detach(), torch.tensor(ex.ids[t + 1])))
    assert int(out.count) == n == 8 and int(out.metrics["accuracy"]) == right
    assert float(out.metrics["value_loss"]) == pytest.approx(value_sum, rel=1e-5)
    assert float(out.metrics["lm_loss"]) == pytest.approx(lm_sum, rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(value_sum + 0.5 * lm_sum, rel=1e-4)
    sol = verifier_loss(model, collate_labelled(_examples(), 0, "solution", lm=True), lm_coef=1.0)
    assert int(sol.count) == 3  # one unit per solution; its LM term is that solution's mean token loss
    mean_lm = sum(float(F.cross_entropy(logits[i, ex.n_prompt - 1 : len(ex.ids) - 1], torch.tensor(ex.ids[ex.n_prompt:])))
                  for i, ex in enumerate(_examples()) if len(ex.ids) > ex.n_prompt)
    assert float(sol.metrics["lm_loss"]) == pytest.approx(mean_lm, rel=1e-4)
    out.loss.backward()  # gradients reach the head
    assert model.head.weight.grad is not None and float(model.head.weight.grad.abs().sum()) > 0


def test_labelled_set_round_trip_and_bad_lines(tmp_path):
    rows = [Solution(3, 0, "sample", "x = 5\n#### 5", "5", "5", True), Solution(3, -1, "gold", "#### 5", "5", "5", True)]
    write_solutions(tmp_path / "s.jsonl", rows)
    assert read_solutions(tmp_path / "s.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text(json.dumps({"problem": 1}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: missing field"):
        read_solutions(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text("\n" + "{oops\n")
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        read_solutions(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="run `lmlab verifier sample` first"):
        read_solutions(tmp_path / "none.jsonl")


def test_labels_seeds_and_heldout_split(shared_data):
    assert label("so 1,080 dollars.\n#### $1,080", "1,080") == ("1080", True)
    assert label("The answer is 72.", "72") == ("72", True) and label("I give up", "72") == (None, False)
    seeds = sample_seeds(3, [0, 5, 9], 4)
    assert len({s for row in seeds for s in row}) == 12 and sample_seeds(3, [5], 4)[0] == seeds[1]
    held = heldout_problems(range(100), 0.2, 42)
    assert len(held) == 20 and held == heldout_problems(range(100), 0.2, 42) and held != heldout_problems(range(100), 0.2, 1)
    items = problems(str(shared_data / "gsm8k" / "train.jsonl"), 5, 0)
    assert len(items) == 5 and [i for i, _ in items] == sorted(i for i, _ in items)
    assert items == problems("", 5, 0)  # the shared data folder by default
    assert all(r["answers"][0] in r["output"] for _, r in items)


def _cfg(tmp_path, shared_data, *extra: str) -> VerifierConfig:
    stories = shared_data / "stories260K" / "stories260K.bin"
    return load_config(None, [f"out_dir={tmp_path / 'run'}", f"generator.spec={stories}", "generator.samples=2",
                              "generator.max_new_tokens=12", "generator.dtype=fp32", "data.problems=3",
                              "data.template=alpaca", "precision.dtype=fp32", "logging.progress=false", *extra],
                       schema=VerifierConfig)


def test_sample_labels_solutions_and_refuses_other_settings(tmp_path, shared_data, capsys):
    cfg = _cfg(tmp_path, shared_data)
    summary = run_sample(cfg)
    solutions = read_solutions(tmp_path / "run" / "samples" / "train.jsonl")
    assert summary["samples"] == 6 and summary["gold"] == 3 and len(solutions) == 9
    assert all(s.correct for s in solutions if s.source == "gold")
    for s in solutions:
        assert (s.answer, s.correct) == label(s.solution, s.reference)
    run_sample(cfg)
    assert "labelled samples exist; nothing to do" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"other settings \(generator.temperature\)"):
        run_sample(_cfg(tmp_path, shared_data, "generator.temperature=0.9"))


@pytest.mark.slow
def test_a_tiny_verifier_learns_to_tell_right_from_wrong(tmp_path, shared_data):
    """Right solutions end in the reference answer with one phrase, wrong ones in another number with another:
    after a few dozen steps the held-out problems' samples are ranked right (AUC from 0.5 at the zero head)."""
    items = sorted(problems("", 0, 7), key=lambda item: len(item[1]["question"]))[:12]  # short prompts: fast
    rows = []
    for i, rec in items:
        ref = rec["answers"][0]
        for k in range(4):
            right = k % 2 == 0
            text = f"So it is {ref}.\n#### {ref}" if right else f"I think it might be {int(ref) + 3}?\n#### {int(ref) + 3}"
            answer, correct = label(text, ref)
            assert correct == right
            rows.append(Solution(i, k, "sample", text, answer, ref, correct))
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, shared_data, "data.heldout=0.25", "train.max_steps=20", "train.batch_size=4",
               "train.grad_accum=1", "train.eval_every=10", "optim.lr=3e-3", "lora.rank=4", "lora.alpha=8",
               "data.max_len=512")
    with pytest.raises(ConfigError, match="run `lmlab verifier sample` first"):
        run_train(cfg)
    lock = FolderLock(out)  # as `verifier sample` writes them: in the locked run folder
    save_labelled(cfg, rows, {})
    lock.release()
    summary = run_train(cfg)
    assert summary["examples"]["heldout_problems"] == 3
    assert summary["heldout"]["auc"] >= 0.9
    assert (out / "verifier" / "adapter" / "adapter.safetensors").is_file()


def test_encode_keeps_the_prompt_and_cuts_the_solution(shared_data):
    from lmlab.data.instruct import Template
    from lmlab.tokenization import load_tokenizer

    tok = load_tokenizer(shared_data / "stories260K" / "tok512.model")
    records = dict(problems("", 2, 0))
    i = next(iter(records))
    sols = [Solution(i, 0, "sample", "x " * 400, None, "1", False), Solution(i, -1, "gold", "#### 1", "1", "1", True)]
    examples, cut = encode_solutions(sols, records, Template("alpaca"), tok, 600)
    assert cut == 1 and len(examples[0].ids) == 600 and examples[0].n_prompt == examples[1].n_prompt
    assert examples[1].label == 1.0 and examples[0].problem == i
    with pytest.raises(DataError, match="leaves no room for a solution"):
        encode_solutions(sols, records, Template("alpaca"), tok, 20)
