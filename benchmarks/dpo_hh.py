"""DPO and a reward model on HH-RLHF harmless-base with SmolLM2-135M-Instruct: the held-out numbers of
recipes/reward/hh-rlhf-smollm2.yaml and recipes/dpo/hh-rlhf-smollm2.yaml, with their 95% intervals, against
the issue's targets (DPO implicit-reward accuracy >= 0.60, reward-model accuracy >= 0.65, DPO win rate under
the reward model > 0.5, each interval excluding 0.5).

Runs both recipes in-process (the reward model first: the DPO run's generation check needs it), or formats
finished runs:

    python benchmarks/dpo_hh.py                                   # both recipes (hours on a busy CPU)
    python benchmarks/dpo_hh.py train.threads=1                   # overrides go to both recipes
    python benchmarks/dpo_hh.py --reward-run runs/reward-hh-smollm2 --dpo-run runs/dpo-hh-smollm2
Writes the section "## DPO and reward model (HH-RLHF)" of benchmarks/RESULTS.md (other sections untouched).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADING = "## DPO and reward model (HH-RLHF)"
REWARD_RECIPE, DPO_RECIPE = "recipes/reward/hh-rlhf-smollm2.yaml", "recipes/dpo/hh-rlhf-smollm2.yaml"


def ci(v: dict) -> str:
    return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def verdict(v: dict, target: float) -> str:
    ok = v["value"] >= target and v["low"] > 0.5
    return "met" if ok else ("not met: interval includes 0.5" if v["low"] <= 0.5 else f"not met: below {target}")


def section(reward: dict, dpo: dict, reward_cfg: dict, dpo_cfg: dict) -> str:
    d, r, t = dpo_cfg["data"], reward["test"], dpo["train"]
    before, after = dpo["before"]["test"], dpo["after"]["test"]
    lines = [
        (f"SmolLM2-135M-Instruct (bf16 autocast, CPU). Data: `{d['paths'][0].split('/data/')[-1]}` split "
        f"{d['split']} (seed {d['split_seed']}): {dpo['data']['train']['pairs']} training pairs for DPO (max_train "
        f"{d['max_train'] or 'all'}), {dpo['data']['val']['pairs']} validation, {dpo['data']['test']['pairs']} test; "
        f"prompts cut to their last {d['max_prompt_len']} tokens, sequences to {d['max_len']}."),
        "",
        (f"- Reward model (`{REWARD_RECIPE}`): {reward['data']['train']['pairs']} training pairs (max_train "
        f"{reward_cfg['data']['max_train'] or 'all'}), LoRA r {reward_cfg['lora']['rank']} on "
        f"{reward_cfg['lora']['target_modules']}, lr {reward_cfg['optim']['lr']}, head x{reward_cfg['reward']['head_lr_mult']}, "
        f"centring {reward_cfg['reward']['center']}, {reward['train']['steps']} steps of "
        f"{reward_cfg['train']['batch_size'] * reward_cfg['train']['grad_accum']} pairs in "
        f"{reward['train']['train_time_s'] / 60:.0f} min, peak RSS {reward['train']['peak_mem_mb']:,.0f} MB."),
        (f"- DPO (`{DPO_RECIPE}`): {dpo_cfg['dpo']['loss']} loss, beta {dpo_cfg['dpo']['beta']}, LoRA r "
        f"{dpo_cfg['lora']['rank']} on {dpo_cfg['lora']['target_modules']}, lr {dpo_cfg['optim']['lr']}, reference "
        f"{dpo['reference']['mode']}, {t['steps']} steps of {dpo_cfg['train']['batch_size'] * dpo_cfg['train']['grad_accum']} "
        f"pairs in {t['train_time_s'] / 60:.0f} min ({t['tokens_per_s']:,.0f} tokens/s), peak RSS {t['peak_mem_mb']:,.0f} MB."),
        "",
        "| held-out test pairs | value [95% interval] | target |",
        "|---|---:|---|",
        f"| reference preference before DPO (chosen more likely) | {ci(before['reference_preference'])} | - |",
        (f"| DPO implicit-reward accuracy | {ci(after['implicit_accuracy'])} | >= 0.60: "
        f"{verdict(after['implicit_accuracy'], 0.60)} |"),
        f"| DPO policy preference (chosen more likely) | {ci(after['policy_preference'])} | - |",
        f"| DPO reward margin (beta log-ratio) | {ci(after['rewards/margins'])} | - |",
        f"| reward-model accuracy | {ci(r['accuracy'])} | >= 0.65: {verdict(r['accuracy'], 0.65)} |",
        f"| shorter response preferred (length baseline) | {ci(r['shorter_response_baseline'])} | - |",
    ]
    g = dpo.get("generation")
    if g:
        w = g["win_rate"]
        lines += [
            "",
            (f"Generation-level check: {g['n']} test prompts, one response each from the reference and the DPO "
            f"policy (temperature {g['temperature']}, seed {g['seed']}, at most {g['max_new_tokens']} new tokens), "
            f"both scored by the reward model (test prompts it trained on: {g['reward_model_overlap']})."),
            "",
            "| | mean reward [95%] | mean length (chars) |",
            "|---|---:|---:|",
            f"| reference | {ci(g['mean_reward']['reference'])} | {g['mean_chars']['reference']:.0f} |",
            f"| DPO policy | {ci(g['mean_reward']['policy'])} | {g['mean_chars']['policy']:.0f} |",
            "",
            (f"DPO win rate {ci(w)} ({g['wins']} wins, {g['ties']} ties, {g['losses']} losses; target > 0.5 with "
            f"the interval above 0.5: {'met' if w['low'] > 0.5 else 'not met'})."),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for both recipes")
    ap.add_argument("--reward-run", help="format this finished reward run instead of training")
    ap.add_argument("--dpo-run", help="format this finished DPO run instead of training")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sft_alpaca import write_section

    from lmlab.schema.dpo import DPOConfig
    from lmlab.schema.load import load_config
    from lmlab.schema.reward import RewardConfig
    from lmlab.tasks.dpo import run_dpo
    from lmlab.tasks.reward import run_reward

    if not args.reward_run:
        cfg = load_config(REWARD_RECIPE, args.overrides, schema=RewardConfig)
        run_reward(cfg)
        args.reward_run = cfg.out_dir
    if not args.dpo_run:
        cfg = load_config(DPO_RECIPE, [*args.overrides, f"eval.reward_model={args.reward_run}"], schema=DPOConfig)
        run_dpo(cfg)
        args.dpo_run = cfg.out_dir
    import yaml

    read = lambda run, name: (Path(run) / name).read_text()
    text = section(json.loads(read(args.reward_run, "summary.json")), json.loads(read(args.dpo_run, "summary.json")),
                   yaml.safe_load(read(args.reward_run, "config.yaml")), yaml.safe_load(read(args.dpo_run, "config.yaml")))
    print(text)
    if not args.no_write:
        write_section(text, HEADING)


if __name__ == "__main__":
    main()
