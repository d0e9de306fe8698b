"""`alignflow diff OLD NEW`: which differences between two revisions' evaluations are beyond noise.

    alignflow diff main dpo-beta-high           # two git revisions (branches, tags, commits; `dvc exp branch` names)
    alignflow diff HEAD workspace --json diff.json

`dvc metrics diff` puts two numbers side by side; this says whether they differ. It reads, at each revision (git
show; `workspace` = the files on disk), `<paths.metrics>/evaluation.json` and each model's per-prompt answers
`<paths.evaluation>/<model>.jsonl` and per-text NLL `<model>.heldout.jsonl` (all in git: cache: false in dvc.yaml).
For every model evaluated in both, on the same prompts:
  - reward, refusal rate per category and over the benign ones, response length: NEW minus OLD, paired by prompt
    (a seeded bootstrap over prompts), and the perplexity ratio NEW / OLD paired by text;
  - when one side's per-prompt file is missing or its prompts differ: the unpaired difference of the two
    summaries' intervals (normal approximation), marked as such;
plus the reward model's held-out accuracy and the SFT held-out loss change (unpaired: their pairs and examples may
differ). Each difference holds when its 95% interval excludes no change. Prints a table; `--json OUT` writes it.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from alignflow.core.io import InputError, atomic_path, dump_json
from alignflow.core.params import Params
from alignflow.core.stats import paired_perplexity_ratio, unpaired_difference
from alignflow.evaluate.compare import paired_differences

log = logging.getLogger(__name__)

WORKSPACE = "workspace"


def read_at(rev: str, path: str) -> str | None:
    """A file's text at a git revision (`workspace`: on disk), or None where it does not exist."""
    if rev == WORKSPACE:
        return Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        if "unknown revision" in shown.stderr or "bad revision" in shown.stderr or "invalid object name" in shown.stderr:
            raise InputError(f"git: no revision {rev!r} ({shown.stderr.strip()})")
        return None
    return shown.stdout


def rows_at(rev: str, path: str) -> list[dict[str, Any]] | None:
    text = read_at(rev, path)
    return None if text is None else [json.loads(line) for line in io.StringIO(text) if line.strip()]


def model_differences(old: list[dict], new: list[dict], old_texts: list[dict] | None, new_texts: list[dict] | None,
                      seed: int) -> dict[str, Any]:
    """NEW minus OLD on the same prompts (compare's paired differences, OLD as the reference), and the perplexity
    ratio on the same texts."""
    result: dict[str, Any] = {"paired": True, "prompts": len(new), **paired_differences(new, old, seed)}
    if old_texts and new_texts and [t["text"] for t in old_texts] == [t["text"] for t in new_texts]:
        result["perplexity_ratio"] = paired_perplexity_ratio(([t["nll"] for t in new_texts], [t["tokens"] for t in new_texts]),
                                                             ([t["nll"] for t in old_texts], [t["tokens"] for t in old_texts]), seed)
    return result


def summary_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """NEW minus OLD from the two summaries' intervals alone (unpaired)."""
    result: dict[str, Any] = {"paired": False, "reward": unpaired_difference(new["reward_mean"], old["reward_mean"])}
    for category, rate in new["refusal_rate"].items():
        result[f"{category}_refusal_rate"] = unpaired_difference(rate, old["refusal_rate"][category])
    result["over_refusal_rate"] = unpaired_difference(new["over_refusal_rate"], old["over_refusal_rate"])
    result["response_tokens"] = unpaired_difference(new["response_tokens_mean"], old["response_tokens_mean"])
    return result


def compare_revisions(params: Params, old_rev: str, new_rev: str) -> dict[str, Any]:
    paths = params.paths
    summary_path = f"{paths.metrics}/evaluation.json"
    summaries = {}
    for rev in (old_rev, new_rev):
        text = read_at(rev, summary_path)
        if text is None:
            raise InputError(f"{rev}:{summary_path}: missing (no evaluation at this revision: dvc repro, then commit)")
        summaries[rev] = json.loads(text)
    models: dict[str, Any] = {}
    for name in summaries[new_rev]["models"]:
        if name not in summaries[old_rev]["models"]:
            continue
        old, new = (rows_at(rev, f"{paths.evaluation}/{name}.jsonl") for rev in (old_rev, new_rev))
        if old is not None and new is not None and sorted(r["id"] for r in old) == sorted(r["id"] for r in new):
            texts = [rows_at(rev, f"{paths.evaluation}/{name}.heldout.jsonl") for rev in (old_rev, new_rev)]
            models[name] = model_differences(old, new, *texts, params.seed)
        else:
            models[name] = summary_differences(summaries[old_rev]["models"][name], summaries[new_rev]["models"][name])
    stages: dict[str, Any] = {}
    rm = [read_at(rev, f"{paths.metrics}/reward_model.json") for rev in (old_rev, new_rev)]
    if all(rm):
        old_rm, new_rm = (json.loads(t) for t in rm)
        if isinstance(new_rm.get("eval_accuracy"), dict) and isinstance(old_rm.get("eval_accuracy"), dict):
            stages["reward_model_accuracy"] = unpaired_difference(new_rm["eval_accuracy"], old_rm["eval_accuracy"])
    sft = [read_at(rev, f"{paths.metrics}/sft.json") for rev in (old_rev, new_rev)]
    if all(sft):
        old_sft, new_sft = (json.loads(t) for t in sft)
        if "eval_loss_change" in old_sft and "eval_loss_change" in new_sft:
            stages["sft_eval_loss_change"] = unpaired_difference(new_sft["eval_loss_change"], old_sft["eval_loss_change"])
    return {"old": old_rev, "new": new_rev, "models": models, "stages": stages}


def table(result: dict[str, Any]) -> list[str]:
    def cell(d: dict[str, Any] | None, digits: int = 3) -> str:
        if not d or d.get("value") is None:
            return "n/a"
        return f"{d['value']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]{' *' if d.get('holds') else ''}"

    lines = [f"{result['new']} minus {result['old']} (* : beyond noise at 95%)", "",
             "| model | paired | reward | harmful refused | alarming-benign refused | benign refused | tokens | perplexity ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d in result["models"].items():
        ratio = d.get("perplexity_ratio")
        ratio_cell = "n/a" if not ratio else f"{ratio['value']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]{' *' if ratio['holds'] else ''}"
        lines.append(f"| {name} | {'yes' if d['paired'] else 'no'} | {cell(d['reward'])} | {cell(d.get('harmful_refusal_rate'), 2)} | "
                     f"{cell(d.get('benign_alarming_refusal_rate'), 2)} | {cell(d.get('benign_refusal_rate'), 2)} | "
                     f"{cell(d['response_tokens'], 1)} | {ratio_cell} |")
    for name, d in result["stages"].items():
        lines.append(f"\n{name.replace('_', ' ')}: {cell(d)} (unpaired)")
    return lines


def run(params: Params, old_rev: str, new_rev: str, json_out: str | None = None) -> str:
    result = compare_revisions(params, old_rev, new_rev)
    print("\n".join(table(result)))
    if json_out:
        with atomic_path(json_out) as tmp:
            dump_json(result, tmp)
    beyond = sorted(f"{model}.{key}" for model, d in result["models"].items() for key, v in d.items()
                    if isinstance(v, dict) and v.get("holds"))
    return (f"{len(result['models'])} models compared, {len(beyond)} differences beyond noise"
            + (f": {', '.join(beyond)}" if beyond else ""))
