"""Benchmark the exact ROUGE-L near-duplicate filter against the Self-Instruct baseline.

Run from the repository root:

    python benchmarks/bench_rouge.py --n 2000

(the default ``--n`` is 50000, the target scale: ``python benchmarks/bench_rouge.py``).

1. Builds N synthetic instructions (seeded): seed instructions with random word
   edits, recombinations of two seed instructions, and a few word salads.
2. Baseline = the original Self-Instruct way: ``RougeScorer(["rougeL"]).score``
   of each candidate against ALL kept instructions, no pruning. It runs on the
   first items until ``--baseline-seconds`` is spent; our ``NearDuplicateFilter``
   then runs on the same prefix, the decisions are checked to be identical and
   the speed-up is printed.
3. Times our filter alone on all N items and reports the pruning rates.

Results are printed and written to ``benchmarks/results/rouge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rouge_score import rouge_scorer  # noqa: E402

from alignflow.core.rouge import NearDuplicateFilter  # noqa: E402

SEED_PATH = ROOT / ".." / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"


def mutate(words: list[str], vocab: list[str], rng: random.Random, max_edits: int) -> list[str]:
    """Apply up to ``max_edits`` random word deletions / substitutions / insertions."""
    words = list(words)
    for _ in range(rng.randint(0, max_edits)):
        op, i = rng.random(), rng.randrange(max(len(words), 1))
        if op < 0.35 and len(words) > 1:
            del words[i]
        elif op < 0.7 and words:
            words[i] = rng.choice(vocab)
        else:
            words.insert(i, rng.choice(vocab))
    return words


def synthetic_instructions(seeds: list[str], n: int, seed: int = 0) -> list[str]:
    """N instructions: 45% edited seeds, 45% recombined pairs, 10% word salads."""
    rng = random.Random(seed)
    split = [s.split() for s in seeds]
    vocab = sorted({w for words in split for w in words})
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            words = mutate(rng.choice(split), vocab, rng, max_edits=6)
        elif r < 0.9:
            a, b = rng.choice(split), rng.choice(split)
            words = a[: rng.randint(1, len(a))] + b[rng.randint(0, len(b) - 1):]
            words = mutate(words, vocab, rng, max_edits=3)
        else:
            words = rng.sample(vocab, rng.randint(5, 25))
        out.append(" ".join(words))
    return out


def baseline(texts: list[str], budget_s: float, threshold: float = 0.7):
    """Self-Instruct's filter: score each candidate against every kept one."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept, decisions, pairs = [], [], 0
    start = time.perf_counter()
    for text in texts:
        if time.perf_counter() - start > budget_s:
            break
        scores = [scorer.score(text, k)["rougeL"].fmeasure for k in kept]
        pairs += len(scores)
        dup = bool(scores) and max(scores) > threshold
        decisions.append(not dup)
        if not dup:
            kept.append(text)
    return decisions, time.perf_counter() - start, pairs


def ours(texts: list[str], threshold: float = 0.7, checkpoint: int = 0):
    """Run NearDuplicateFilter; returns decisions, seconds, stats, checkpoints."""
    flt = NearDuplicateFilter(threshold)
    decisions, checkpoints = [], []
    start = time.perf_counter()
    for i, text in enumerate(texts, 1):
        decisions.append(flt.add(text)[0])
        if checkpoint and i % checkpoint == 0:
            checkpoints.append({"n": i, "seconds": round(time.perf_counter() - start, 2),
                                "kept": sum(decisions)})
    return decisions, time.perf_counter() - start, dict(flt.stats), checkpoints


def pruning_rates(stats: dict) -> dict:
    pairs = max(stats.get("pairs", 0), 1)
    return {
        "pairs": stats.get("pairs", 0),
        "skipped_by_length_bound": stats.get("length_pruned", 0) / pairs,
        "skipped_by_overlap_bound": stats.get("overlap_pruned", 0) / pairs,
        "survived_bounds": stats.get("survivors", 0) / pairs,
        "lcs_computed": stats.get("lcs", 0) / pairs,
        "skipped_after_first_match": (stats.get("survivors", 0) - stats.get("lcs", 0)) / pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="items for our filter alone")
    parser.add_argument("--baseline-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rouge.json")
    args = parser.parse_args()

    with open(SEED_PATH, encoding="utf-8") as f:
        seeds = [json.loads(line)["instruction"] for line in f if line.strip()]
    texts = synthetic_instructions(seeds, args.n, seed=args.seed)

    base_dec, base_s, base_pairs = baseline(texts, args.baseline_seconds)
    subset = texts[: len(base_dec)]
    our_dec, our_s, our_stats, _ = ours(subset)
    assert our_dec == base_dec, "decisions differ from the rouge_score baseline"
    comparison = {
        "subset_n": len(subset), "kept": sum(base_dec), "baseline_pairs": base_pairs,
        "baseline_seconds": round(base_s, 3), "ours_seconds": round(our_s, 4),
        "speedup": round(base_s / our_s, 1), "decisions_identical": True,
    }
    print(f"[subset n={len(subset)}] baseline {base_s:.1f}s, ours {our_s:.3f}s, "
          f"speed-up x{base_s / our_s:.1f}, decisions identical, kept {sum(base_dec)}")

    full_dec, full_s, full_stats, checkpoints = ours(texts, checkpoint=max(args.n // 10, 1))
    rates = pruning_rates(full_stats)
    full = {"n": args.n, "kept": sum(full_dec), "seconds": round(full_s, 2),
            "items_per_second": round(args.n / full_s, 1), "pruning": rates,
            "checkpoints": checkpoints}
    print(f"[full n={args.n}] ours {full_s:.1f}s ({args.n / full_s:.0f} items/s), "
          f"kept {sum(full_dec)}")
    for key, value in rates.items():
        print(f"  {key}: {value:.6f}" if isinstance(value, float) else f"  {key}: {value}")

    result = {"command": " ".join(["python"] + sys.argv), "threshold": 0.7,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "baseline_vs_ours": comparison, "ours_full": full}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
