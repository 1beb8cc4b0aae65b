"""The minllama assignment's `run_llama.py` command lines, unchanged, on lmlab (`python run_llama.py ...` from
the repository root runs this module):

    python run_llama.py --option generate
    python run_llama.py --option finetune --epochs 5 --lr 2e-5 --batch_size 80 \
        --train data/sst-train.txt --dev data/sst-dev.txt --test data/sst-test.txt \
        --label-names data/sst-label-mapping.json --dev_out sst-dev-finetuning-output.txt \
        --test_out sst-test-finetuning-output.txt [--use_gpu]

Each option maps onto a classification config (lmlab/schema/classify.py) and runs through
`lmlab.tasks.classify.run_classify`; the prediction files are written where --dev_out/--test_out say,
in the seed's `PRED ||| text` format, and `generate` writes the seed's two generated-sentence files.
Differences from the seed, all deliberate:
- the default backbone is lmlab's embedded SmolLM2-135M (stories42M.pt cannot be downloaded here);
  `--pretrained-model-path` takes any `lmlab.weights.loading.load_model` spec. A llama2.c `.pt` (the
  assignment's stories42M.pt) loads into the assignment's model, preset `minillama-stories42m`: LayerNorm
  in place of RMSNorm; the Llama 2 tokenizer.model comes from beside it, the working folder or the
  shared data folder;
- `data/<file>` paths that do not exist fall back to the shared data folder (sst5/, cfimdb/);
- on CPU the forward pass runs under bf16 autocast (`--dtype fp32` for the seed's numerics);
- flags the seed does not have are optional: --seeds, --out_dir, --dtype, --max_train.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from lmlab.commands.classify import parse_seeds
from lmlab.errors import CheckpointError, LmlabError
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, encode_prompt, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.config import PRESETS
from lmlab.paths import data_dir
from lmlab.schema.classify import ClassifyConfig
from lmlab.tasks.classify import run_classify
from lmlab.weights.loading import load_model

GENERATE_PREFIX = ("Victor Frankenstein, a young scientist obsessed with uncovering the secrets of life, "
                   "succeeds in animating a creature assembled from")
METHODS = {"prompt": "zeroshot", "finetune": "finetune", "lora": "lora"}
POOLING = {"last_token": "last", "mean_pooling": "mean"}
SEED_MODEL = "minillama-stories42m"
"""The assignment's model (lmlab/model/config.py PRESETS): stories42M's shape with LayerNorm."""
SEED_NORM = {k: PRESETS[SEED_MODEL][k] for k in ("norm", "norm_bias", "norm_eps")}
STORIES42M_URL = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories42M.pt"


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The seed's flags (same names, same defaults except the backbone), plus a few optional ones."""
    p = argparse.ArgumentParser(prog="python -m lmlab.compat.run_llama")
    p.add_argument("--train", type=str, default="data/cfimdb-train.txt")
    p.add_argument("--dev", type=str, default="data/cfimdb-dev.txt")
    p.add_argument("--test", type=str, default="data/cfimdb-test.txt")
    p.add_argument("--label-names", type=str, default="data/cfimdb-label-mapping.json")
    p.add_argument("--pretrained-model-path", type=str, default="smollm2-135m-instruct")
    p.add_argument("--max_sentence_len", type=int, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--option", type=str, choices=("generate", "prompt", "finetune", "lora"), default="generate")
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--generated_sentence_low_temp_out", type=str, default="generated-sentence-temp-0.txt")
    p.add_argument("--generated_sentence_high_temp_out", type=str, default="generated-sentence-temp-1.txt")
    p.add_argument("--dev_out", type=str, default="cfimdb-dev-prompting-output.txt")
    p.add_argument("--test_out", type=str, default="cfimdb-test-prompting-output.txt")
    p.add_argument("--pooling_method", type=str, choices=sorted(POOLING), default="last_token")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--hidden_dropout_prob", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--lora_rank", type=int, default=None, help="default: lmlab's (16), not the seed's 4")
    p.add_argument("--lora_alpha", type=float, default=None, help="default: lmlab's (32), not the seed's 1")
    # lmlab additions (optional)
    p.add_argument("--seeds", type=str, default="", help="comma-separated seeds: mean +/- std over them")
    p.add_argument("--out_dir", type=str, default="", help="run folder (default runs/run_llama/<option>-<data>)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="autocast (default: bf16 on CPU)")
    p.add_argument("--max_train", type=int, default=0, help="first N training examples only (quick runs)")
    return p.parse_args(argv)


def resolve_data_path(path: str) -> str:
    """A `data/<file>` path as in the seed's commands, found in the shared data folder if not here."""
    if Path(path).exists() or not path:
        return path

    name = Path(path).name
    for sub in ("sst5", "cfimdb"):
        candidate = data_dir() / sub / name
        if candidate.exists():
            return str(candidate)
    return path  # the reader's error names the missing file


def model_source(path: str) -> tuple[str, dict, str]:
    """(spec, ModelConfig overrides, tokenizer path) for --pretrained-model-path. A llama2.c `.pt` is the
    assignment's checkpoint: its weights go into the assignment's architecture (SEED_MODEL, LayerNorm), and
    the Llama 2 tokenizer.model is looked for beside it, here, then in the shared data folder."""
    if Path(path).suffix.lower() != ".pt":
        return path, {}, ""
    if not Path(path).is_file():
        raise CheckpointError(f"--pretrained-model-path {path}: not found; the assignment's stories42M.pt is at "
                              f"{STORIES42M_URL} (or use preset:{SEED_MODEL}, the same model randomly initialised)")
    beside = [Path(path).parent / "tokenizer.model", Path("tokenizer.model"),
              data_dir() / "llama2-tokenizer" / "tokenizer.model"]
    tokenizer = next((str(t) for t in beside if t.is_file()), "")
    return path, dict(SEED_NORM), tokenizer


def build_config(args: argparse.Namespace):
    """The ClassifyConfig that the seed's flags describe."""
    cfg = ClassifyConfig()
    method = METHODS[args.option]
    cfg.classify.method = method
    cfg.classify.dropout = args.hidden_dropout_prob
    cfg.classify.pooling = POOLING[args.pooling_method]
    cfg.classify.eval_batch_size = max(args.batch_size, 8)
    cfg.model.spec, overrides, cfg.model.tokenizer = model_source(args.pretrained_model_path)
    cfg.model.overrides = overrides
    cfg.data.train, cfg.data.dev, cfg.data.test = (resolve_data_path(p) for p in (args.train, args.dev, args.test))
    cfg.data.label_names = resolve_data_path(args.label_names)
    cfg.data.test_has_labels = "cfimdb" not in Path(args.test).name  # CFIMDB test labels are placeholders
    cfg.data.max_train = args.max_train
    if args.max_sentence_len:
        cfg.data.max_len = args.max_sentence_len
    cfg.train.epochs, cfg.train.batch_size, cfg.train.seed = float(args.epochs), args.batch_size, args.seed
    cfg.optim.lr = args.lr
    if args.lora_rank is not None:
        cfg.lora.rank = args.lora_rank
    if args.lora_alpha is not None:
        cfg.lora.alpha = args.lora_alpha
    cfg.precision.device = "cuda" if args.use_gpu else "cpu"
    cfg.precision.dtype = args.dtype or "bf16"
    data = Path(args.dev).name.split("-")[0] or "data"
    cfg.out_dir = args.out_dir or f"runs/run_llama/{args.option}-{data}"
    return cfg


def generate_sentences(args: argparse.Namespace) -> None:
    """Two continuations of the seed's prefix, at temperature 0 and 1, one file each."""
    spec, overrides, tokenizer = model_source(args.pretrained_model_path)
    loaded = load_model(spec, device="cuda" if args.use_gpu else "cpu", overrides=overrides,
                        tokenizer=tokenizer or None)
    tok = loaded.tokenizer
    if tok is None:
        raise CheckpointError(f"{spec}: no tokenizer beside this model; put its tokenizer.model next to it")
    prompt = encode_prompt(tok, GENERATE_PREFIX)
    for temperature, out in ((0.0, args.generated_sentence_low_temp_out), (1.0, args.generated_sentence_high_temp_out)):
        cfg = GenerationConfig(max_new_tokens=75, sampling=SamplingConfig(temperature=temperature), seed=args.seed,
                               stop_ids=tuple(sorted(tok.stop_ids)))
        new = generate_ids(loaded.model, [prompt], cfg, pad_id=tok.pad_id or 0)[0]
        # decode prompt and continuation together: a continuation alone loses its leading space
        sentence = tok.decode([i for i in prompt if i != tok.bos_id] + new)
        print(f"Temperature is {temperature}\n{sentence}\n---------------")
        atomic_write_text(Path(out), sentence)
        print(f"Wrote generated sentence to {out}.")


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    try:
        if args.option == "generate":
            generate_sentences(args)
            return 0

        cfg = build_config(args)
        seeds = parse_seeds(args.seeds) or None
        run_classify(cfg, seeds)
        first = Path(cfg.out_dir) / (f"seed_{seeds[0]}" if seeds else "")
        for split, target in (("dev", args.dev_out), ("test", args.test_out)):
            src = first / f"{split}-predictions.txt"
            if src.exists() and target:
                shutil.copyfile(src, target)
                print(f"{split} predictions -> {target}")
    except LmlabError as err:
        print(f"run_llama: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_config", "get_args", "main", "model_source", "resolve_data_path"]
