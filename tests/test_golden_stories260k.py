"""Golden output: stories260K greedy from the empty prompt equals llama2.c's reference C run, byte for byte."""

from __future__ import annotations

from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.tokenization import load_tokenizer
from lmlab.weights.build import build_model
from lmlab.weights.llama2c import load_llama2c_bin


def test_greedy_200_positions_matches_run_c(shared_data) -> None:
    folder = shared_data / "stories260K"
    config, state = load_llama2c_bin(folder / "stories260K.bin")
    model = build_model(config, state, "stories260K.bin")
    tok = load_tokenizer(folder / "tok512.bin")
    # run.c's loop (`while (pos < steps)`, pos++ before printing) prints `steps` sampled tokens after
    # the BOS prompt, and stops early if it samples BOS (id 1)
    cfg = GenerationConfig(max_new_tokens=200, sampling=SamplingConfig(temperature=0), stop_ids=(tok.bos_id,))
    out = generate_ids(model, [[tok.bos_id]], cfg)[0]
    expected = (folder / "reference-greedy-200.txt").read_text()
    assert tok.decode(out) == expected
