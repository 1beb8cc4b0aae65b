"""Classification: readers and their errors, zero-shot scoring against a direct computation, full and
LoRA fine-tuning that learn, head + adapter reload, prediction files, metrics, the seed's command lines."""

from __future__ import annotations

import json
import math
import random
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmlab.data.classification import (
    encode_all,
    prompt_format,
    read_label_names,
    read_pipe_file,
    read_predictions,
    read_split,
    read_table,
    to_sst2,
    truncate,
)
from lmlab.errors import DataError
from lmlab.evaluation.metrics import classification_metrics
from lmlab.evaluation.scoring import predict_logits, zero_shot_scores
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.precision import Precision
from lmlab.schema.classify import ClassifyConfig
from lmlab.schema.load import load_config
from lmlab.tasks.classify import load_classifier, run_classify
from lmlab.tokenization import CharTokenizer
from lmlab.weights.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
CPU = Precision(torch.device("cpu"), "fp32")
GOOD = ["a great film", "truly great acting", "great fun", "a great story", "great and warm", "simply great"]
BAD = ["an awful mess", "awful acting", "dull and awful", "an awful plot", "awful, just awful", "so awful"]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """A separable two-class task in the minllama format, and a tiny char-level model folder."""
    root = tmp_path_factory.mktemp("cls")
    rng = random.Random(0)
    lines = [f"1 ||| {t}" for t in GOOD for _ in range(3)] + [f"0 ||| {t}" for t in BAD for _ in range(3)]
    rng.shuffle(lines)
    (root / "train.txt").write_text("\n".join(lines) + "\n\n")  # a trailing empty line: skipped, counted
    (root / "labels.json").write_text(json.dumps(["bad", "good"]))
    chars = "".join(sorted(set("".join(GOOD + BAD) + " bad good Is this movie or? This movie is,.")))
    tok = CharTokenizer.from_text(chars)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=128))
    save_checkpoint(model, root / "tiny", tokenizer=tok)
    return {"root": root, "train": root / "train.txt", "labels": root / "labels.json", "model": root / "tiny"}


def config(task: dict[str, Path], out: Path, method: str, **train) -> ClassifyConfig:
    return load_config(None, overrides(task, out, method, **train), schema=ClassifyConfig)


def overrides(task: dict[str, Path], out: Path, method: str, **train) -> list[str]:
    return [f"out_dir={out}", f"model.spec={task['model']}", f"data.train={task['train']}",
                 f"data.dev={task['train']}", f"data.test={task['train']}", f"data.label_names={task['labels']}",
                 f"classify.method={method}", "data.max_len=64", "train.batch_size=12", "schedule.warmup_fraction=0",
                 "precision.device=cpu", "logging.progress=false", "logging.log_every=1", "classify.dropout=0.0",
                 *[f"{k}={v}" for k, v in train.items()]]


# ---------------------------------------------------------------------------------------------------- readers

def test_pipe_reader_counts_empty_lines_and_reads_labels(task, shared_data: Path) -> None:
    names = read_label_names(task["labels"])
    data = read_pipe_file(task["train"], names)
    assert len(data) == 36 and data.skipped_empty == 1 and set(data.labels) == {0, 1}
    sst = read_pipe_file(shared_data / "sst5" / "sst-dev.txt", read_label_names(shared_data / "sst5" / "sst-label-mapping.json"))
    assert len(sst) == 1101 and [sst.labels.count(c) for c in range(5)] == [139, 289, 229, 279, 165]
    assert sst.texts[0] == "It 's a lovely film with lovely performances by Buy and Accorsi ."
    sst2 = to_sst2(sst)
    assert sst2.label_names == ["negative", "positive"] and len(sst2) == 1101 - 229 and sst2.dropped == 229
    assert sst2.labels.count(0) == 139 + 289


@pytest.mark.parametrize("line, expected", [
    ("7 ||| a label outside", "bad.txt:2: label 7 is outside the mapping 0..1"),
    ("no separator here", "bad.txt:2: no '|||' separator"),
    ("x ||| not a label", "bad.txt:2: label 'x' is neither an integer nor one of"),
])
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    (tmp_path / "bad.txt").write_text(f"1 ||| fine\n{line}\n")
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace("|", r"\|")):
        read_pipe_file(tmp_path / "bad.txt", ["bad", "good"])


