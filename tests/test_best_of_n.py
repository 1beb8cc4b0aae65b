"""Best-of-N: K samples of a prompt share one prefill and give the tokens K separate generations give with
the same seeds; the selection methods and the table against hand-worked problems."""

from __future__ import annotations

import random

import pytest
import torch

from lmlab.evaluation.bestofn import ProblemSamples, best_of_n, choose, markdown, method_accuracy
from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.generation.samples import sample_texts
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.tokenization import CharTokenizer


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96), **kw})
    return Transformer(cfg).eval()


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_p=0.9),
                                      SamplingConfig(temperature=1.0, repetition_penalty=1.3),
                                      SamplingConfig(temperature=0)], ids=["t1", "top_p", "rep_penalty", "greedy"])
def test_shared_prefill_equals_independent_generations(sampling):
    model = tiny_model()
    prompts = [[1, 5, 7, 9, 2, 3], [4, 4, 8], [6, 1, 2, 3, 4, 5, 6, 7]]  # different lengths: left padding
    K = 4
    seeds = [100 * i + k for i in range(len(prompts)) for k in range(K)]
    cfg = GenerationConfig(max_new_tokens=12, sampling=sampling, stop_ids=(0,))
    shared = generate_ids(model, prompts, cfg, num_samples=K, row_seeds=seeds)
    for i, prompt in enumerate(prompts):
        for k in range(K):
            alone = generate_ids(model, [prompt], GenerationConfig(12, sampling, (0,), seed=seeds[i * K + k]))[0]
            assert shared[i * K + k] == alone, (i, k)
    if not sampling.greedy:  # the K samples of a prompt differ
        assert len({tuple(x) for x in shared[:K]}) > 1


def test_shared_prefill_runs_the_prompt_once():
    model = tiny_model()
    calls: list[tuple[int, int]] = []
    hook = model.tok_embeddings.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    generate_ids(model, [[1, 2, 3, 4, 5]], GenerationConfig(3, SamplingConfig(temperature=1.0), seed=0), num_samples=8)
    hook.remove()
    # one prefill row, then 8 rows a step (the fast decode step embeds ids (8,), the model's forward (8, 1))
    assert calls[0] == (1, 5) and len(calls) == 4 and all(shape[0] == 8 and shape[1:] in ((), (1,)) for shape in calls[1:])


def test_sample_texts_seeds_do_not_depend_on_batching():
    tok = CharTokenizer.from_text("abcdefghij klmnop")
    model = tiny_model(vocab_size=tok.vocab_size)
    prompts = [tok.encode("abc"), tok.encode("klmno"), tok.encode("ef")]
    seeds = [[7 * i + k for k in range(3)] for i in range(3)]
    cfg = GenerationConfig(10, SamplingConfig(temperature=1.0))
    together = sample_texts(model, tok, prompts, cfg, 3, seeds, batch_prompts=3)
    apart = sample_texts(model, tok, prompts, cfg, 3, seeds, batch_prompts=1)
    assert together == apart and len(together) == 3 and all(len(x) == 3 for x in together)
    cut = sample_texts(model, tok, prompts, GenerationConfig(10, cfg.sampling, stop_strings=("a", "b", "c")), 3, seeds)
    assert all(not any(ch in text for ch in "abc") for group in cut for text in group)
    with pytest.raises(ValueError, match="seeds"):
        sample_texts(model, tok, prompts, cfg, 2, seeds)


# ---------------------------------------------------------------------------------------------------- methods


def test_choose_each_method():
    answers = ["5", "7", "7", None, "5"]
    scores = [3.0, -1.0, -0.5, 9.0, -2.0]
    assert choose("majority", answers, scores) == 0  # 5 and 7 tie twice each: 5 came first
    assert choose("verifier", answers, scores) == 3  # the best score, even without an answer
    # weighted: sigmoid(3) + sigmoid(-2) = 0.95 + 0.12 > sigmoid(-1) + sigmoid(-0.5) = 0.27 + 0.38
    assert choose("weighted", answers, scores) == 0
    assert choose("weighted", ["5", "7", "7"], [0.1, 0.0, 0.0]) == 1  # two medium votes beat one
    assert choose("majority", [None, None], [0.0, 1.0]) is None
    with pytest.raises(ValueError):
        choose("best", answers, scores)


def test_method_accuracy_averages_over_subsets():
    p = ProblemSamples(["1", "2", "2", "3"], [True, False, False, False], [5.0, 0.0, 0.0, 0.0])
    rng = random.Random(0)
    assert method_accuracy(p, "verifier", 1, 64, rng) == pytest.approx(0.25)  # N=1: each sample once
    assert method_accuracy(p, "verifier", 4, 64, rng) == 1.0
    assert method_accuracy(p, "majority", 4, 64, rng) == 0.0  # "2" wins the vote
    # N=2: 6 pairs; sample 0 is in 3 and the verifier picks it whenever it is there
    assert method_accuracy(p, "verifier", 2, 64, rng) == pytest.approx(0.5)
    # majority on pairs: {0,1} {0,2} {0,3} tie -> the first (sample 0, right); {1,2} "2"; {1,3} {2,3} wrong
    assert method_accuracy(p, "majority", 2, 64, rng) == pytest.approx(0.5)
    assert method_accuracy(p, "oracle", 2, 64, rng) == pytest.approx(0.5)


def test_best_of_n_table_and_paired_tests():
    problems = [
        ProblemSamples(["4", "4", "9", "4"], [True, True, False, True], [0.0, 0.0, 2.0, 0.0], greedy=True),
        ProblemSamples(["1", "2", "2", "2"], [True, False, False, False], [3.0, -1.0, -1.0, -1.0], greedy=False),
        ProblemSamples(["8", None, "6", "6"], [False, False, False, False], [0.0, 0.0, 0.0, 0.0], greedy=False),
    ]
    res = best_of_n(problems, [1, 4], subsets=16, seed=0)
    acc = res["accuracy"]
    assert acc["greedy"] == [pytest.approx(1 / 3)] * 2
    assert acc["oracle"] == [pytest.approx((3 / 4 + 1 / 4 + 0) / 3), pytest.approx(2 / 3)]
    assert acc["majority"][1] == pytest.approx(1 / 3)  # problem 0 only
    assert acc["verifier"][1] == pytest.approx(1 / 3)  # problem 1 only (problem 0: the 9 scores best)
    assert acc["majority"][0] == acc["verifier"][0] == acc["weighted"][0] == pytest.approx((0.75 + 0.25) / 3)
    assert res["outcomes"]["verifier"] == [False, True, False] and res["outcomes"]["majority"] == [True, False, False]
    assert res["paired"]["verifier vs majority"] == {"a_only": 1, "b_only": 1, "p": 1.0}
    table = markdown(res)
    assert "| verifier best-of-N | 0.333 | 0.333 |" in table and "verifier best-of-4 vs majority vote@4 | 1 | 1 |" in table
    with pytest.raises(ValueError, match="N values"):
        best_of_n(problems, [5])
