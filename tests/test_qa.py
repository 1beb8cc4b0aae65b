"""QA adapters: MCQ/SAQ readers, validators, retry with a changed seed, the router switching
adapters on one base, the zero-shot letter baseline, scores, and loading adapters (lmlab + peft) by task."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_smol

from lmlab.adapters.files import export_peft, save_adapter
from lmlab.adapters.lora import LoRAConfig, add_adapter, set_active_adapter
from lmlab.data.instruct import Template, split_records
from lmlab.data.qa import mcq_records, permute_options, read_arc, read_mmlu, saq_records
from lmlab.errors import ConfigError, DataError
from lmlab.model.transformer import Transformer
from lmlab.tasks.qa import (
    TASKS,
    Answer,
    Router,
    TaskSpec,
    answer_with_retry,
    cloze_predict,
    letter_logprob_predict,
    load_router,
    score,
    validate_mcq,
    validate_saq,
)
from lmlab.weights.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tok(smol_tok):
    return smol_tok

CHAT = Template("chat")




def tiny() -> Transformer:
    return tiny_smol().eval()


def with_adapters(model: Transformer, names=("mcq", "saq")) -> Transformer:
    for i, name in enumerate(names):
        add_adapter(model, name, LoRAConfig(rank=4, alpha=8))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_b.{name}." in pname:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
    return model


def test_readers_on_the_shared_files(shared_data, tmp_path):
    mmlu = read_mmlu(shared_data / "mmlu" / "dev")
    arc = read_arc(shared_data / "arc-challenge" / "ARC-Challenge-Dev.jsonl")
    nq = saq_records(shared_data / "nq-open" / "NQ-open.dev.jsonl")
    assert (len(mmlu), len(arc), len(nq)) == (285, 294, 3610)
    assert all(r["output"] in "ABCDE"[: len(r["choices"])] for r in mmlu + arc)
    assert {r["source"] for r in mmlu} == {"mmlu"} and "\nD. " in mmlu[0]["instruction"]
    assert all(r["answers"] and r["output"] == r["answers"][0] for r in nq)
    assert nq[0]["instruction"].endswith("?")
    assert len(mcq_records(shared_data / "mmlu" / "val")) == 1542
    bad = tmp_path / "bad_dev.csv"
    bad.write_text("q,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"bad_dev.csv: row 1: answer 'E'"):
        read_mmlu(bad)
    bad.write_text("q,a,b\n")
    with pytest.raises(DataError, match="expected 6 fields"):
        read_mmlu(bad)


@pytest.mark.parametrize("text,ok", [("B", "B"), (" C.\n", "C"), ("(A)", "A"), ("D)", "D"), ("E", None),
                                     ("The answer is B", None), ("", None), ("BC", None)])
def test_mcq_validator(text, ok):
    assert validate_mcq(text, {"choices": ["w", "x", "y", "z"]}) == ok


@pytest.mark.parametrize("text,ok", [("Paris.", "Paris"), (" 1945 ", "1945"), ("The answer is Paris", None),
                                     ("Sure! Paris", None), ("", None), ("one two three four five six seven eight "
                                     "nine ten eleven", None), ("Paris\nFrance", None)])
def test_saq_validator(text, ok):
    assert validate_saq(text, {}) == ok


def test_retry_samples_with_a_new_seed_until_valid(tok):
    model = tiny()
    records = [{"instruction": "Say something.", "input": "", "output": "x"} for _ in range(2)]
    calls: dict[int, int] = {}

    def third_time_lucky(text: str, record: dict) -> str | None:
        calls[id(record)] = calls.get(id(record), 0) + 1
        return text if calls[id(record)] >= 3 else None

    spec = TaskSpec(None, third_time_lucky, max_new_tokens=3, stop_strings=())
    answers = answer_with_retry(model, tok, records, spec, CHAT, max_retries=3, seed=1)
    assert [a.attempts for a in answers] == [3, 3] and all(a.valid for a in answers)
    greedy, *sampled = answers[0].raw
    assert sampled[0] != greedy or sampled[1] != greedy  # retries sample; greedy would repeat itself
    calls.clear()
    stuck = answer_with_retry(model, tok, records, spec, CHAT, max_retries=1, seed=1)
    assert [(a.attempts, a.valid) for a in stuck] == [(2, False), (2, False)]
    s = score("saq", [{"answers": ["zz"]}] * 2, stuck)
    assert s["invalid"] == 1.0 and s["needed_retry"] == 1.0 and s["exact_match"] == 0.0


def test_router_picks_the_adapter_per_request_on_one_base(tok):
    model = with_adapters(tiny())
    router = Router(model, tok, CHAT, max_retries=0)
    mcq = {"instruction": "Pick one.\nA. yes\nB. no", "input": "", "output": "A"}
    saq = {"instruction": "Capital of France?", "input": "", "output": "Paris"}
    declared = {**saq, "task": "mcq"}
    assert [router.route(r) for r in (mcq, saq, declared)] == ["mcq", "saq", "mcq"]
    with pytest.raises(ConfigError, match="no such task"):
        router.route({**saq, "task": "poetry"})
    params_before = {id(p) for p in model.parameters()}
    routed = router.answer([saq, mcq, declared])
    assert [t for t, _ in routed] == ["saq", "mcq", "mcq"]
    assert {id(p) for p in model.parameters()} == params_before  # switched, never reloaded
    for task, record, (_, got) in zip(("saq", "mcq"), (saq, mcq), routed):
        set_active_adapter(model, task)
        (want,) = answer_with_retry(model, tok, [record], TASKS[task], CHAT, max_retries=0)
        assert got.raw == want.raw
    set_active_adapter(model, "mcq")
    mcq_out = answer_with_retry(model, tok, [saq], TaskSpec("saq", validate_saq, 8, ("\n",)), CHAT, max_retries=0)
    set_active_adapter(model, "saq")
    saq_out = answer_with_retry(model, tok, [saq], TaskSpec("saq", validate_saq, 8, ("\n",)), CHAT, max_retries=0)
    assert mcq_out[0].raw != saq_out[0].raw  # the adapters really differ


def test_letter_logprob_baseline_is_batch_invariant(tok, shared_data):
    model = tiny()
    records = read_arc(shared_data / "arc-challenge" / "ARC-Challenge-Dev.jsonl")[:5]
    batched = letter_logprob_predict(model, tok, records, CHAT, batch_size=2)  # length-sorted batches
    from lmlab.generation.generate import encode_prompt

    letters = [tok.encode(ch)[0] for ch in "ABCDE"]
    for rec, got in zip(records, batched):
        ids = torch.tensor([encode_prompt(tok, CHAT.prompt(rec, tok))])
        logits = model(ids)[0, -1]
        n = len(rec["choices"])
        assert got == "ABCDE"[int(logits[letters[:n]].argmax())]


def test_cloze_baseline_matches_one_by_one_scoring(tok, shared_data):
    model = tiny()
    records = read_arc(shared_data / "arc-challenge" / "ARC-Challenge-Dev.jsonl")[:4]
    raw, norm = cloze_predict(model, tok, records, batch_size=3)  # right-padded, length-sorted batches
    for rec, got_raw, got_norm in zip(records, raw, norm):
        context = tok.encode(f"Question: {rec['question'].strip()}\nAnswer:")
        scores = []
        for c in rec["choices"]:
            ids = context + tok.encode(" " + c.strip())
            with torch.no_grad():
                logp = model(torch.tensor([ids]))[0].log_softmax(-1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(context), len(ids))))
        per_char = [s / len(c.strip()) for s, c in zip(scores, rec["choices"])]
        assert got_raw == "ABCDE"[max(range(len(scores)), key=scores.__getitem__)]
        assert got_norm == "ABCDE"[max(range(len(scores)), key=per_char.__getitem__)]


def test_permuted_options_keep_the_answer_and_balance_the_letters(shared_data):
    records = read_mmlu(shared_data / "mmlu" / "dev")[:40]
    four = permute_options(records, 4, seed=42)
    assert len(four) == 4 * len(records)
    for i, rec in enumerate(records):
        copies = four[4 * i: 4 * i + 4]
        right = rec["choices"]["ABCD".index(rec["output"])]
        assert sorted(c["output"] for c in copies) == list("ABCD")  # the answer sits at every letter once
        for c in copies:
            assert c["choices"]["ABCD".index(c["output"])] == right and sorted(c["choices"]) == sorted(rec["choices"])
            assert f"{c['output']}. {right}" in c["instruction"] and c["answers"] == [c["output"]]
    two = permute_options(records, 2, seed=42)
    assert len(two) == 2 * len(records) and two == permute_options(records, 2, seed=42)
    assert all(two[2 * i]["output"] != two[2 * i + 1]["output"] for i in range(len(records)))
    assert permute_options(records, 1, seed=42) == records
    assert len(permute_options(records[:1], 9, seed=0)) == 4  # never more orders than rotations


def test_permute_options_in_a_recipe_triples_only_the_training_split():
    from lmlab.schema.load import load_config
    from lmlab.schema.sft import SFTConfig
    from lmlab.tasks.sft import load_splits

    plain = load_splits(load_config("recipes/qa/mcq-smollm2.yaml", ["data.max_train=30"], schema=SFTConfig))
    three = load_splits(load_config("recipes/qa/mcq-smollm2.yaml", ["data.max_train=30", "data.permute_options=3"],
                                    schema=SFTConfig))
    assert len(three[0]) == 90 and three[1:] == plain[1:]
    assert [r["question"] for r in three[0][::3]] == [r["question"] for r in plain[0]]
    with pytest.raises(ConfigError, match="permute_options=2: only for data.source=mcq"):
        load_splits(load_config("recipes/qa/saq-smollm2.yaml", ["data.permute_options=2"], schema=SFTConfig))


def test_scores():
    recs = [{"output": "A", "answers": ["A"], "source": "arc"}, {"output": "B", "answers": ["B"], "source": "mmlu"},
            {"output": "D", "answers": ["D"], "source": "mmlu"}]
    answers = [Answer("A", True, 1), Answer("C", True, 2), Answer("D", False, 3)]  # right, wrong, invalid
    s = score("mcq", recs, answers)
    assert s["accuracy"] == 1 / 3 and s["needed_retry"] == 2 / 3 and s["valid_first_try"] == 1 / 3
    assert (s["accuracy_arc"], s["accuracy_mmlu"], s["correct"]) == (1.0, 0.0, [1, 0, 0])
    s = score("saq", [{"answers": ["the Beatles", "Beatles"]}], [Answer("Beatles", True, 1)])
    assert s["exact_match"] == 1.0 and s["f1"] == 1.0


def test_load_router_reads_saved_adapters_by_task(tmp_path, tok):
    base = tmp_path / "base"
    save_checkpoint(tiny(), base, tokenizer=tok)
    from lmlab.weights.loading import load_model

    model = with_adapters(load_model(base).model)
    set_active_adapter(model, "mcq")
    save_adapter(model, tmp_path / "mcq")
    set_active_adapter(model, "saq")
    export_peft(model, tmp_path / "saq-peft")
    router = load_router(str(base), {"mcq": tmp_path / "mcq", "saq": tmp_path / "saq-peft"})
    x = torch.randint(0, 49152, (1, 10))
    for task in ("mcq", "saq"):
        set_active_adapter(model, task)
        set_active_adapter(router.model, task)
        assert torch.allclose(model(x), router.model(x), atol=1e-5)


def test_split_keeps_qa_references(shared_data):
    train, val, test = split_records(saq_records(shared_data / "nq-open" / "NQ-open.dev.jsonl"), (5, 1, 1), 42)
    assert len(train) + len(val) + len(test) == 3610 and all("answers" in r for r in test)


def test_few_shot_prompt_and_generation_metrics(tok, shared_data):
    from lmlab.data.tasks import dialogsum_records, gsm8k_records, sst2_records
    from lmlab.tasks.task_eval import FewShotTemplate, evaluate_task, pick_shots

    sst = sst2_records(shared_data / "sst5" / "sst-dev.txt")
    assert len(sst) == 872 and {r["output"] for r in sst} == {"positive", "negative"}
    shots = pick_shots(sst[10:], 2, seed=0)
    assert shots == pick_shots(sst[10:], 2, seed=0) and len(shots) == 2
    prompt = FewShotTemplate(shots).prompt(sst[0], tok)
    assert prompt.count("<|im_start|>assistant\n") == 3 and prompt.endswith("<|im_start|>assistant\n")
    assert f"{shots[0]['output']}<|im_end|>" in prompt
    model = tiny()
    got = evaluate_task(model, tok, "sst2", sst[:2], CHAT, max_new_tokens=3)
    assert set(got) >= {"accuracy", "valid", "n"}
    summ = evaluate_task(model, tok, "summarize", dialogsum_records(shared_data / "dialogsum" / "dialogsum.dev.jsonl")[:1],
                         CHAT, max_new_tokens=8)
    assert set(summ) >= {"rouge1", "rouge2", "rougeL"}
    math = gsm8k_records(shared_data / "gsm8k" / "test.jsonl")[:1]
    assert math[0]["answers"] == ["18"] and "<<" not in math[0]["output"]
    assert "exact_match" in evaluate_task(model, tok, "math", math, CHAT, max_new_tokens=8)


def test_qa_eval_on_a_recipe_split(tmp_path, tok):
    from lmlab.tasks.task_eval import evaluate_recipe

    base = tmp_path / "base"
    save_checkpoint(tiny(), base, tokenizer=tok)
    res = evaluate_recipe("recipes/qa/mcq-smollm2.yaml", [f"model.spec={base}", "data.max_eval=3"], max_retries=1)
    assert res["n_test"] == 3 and 0 <= res["zero_shot_logprob"]["accuracy"] <= 1
    assert set(res["base_0shot"]) >= {"accuracy", "valid_after_retry", "needed_retry", "invalid"}
    assert sum(res["zero_shot_logprob"]["picked"].values()) == sum(res["zero_shot_logprob"]["answers"].values()) == 3
    cloze = res["zero_shot_cloze"]
    assert len(cloze["correct"]) == 3 and cloze["accuracy"] == sum(cloze["correct"]) / 3
    # with an adapter: it is scored both ways, and its letter scoring differs from the adapter-free baseline
    from lmlab.weights.loading import load_model

    model = with_adapters(load_model(base).model, names=("mcq",))
    save_adapter(model, tmp_path / "mcq")
    overrides = [f"model.spec={base}", "data.max_eval=8", "precision.dtype=fp32"]
    res = evaluate_recipe("recipes/qa/mcq-smollm2.yaml", overrides, str(tmp_path / "mcq"), max_retries=0)
    assert res["dtype"] == "fp32" and {"zero_shot_logprob", "adapter_logprob", "adapter"} <= set(res)
    assert res["adapter_logprob"]["picked"] != res["zero_shot_logprob"]["picked"]


def test_qa_eval_command_prints_a_summary_and_saves_per_question_results(tmp_path, tok, capsys):
    import json

    from lmlab.cli import main

    base = tmp_path / "base"
    save_checkpoint(tiny(), base, tokenizer=tok)
    with pytest.raises(SystemExit) as exit_info:
        main(["qa", "eval", "recipes/qa/mcq-smollm2.yaml", f"model.spec={base}", "data.max_eval=4", "--retries", "0",
              "--out", str(tmp_path / "eval.json")])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert "correct" not in printed["zero_shot_cloze"] and len(saved["zero_shot_cloze"]["correct"]) == 4
    assert printed["zero_shot_logprob"]["accuracy"] == saved["zero_shot_logprob"]["accuracy"]