def test_label_names_and_tables(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text('{"0": "neg", "1": "pos"}')
    assert read_label_names(tmp_path / "l.json") == ["neg", "pos"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="bad.json: expected a JSON list of label names"):
        read_label_names(tmp_path / "bad.json")
    (tmp_path / "d.csv").write_text("review,sentiment\nnice one,pos\n,neg\nmeh,0\n")
    data = read_table(tmp_path / "d.csv", ["neg", "pos"], text_field="review", label_field="sentiment")
    assert data.texts == ["nice one", "meh"] and data.labels == [1, 0] and data.skipped_empty == 1
    (tmp_path / "d.jsonl").write_text('{"t": "ok", "y": 1}\n\n{"t": "no", "y": 5}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: label 5 is outside"):
        read_split(tmp_path / "d.jsonl", ["neg", "pos"], text_field="t", label_field="y")
    with pytest.raises(DataError, match=r"d.csv:2: no field 'text'"):
        read_table(tmp_path / "d.csv", ["neg", "pos"])


def test_truncation_is_counted_and_keeps_the_chosen_tokens(task) -> None:
    tok = CharTokenizer.from_file(task["model"] / "char_vocab.json")
    fmt = prompt_format(tok, "{text}.", max_len=6, truncation="middle")
    ids, n_cut = encode_all(tok, fmt, ["great", "awful acting"])
    assert n_cut == 1 and len(ids[1]) == 6 and tok.decode(ids[0]) == "great."
    assert truncate(list(range(10)), 4, "middle") == [0, 7, 8, 9]
    assert truncate(list(range(10)), 4, "head") == [0, 1, 2, 3] and truncate(list(range(10)), 4, "tail") == [6, 7, 8, 9]


# ---------------------------------------------------------------------------------------------------- zero-shot

def _direct_logprob(model, prompt: list[int], verbalizer: list[int]) -> float:
    """log P(verbalizer | prompt) from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + verbalizer]))[0]
    logp = F.log_softmax(logits.float(), -1)
    return sum(float(logp[len(prompt) - 1 + k, v]) for k, v in enumerate(verbalizer))


@pytest.mark.parametrize("verbalizers", [["b", "g"], [" bad", " good", " so so"]])
def test_zero_shot_scores_match_a_direct_computation(task, verbalizers) -> None:
    from lmlab.weights.loading import load_model

    loaded = load_model(task["model"])
    tok, model = loaded.tokenizer, loaded.model
    prompts = [tok.encode(t + " This movie is") for t in ["great fun", "an awful plot", "so awful"]]
    verb = [tok.encode(v) for v in verbalizers]
    scores = zero_shot_scores(model, prompts, verb, 0, batch_size=2, precision=CPU)
    direct = torch.tensor([[_direct_logprob(model, p, v) for v in verb] for p in prompts])
    torch.testing.assert_close(scores, direct, atol=1e-4, rtol=1e-4)
    assert scores.argmax(-1).tolist() == direct.argmax(-1).tolist()


def test_zero_shot_run_writes_predictions_and_metrics(task, tmp_path: Path) -> None:
    cfg = config(task, tmp_path / "zs", "zeroshot")
    result = run_classify(cfg)
    out = tmp_path / "zs"
    assert read_predictions(out / "dev-predictions.txt") == read_predictions(out / "test-predictions.txt")
    assert len(read_predictions(out / "dev-predictions.txt")) == 36 and (out / "confusion_dev.png").is_file()
    assert 0.0 <= result["dev"]["accuracy"] <= 1.0 and result["data"]["dev"]["skipped_empty_lines"] == 1
    assert "train" not in result["data"]  # zero-shot does not read the training split


# ---------------------------------------------------------------------------------------------------- training

def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


@pytest.mark.parametrize("method, lr", [("finetune", 3e-3), ("lora", 1e-2)])
def test_fine_tuning_learns_and_reloads_to_the_same_predictions(task, tmp_path: Path, method: str, lr: float) -> None:
    out = tmp_path / method
    result = run_classify(config(task, out, method, **{"optim.lr": lr, "train.epochs": 6, "classify.head_lr_mult": 3,
                                                         "data.test": "''"}))
    losses = _losses(out)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # zero-initialized head: uniform at step 0
    tail = losses[len(losses) * 3 // 4:]
    assert sorted(tail)[len(tail) // 2] < 0.5 * losses[0], losses  # median of the last quarter
    assert result["dev"]["accuracy"] >= 0.9  # dev = the training lines here: well above chance (0.5)
    lines = (out / "dev-predictions.txt").read_text().splitlines()
    assert len(lines) == 36 and all(line.split(" ||| ")[0] in ("0", "1") for line in lines)
    assert lines[0].split(" ||| ", 1)[1] == read_pipe_file(task["train"], ["bad", "good"]).texts[0]
    model, tok, fmt, meta = load_classifier(out)
    assert meta["method"] == method
    ids, _ = encode_all(tok, fmt, read_pipe_file(task["train"], ["bad", "good"]).texts)
    reloaded = predict_logits(model, ids, 0, 8, CPU).argmax(-1).tolist()
    assert reloaded == read_predictions(out / "dev-predictions.txt")
    if method == "lora":
        assert (out / "adapter" / "adapter.safetensors").is_file()
        trainable = result["train"]["trainable_params"]
        assert trainable < sum(p.numel() for p in model.parameters()) / 2


def test_seeds_give_mean_and_std(task, tmp_path: Path) -> None:
    summary = run_classify(config(task, tmp_path / "s", "lora", **{"optim.lr": 1e-2, "train.epochs": 1,
                                                                   "classify.save_model": "false", "data.test": "''"}),
                           seeds=[0, 1])
    assert summary["n"] == 2 and set(summary["dev_accuracy"]) == {"mean", "std"}
    assert (tmp_path / "s" / "seed_0" / "metrics.json").is_file() and (tmp_path / "s" / "results.md").is_file()
    assert not (tmp_path / "s" / "seed_0" / "adapter").exists()


# ---------------------------------------------------------------------------------------------------- metrics

def test_metrics_by_hand() -> None:
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 1, 0, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: p 2/2 r 2/3 f1 0.8; b: p 1/2 r 1/2 f1 0.5; c: p 1/2 r 1 f1 2/3
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert classification_metrics([0, 0], [0, 0], ["a", "b"])["per_class"]["b"]["f1"] == 0.0


# ---------------------------------------------------------------------------------------------------- seed CLI, recipes

SEED_COMMANDS = [
    "--option prompt --batch_size 10 --train data/sst-train.txt --dev data/sst-dev.txt --test data/sst-test.txt "
    "--label-names data/sst-label-mapping.json --dev_out sst-dev-prompting-output.txt --test_out sst-test-prompting-output.txt",
    "--option prompt --batch_size 10 --train data/cfimdb-train.txt --dev data/cfimdb-dev.txt --test data/cfimdb-test.txt "
    "--label-names data/cfimdb-label-mapping.json --dev_out cfimdb-dev-prompting-output.txt "
    "--test_out cfimdb-test-prompting-output.txt --use_gpu",
    "--option finetune --epochs 5 --lr 2e-5 --batch_size 80 --train data/sst-train.txt --dev data/sst-dev.txt "
    "--test data/sst-test.txt --label-names data/sst-label-mapping.json --dev_out sst-dev-finetuning-output.txt "
    "--test_out sst-test-finetuning-output.txt",
    "--option finetune --epochs 5 --lr 2e-5 --batch_size 10 --train data/cfimdb-train.txt --dev data/cfimdb-dev.txt "
    "--test data/cfimdb-test.txt --label-names data/cfimdb-label-mapping.json --dev_out cfimdb-dev-finetuning-output.txt "
    "--test_out cfimdb-test-finetuning-output.txt",
    "--option lora --epochs 5 --lr 2e-5 --batch_size 80 --train data/sst-train.txt --dev data/sst-dev.txt "
    "--test data/sst-test.txt --label-names data/sst-label-mapping.json --dev_out sst-dev-lora-output.txt "
    "--test_out sst-test-lora-output.txt --lora_rank 4 --lora_alpha 1.0",
    "--option lora --epochs 5 --lr 2e-5 --batch_size 10 --train data/cfimdb-train.txt --dev data/cfimdb-dev.txt "
    "--test data/cfimdb-test.txt --label-names data/cfimdb-label-mapping.json --dev_out cfimdb-dev-lora-output.txt "
    "--test_out cfimdb-test-lora-output.txt --lora_rank 4 --lora_alpha 1.0 --use_gpu",
]


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_compat_cli_takes_the_seed_command_lines(command: str, shared_data: Path) -> None:
    from lmlab.compat.run_llama import build_config, get_args

    args = get_args(shlex.split(command))
    cfg = build_config(args)
    assert cfg.classify.method == {"prompt": "zeroshot"}.get(args.option, args.option)
    assert Path(cfg.data.dev).is_file() and Path(cfg.data.dev).parent.parent == shared_data  # data/ -> shared data
    assert cfg.train.batch_size == args.batch_size and cfg.optim.lr == args.lr
    assert cfg.data.test_has_labels == ("sst" in args.test)
    assert cfg.precision.device == ("cuda" if args.use_gpu else "cpu")
    if args.option == "lora":
        assert (cfg.lora.rank, cfg.lora.alpha) == (4, 1.0)


def test_compat_cli_runs_end_to_end(task, tmp_path: Path) -> None:
    from lmlab.compat.run_llama import main

    dev_out, test_out = tmp_path / "x-dev-prompting-output.txt", tmp_path / "x-test-prompting-output.txt"
    rc = main(shlex.split(f"--option prompt --batch_size 10 --train {task['train']} --dev {task['train']} "
                          f"--test {task['train']} --label-names {task['labels']} --dev_out {dev_out} "
                          f"--test_out {test_out} --pretrained-model-path {task['model']} --out_dir {tmp_path / 'run'} "
                          "--dtype fp32"))
    assert rc == 0 and len(read_predictions(dev_out)) == 36 and test_out.is_file()


def test_every_classify_recipe_loads() -> None:
    recipes = sorted((REPO / "recipes" / "classify").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        cfg = load_config(path, schema=ClassifyConfig)
        assert cfg.data.label_names and cfg.data.dev, path


def test_pooling_ignores_padding_on_either_side() -> None:
    from lmlab.model.heads import pool

    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(h, right, "last"), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(pool(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))
    torch.testing.assert_close(pool(h, right, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


KILLER = """
import os, signal, sys
import lmlab.tasks.classify as cls
from lmlab.schema.classify import ClassifyConfig
from lmlab.schema.load import load_config
calls, real = 0, cls.classification_loss

def loss_then_die(model, batch):  # SIGKILL in the middle of a step, after the step-8 checkpoint
    global calls
    calls += 1
    if calls == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, batch)

cls.classification_loss = loss_then_die
cls.run_classify(load_config(None, sys.argv[2:], schema=ClassifyConfig))
"""


def test_killed_classification_resumes_on_the_same_curve_and_dev_accuracy(task, tmp_path: Path) -> None:
    """Classification trains through the session: checkpoints every N steps (adapters + head + optimizer +
    RNG), exact resume after SIGKILL, the best dev state kept by the selection metric."""
    import signal
    import subprocess
    import sys

    extra = {"optim.lr": 1e-2, "train.epochs": 6, "checkpoint.every": 4, "lora.dropout": 0.1, "data.test": "''",
             "train.threads": 1}  # the same thread count in both processes: the same float sums
    full = run_classify(config(task, tmp_path / "full", "lora", **extra))
    killed = tmp_path / "killed"
    args = [sys.executable, "-c", KILLER, "11", *overrides(task, killed, "lora", **extra)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "step_0000008").is_dir() and not (killed / "checkpoints" / "step_0000012").exists()
    resumed = run_classify(config(task, killed, "lora", **extra))

    def curve(out: Path) -> dict:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], r.get("split", "train")): r.get("loss", r.get("accuracy")) for r in rows}

    a, b = curve(tmp_path / "full"), curve(killed)
    assert a.keys() == b.keys() and len(a) == 18 + 6  # 18 steps, dev accuracy after each of the 6 epochs
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert resumed["dev"]["accuracy"] == full["dev"]["accuracy"]
    assert resumed["train"]["best"] == full["train"]["best"] and full["train"]["mfu"] > 0
    assert read_predictions(killed / "dev-predictions.txt") == read_predictions(tmp_path / "full" / "dev-predictions.txt")
