"""Instruction tuning: records, the seeded split, templates, response-only labels, bad input (error or
counted skip, never a fully masked example), packing, the loss, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_smol

from lmlab.data.batch import IGNORE_INDEX
from lmlab.data.instruct import (
    Example,
    InstructBatches,
    Template,
    collate_examples,
    encode_examples,
    pack,
    read_alpaca,
    split_records,
)
from lmlab.errors import ConfigError, DataError
from lmlab.model.transformer import Transformer
from lmlab.schema.load import load_config
from lmlab.schema.sft import SFTConfig
from lmlab.tasks.sft import perplexities, run_sft
from lmlab.train.losses import lm_loss
from lmlab.weights.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tok(smol_tok):
    return smol_tok




def tiny(vocab: int = 49152) -> Transformer:
    return tiny_smol(vocab)


REC = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


def test_alpaca_file_and_seeded_split(shared_data):
    records = read_alpaca(shared_data / "alpaca" / "alpaca_small.json")
    assert len(records) == 2000 and sum(bool(r["input"]) for r in records) == 753
    train, val, test = split_records(records, (5, 1, 1), seed=42)
    assert (len(train), len(val), len(test)) == (1429, 286, 285)
    again = split_records(records, (5, 1, 1), seed=42)
    assert [r["output"] for r in again[2]] == [r["output"] for r in test]
    ids = {id(r) for r in train} | {id(r) for r in val} | {id(r) for r in test}
    assert len(ids) == 2000
    sub = split_records(records, (5, 1, 1), seed=42, subset=700)
    assert [len(s) for s in sub] == [500, 100, 100]


def test_missing_field_and_wrong_type_name_the_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([REC, {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"bad.json: record 1: missing field 'output'"):
        read_alpaca(path)
    path.write_text(json.dumps([{"instruction": "x", "output": 3}]))
    with pytest.raises(DataError, match=r"record 0: field 'output' must be a string"):
        read_alpaca(path)
    path.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_alpaca(path)


def test_labels_are_the_response_only(tok):
    data = encode_examples([REC], Template("alpaca"), tok, max_len=256)
    (ex,) = data.examples
    batch = collate_examples([ex], pad_id=0)
    labels = batch["labels"][0]
    kept = labels[labels != IGNORE_INDEX].tolist()
    assert tok.decode(kept[:-1]) == "Red." and kept[-1] == tok.eos_id
    prompt = tok.decode(ex.ids[: ex.n_prompt])
    assert prompt.endswith("### Response:\n") and "Name a primary color." in prompt
    assert (labels[: ex.n_prompt - 1] == IGNORE_INDEX).all()


def test_templates_with_and_without_input_and_chat(tok):
    with_input = Template("alpaca").prompt({**REC, "input": "Sky"})
    assert "### Input:\nSky\n\n### Response:\n" in with_input and "paired with an input" in with_input
    assert "### Input" not in Template("alpaca").prompt(REC)
    chat = Template("chat")
    prompt = chat.prompt(REC, tok)
    assert prompt.endswith("<|im_start|>assistant\n") and "Name a primary color." in prompt
    (ex,) = encode_examples([REC], chat, tok, 256).examples
    assert tok.decode(ex.ids[ex.n_prompt:]) == "Red.<|im_end|>"  # learns to end its turn


def test_custom_template_needs_the_response_marker():
    with pytest.raises(ConfigError, match="does not end with the response marker"):
        Template("custom", "Q: {instruction}\nA:", "### Response:")
    with pytest.raises(ConfigError, match="does not end with the response marker"):
        Template("custom", "A: {instruction}", "A:")  # text after the marker would be taken for the prompt
    with pytest.raises(ConfigError, match="must contain"):
        Template("custom", "Q: x\nA:", "A:")
    assert Template("custom", "Q: {instruction}\nA:", "A:").prompt(REC) == "Q: Name a primary color.\nA:"


def test_bad_examples_are_skipped_and_counted_never_fully_masked(tok):
    long_prompt = {"instruction": "word " * 400, "input": "", "output": "ok"}
    long_answer = {"instruction": "Say it.", "input": "", "output": "yes " * 400}
    empty = {"instruction": "Say nothing.", "input": "", "output": "  "}
    data = encode_examples([REC, long_prompt, long_answer, empty], Template("alpaca"), tok, max_len=128)
    assert data.skipped == {"prompt_too_long": 1, "empty_output": 1} and data.truncated == 1
    assert len(data.examples) == 2 and all(len(e.ids) <= 128 for e in data.examples)
    for batch in [collate_examples([e], 0) for e in data.examples]:
        assert (batch["labels"] != IGNORE_INDEX).sum() >= 1
    edge = {"instruction": "word " * 60, "input": "", "output": "yes " * 50}
    n_prompt = len(tok.encode(Template("alpaca").prompt(edge)))
    (ex,) = encode_examples([edge], Template("alpaca"), tok, max_len=n_prompt + 1).examples
    assert len(ex.ids) - ex.n_prompt == 1  # one response token survives the cut
    with pytest.raises(DataError, match="no training examples"):
        InstructBatches([], 2, 1, 0, 0)


def test_masked_loss_counts_response_tokens_and_packing_keeps_them(tok):
    model = tiny()
    recs = [REC, {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Translate 'cat'.", "input": "French", "output": "chat"}]
    examples = encode_examples(recs, Template("alpaca"), tok, 256).examples
    batch = collate_examples(examples, pad_id=tok.pad_id)
    out = lm_loss(model, batch)
    loss, na = out.loss, out.count
    logits = model(batch["input_ids"])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    assert int(na) == sum(len(e.ids) - e.n_prompt for e in examples) and torch.allclose(loss, want, rtol=1e-4)
    packed = pack(examples, max_len=64, sep_id=tok.eos_id)
    assert all(len(x) == len(y) <= 64 for x, y in packed)
    targets = sum(int((torch.tensor(y) != IGNORE_INDEX).sum()) for _, y in packed)
    assert targets == int(na)
    src = InstructBatches(examples, 2, 1, seed=0, pad_id=0, packing=True, max_len=64)
    assert src(0, 0)["input_ids"].shape[1] <= 64


def test_batches_cover_each_epoch_and_are_reproducible():
    examples = [Example([1, 2, i + 3, 4], 2) for i in range(10)]
    src = InstructBatches(examples, batch_size=2, grad_accum=1, seed=5, pad_id=0)
    seen = [int(t) for s in range(5) for t in src(s, 0)["input_ids"][:, 2]]
    assert sorted(seen) == list(range(3, 13)) and src.steps_per_epoch == 5
    again = InstructBatches(examples, batch_size=2, grad_accum=1, seed=5, pad_id=0)
    assert torch.equal(again(3, 0)["input_ids"], src(3, 0)["input_ids"])


def test_micro_batches_of_a_step_are_sorted_by_length():
    """With accumulation, a step's examples are spread over its micro-batches shortest first (little
    padding), each example still once per epoch, and a micro-batch is the same whenever it is asked for."""
    lengths = [3, 17, 5, 11, 2, 13, 7, 19, 4, 9, 6, 15]
    examples = [Example(list(range(100 * i, 100 * i + n)), 1) for i, n in enumerate(lengths)]
    src = InstructBatches(examples, batch_size=2, grad_accum=3, seed=1, pad_id=-1)
    firsts, padded = [], 0
    for step in range(src.steps_per_epoch):
        widths = []
        for micro in range(3):
            ids = src(step, micro)["input_ids"]
            widths.append(ids.shape[1])
            padded += int((ids == -1).sum())
            firsts += [int(r[0]) // 100 for r in ids]
        assert widths == sorted(widths)
    assert sorted(firsts) == list(range(12))
    assert torch.equal(InstructBatches(examples, 2, 3, seed=1, pad_id=-1)(1, 2)["input_ids"], src(1, 2)["input_ids"])
    # the unsorted order of the same steps pads more
    order = [src.items[i] for i in src._order(0)]
    unsorted = sum(max(len(e.ids) for e in order[j: j + 2]) * 2 - sum(len(e.ids) for e in order[j: j + 2])
                   for j in range(0, 12, 2))
    assert padded < unsorted


def test_conditional_perplexity_counts_response_tokens_only(tok):
    from lmlab.precision import Precision

    examples = encode_examples([REC], Template("alpaca"), tok, 256).examples
    ppl = perplexities(tiny(), examples, 0, 4, Precision(torch.device("cpu")))
    assert ppl["conditional_tokens"] == len(examples[0].ids) - examples[0].n_prompt
    assert ppl["plain_tokens"] == len(examples[0].ids) - 1


def test_every_shipped_sft_and_qa_recipe_loads():
    from pathlib import Path

    recipes = sorted(Path("recipes/sft").glob("*.yaml")) + sorted(Path("recipes/qa").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config(path, [], schema=SFTConfig)
        assert cfg.data.paths and cfg.lora.rank > 0


def test_tiny_end_to_end_run_lowers_conditional_perplexity(tmp_path, tok, shared_data):
    base = tmp_path / "base"
    save_checkpoint(tiny(), base, tokenizer=tok)
    cfg = load_config("recipes/sft/alpaca-lora-smollm2.yaml", [
        f"out_dir={tmp_path / 'run'}", f"model.spec={base}", "data.subset=70", "data.max_train=8",
        "data.max_eval=8", "data.max_len=128", "train.max_steps=12", "train.batch_size=4", "train.grad_accum=1",
        "optim.lr=2e-2", "schedule.warmup_steps=0", "lora.dropout=0.0", "precision.dtype=fp32",
        "eval.max_new_tokens=4", "eval.instructions=[Write a haiku.]", "logging.progress=false",
    ], schema=SFTConfig)
    cfg.data.max_eval = 8
    summary = run_sft(cfg)
    run = tmp_path / "run"
    assert summary["data"]["train"]["examples"] == 8
    assert summary["after"]["conditional_ppl"] < summary["before"]["conditional_ppl"]
    assert summary["train"]["peak_mem_mb"] > 0 and summary["train"]["train_time_s"] > 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples.md", "adapters/alpaca/adapter.safetensors",
                 "adapters/alpaca-peft/adapter_model.safetensors", "adapters/alpaca-peft/adapter_config.json"):
        assert (run / name).is_file(), name
    # the saved adapter (lmlab and peft format) gives the tuned model back on a fresh base
    from lmlab.adapters.files import load_adapter
    from lmlab.weights.loading import load_model

    x = torch.randint(0, 49152, (1, 12))
    outs = []
    for folder in ("alpaca", "alpaca-peft"):
        m = load_model(base).model
        load_adapter(m, run / "adapters" / folder, name="alpaca")
        outs.append(m.eval()(x))
    plain = load_model(base).model.eval()(x)
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and not torch.allclose(outs[0], plain, atol=1e-4)
    # and Hugging Face peft reads the exported folder onto the same base, with the same logits
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lmlab.weights.hf import save_hf

    save_hf(load_model(base).model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, str(run / "adapters" / "alpaca-peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, outs[0], atol=1e-4, rtol=0)


def test_test_paths_replace_the_test_split(shared_data):
    from lmlab.tasks.sft import load_splits, read_records

    cfg = load_config("recipes/sft/gsm8k-lora-smollm2.yaml", ["data.max_train=3", "data.max_eval=5"], schema=SFTConfig)
    train, val, test = load_splits(cfg)
    assert (len(train), len(val), len(test)) == (3, 0, 5)
    full = load_splits(load_config("recipes/sft/gsm8k-lora-smollm2.yaml", [], schema=SFTConfig))[2]
    assert len(full) == 1319 and test == full[:5]  # the capped test set is the head of a fixed shuffle
    assert sorted(r["question"] for r in full) == sorted(r["question"] for r in read_records("gsm8k", cfg.data.test_paths))
    assert "Janet" not in full[0]["question"]  # GSM8K's first test problem: the file order is not kept
    # a file grouped by label (SST dev) still gives a balanced capped sample
    sst = load_splits(load_config("recipes/sft/sst2-lora-smollm2.yaml", ["data.max_eval=100"], schema=SFTConfig))[2]
    assert 30 <= sum(r["output"] == "positive" for r in sst) <= 70


def test_interrupted_sft_resumes_on_the_same_curve(tmp_path, tok, shared_data, monkeypatch):
    """Adapter checkpoints (trainable weights + optimizer + RNG, written atomically every N steps):
    a run that dies mid-step and is started again ends on the loss curve of one never interrupted."""
    import json

    import lmlab.tasks.sft as sft

    base = tmp_path / "base"
    save_checkpoint(tiny(), base, tokenizer=tok)

    def config(out):
        return load_config("recipes/sft/alpaca-lora-smollm2.yaml", [
            f"out_dir={out}", f"model.spec={base}", "data.subset=70", "data.max_train=16", "data.max_eval=4",
            "data.max_len=96", "train.max_steps=8", "train.batch_size=2", "train.grad_accum=2", "optim.lr=1e-2",
            "schedule.warmup_steps=2", "lora.dropout=0.1", "precision.dtype=fp32", "checkpoint.every=3",
            "eval.instructions=[]", "eval.perplexity=false", "logging.progress=false", "logging.log_every=1",
            "export_peft=false",
        ], schema=SFTConfig)

    def curve(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], r.get("split", "train")): r["loss"] for r in rows}

    run_sft(config(tmp_path / "full"))
    real, calls = sft.lm_loss, []

    def dies_in_step_5(model, batch):
        calls.append(1)
        if len(calls) == 2 * 4 + 1:  # first micro-batch of step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(sft, "lm_loss", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_sft(config(tmp_path / "killed"))
    assert (tmp_path / "killed/checkpoints/step_0000003/trainable.safetensors").is_file()
    assert not (tmp_path / "killed/checkpoints/step_0000006").exists()
    monkeypatch.setattr(sft, "lm_loss", real)
    run_sft(config(tmp_path / "killed"))
    a, b = curve(tmp_path / "full"), curve(tmp_path / "killed")
    assert a.keys() == b.keys() and len(a) == 8 + 1
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_resume_refuses_checkpoints_of_a_different_config(tmp_path):
    """Checkpoints in out_dir resume only under the config that wrote them (outside logging, checkpoint,
    eval and run length), else two runs would be spliced; the error names every changed key."""
    from lmlab.errors import ConfigError
    from lmlab.schema.load import check_resume_config, save_config

    def config(*extra):
        return load_config("recipes/qa/mcq-smollm2.yaml", [f"out_dir={tmp_path}", "data.max_train=400", *extra],
                           schema=SFTConfig)

    save_config(config(), tmp_path / "config.yaml")
    check_resume_config(tmp_path, config("logging.log_every=1", "train.epochs=3", "checkpoint.every=5"))
    with pytest.raises(ConfigError, match=r"data.max_train: 400 -> 0.*optim.lr: 0.0002 -> 0.001"):
        check_resume_config(tmp_path, config("data.max_train=0", "optim.lr=1e-3"))
    (tmp_path / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml: unreadable"):
        check_resume_config(tmp_path, config())
