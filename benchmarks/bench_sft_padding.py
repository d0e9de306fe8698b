"""Benchmark SFT on skewed lengths: padded batches against padding-free batches (TRL), in fp32 and in bf16 autocast,
real tokens/s, in one run.

Run from the repository root (after `bash setup.sh` and `dvc repro base_model`):

    python benchmarks/bench_sft_padding.py --json benchmarks/results/sft_padding.json
    python benchmarks/bench_sft_padding.py --steps 4 --batch-size 4          # quicker
    python benchmarks/bench_sft_padding.py --precisions fp32                 # padding only

The data: the 175 Self-Instruct seed tasks as prompt / completion pairs whose completions are stretched to skewed
lengths (log-normal, median `--median-tokens`, a long tail cut at `--max-tokens`): the shape of real SFT data, where
a few long answers set the padded length of every batch they land in. Both modes train the same LoRA (the sft
stage's default) on the same examples in the same order (`--steps` steps of `--batch-size`: forward, backward and
AdamW, the part of a Trainer step that padding changes), each in a child process of its own (peak RSS is its own):
- `padded`: TRL's default collator, every batch padded to its longest example;
- `padding_free`: TRL's `padding_free=True`: a batch is one row of its examples back to back, with position ids
  restarting at each example, which transformers turns into a block-diagonal causal mask (no example sees another)
  when the model is called without a KV cache, as TRL calls it.
Real tokens/s counts prompt + completion tokens (never padding) over the training time. The first step's loss of
the two modes must agree (the same maths on the same batch), and the run says whether it did.
Each mode runs in each of `--precisions`: `fp32`, and `bf16` (bf16 autocast over fp32 weights and AdamW state, as the
Trainer runs under `distributed.mixed_precision: bf16`; fast only where the CPU computes bf16: AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from alignflow.core.models import use_bf16

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"
MODES = ("padded", "padding_free")
PRECISIONS = ("fp32", "bf16")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def examples(tokenizer, n: int, median: int, cap: int, seed: int) -> list[dict]:
    """Prompt / completion pairs from the seed tasks, completions stretched to log-normal token lengths."""
    tasks = [json.loads(line) for line in SEEDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        answer = " ".join(inst["output"] for inst in task["instances"]) or task["instruction"]
        target = min(cap, max(4, int(rng.lognormvariate(math.log(median), 1.0))))
        words = answer.split() or ["ok"]
        text = " ".join(words[j % len(words)] for j in range(target))  # about one token per word or more
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:target]
        rows.append({"prompt": [{"role": "user", "content": task["instruction"]}],
                     "completion": [{"role": "assistant", "content": tokenizer.decode(ids)}]})
    return rows


def child(args: argparse.Namespace) -> dict:
    """One mode: the batches built by TRL's collator (padded, or padding-free), then `--steps` LoRA training steps
    (forward, backward, AdamW) of the sft stage's default method, timed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = examples(tokenizer, args.steps * args.batch_size, args.median_tokens, args.max_tokens, args.seed)
    features = []
    for row in rows:  # the loss is on the completion only, as in the sft stage
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
        features.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]})
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=args.mode == "padding_free")
    keys = ("input_ids", "labels", "position_ids") if args.mode == "padding_free" else ("input_ids", "labels", "attention_mask")
    batches = [{k: v for k, v in collate(features[i:i + args.batch_size]).items() if k in keys}
               for i in range(0, len(features), args.batch_size)]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    losses, start = [], time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**batch, use_cache=False).loss  # as TRL calls it: without a cache, transformers finds the
            # examples' boundaries in a padding-free row's position ids and masks across them (with a cache it would not)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    real = sum(len(f["input_ids"]) for f in features)
    processed = sum(b["input_ids"].numel() for b in batches)
    return {"mode": args.mode, "precision": args.precision, "steps": len(batches), "batch_size": args.batch_size, "examples": len(features),
            "real_tokens": real, "tokens_through_the_model": processed, "longest": max(len(f["input_ids"]) for f in features),
            "seconds": round(seconds, 2), "real_tokens_per_s": round(real / seconds, 1),
            "first_loss": losses[0], "losses": losses, "peak_rss_mib": round(peak_rss_mib(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "base"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--median-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp32, bf16")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    if not Path(args.model).is_dir():
        sys.exit(f"{args.model}: no such checkpoint directory; run `dvc repro base_model` first, or pass --model")
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or set(precisions) - set(PRECISIONS):
        sys.exit(f"--precisions {args.precisions!r}: expected a comma-separated subset of {', '.join(PRECISIONS)}")
    rows = []
    for precision in precisions:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, "--precision", precision, "--model", args.model,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--median-tokens",
                   str(args.median_tokens), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            if done.returncode != 0:
                sys.exit(f"{mode} {precision} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    rate = {(r["mode"], r["precision"]): r["real_tokens_per_s"] for r in rows}
    baseline = rate[("padded", "fp32")] if "fp32" in precisions else rate[("padded", precisions[0])]
    ratios, agree = {}, {}
    print()
    for precision in precisions:
        padded, free = (next(r for r in rows if r["mode"] == m and r["precision"] == precision) for m in MODES)
        speedup = free["real_tokens_per_s"] / padded["real_tokens_per_s"]
        # the same batch through the same maths: fp32 agrees to rounding; bf16 rounds a padded and a packed row apart
        agree[precision] = math.isclose(padded["first_loss"], free["first_loss"], rel_tol=1e-3 if precision == "fp32" else 2e-2)
        ratios[f"padding_free_vs_padded_{precision}"] = round(speedup, 2)
        print(f"{precision}: real tokens/s padded {padded['real_tokens_per_s']}, padding-free {free['real_tokens_per_s']} "
              f"({speedup:.2f}x); first-step loss {padded['first_loss']:.5f} vs {free['first_loss']:.5f} "
              f"({'the same' if agree[precision] else 'DIFFERENT'}); peak RSS {padded['peak_rss_mib']} vs "
              f"{free['peak_rss_mib']} MiB")
    for (mode, precision), value in rate.items():
        ratios[f"{mode}_{precision}_vs_padded_{'fp32' if 'fp32' in precisions else precisions[0]}"] = round(value / baseline, 2)
    print("ratios:", json.dumps(ratios))
    if args.json:
        result = {"command": " ".join(["python", "benchmarks/bench_sft_padding.py", *sys.argv[1:]]),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor(),
                              "cpu_computes_bf16": use_bf16("auto", "cpu")},
                  "ratios": ratios, "first_step_loss_agrees": agree, "results": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
