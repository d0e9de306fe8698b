"""Preference pairs: one schema for every source, rankings turned into pairs, and imports of public data.

    alignflow import-preferences hh.jsonl data/preferences/imported.jsonl --eval-fraction 0.1
    alignflow import-preferences hh.jsonl data/preferences/imported.jsonl --skip-bad   # keep the good pairs

A pair record (JSONL):
    {"id", "prompt_id", "prompt": [chat messages], "chosen": str, "rejected": str,
     "judge": {"kind": "import" | "ai" | "rules" | "constitution" | "human", ...}, "split": "train" | "eval"}

Reads the three common public shapes, detected per line:
- flat strings:        {"prompt": str, "chosen": str, "rejected": str}
- chat message lists:  {"chosen": [messages], "rejected": [messages]} (the shared prefix is the prompt;
                       an optional "prompt" string is used when the lists hold only the answer)
- HH transcripts:      {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
The split is by prompt (`assign_splits`: a seeded hash of `prompt_id`), so no prompt is on both sides.
Strict by default: the first bad record stops the import with its file:line and reason, and nothing is written.
With `skip_bad`, the good pairs are written and `<output>.report.json` beside them counts what was read, written,
skipped (by reason) and repeated, and names every skipped record (file:line and reason).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from itertools import combinations
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from alignflow.core import contracts
from alignflow.core.io import InputError, atomic_path, dump_json, dump_jsonl, read_jsonl, read_tolerant

log = logging.getLogger(__name__)

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def prompt_id(prompt: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def assign_splits(pairs: list[dict[str, Any]], seed: int, eval_fraction: float) -> list[dict[str, Any]]:
    """Set each pair's `split` by its prompt: the prompts are ordered by a seeded hash and the first
    round(n * eval_fraction) of them (at least one, when there are two or more) go to eval, so all pairs
    of one prompt land on the same side and even a small set has both sides."""
    pids = sorted({p["prompt_id"] for p in pairs}, key=lambda pid: hashlib.sha256(f"{seed}\x00{pid}".encode()).digest())
    n_eval = max(1, round(len(pids) * eval_fraction)) if len(pids) >= 2 else 0
    held_out = set(pids[:n_eval])
    for pair in pairs:
        pair["split"] = "eval" if pair["prompt_id"] in held_out else "train"
    return pairs


def ranking_to_pairs(ranked: list[list[str]]) -> list[tuple[str, str]]:
    """All (better, worse) pairs of a ranking given best first as tiers; responses in one tier are tied
    and make no pair. K responses in K tiers give K*(K-1)/2 pairs, as in InstructGPT."""
    return [(better, worse) for hi, lo in combinations(range(len(ranked)), 2) for better in ranked[hi] for worse in ranked[lo]]


def _hh_messages(text: str, where: str) -> list[dict[str, str]]:
    parts = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3 or parts[0].strip():
        raise InputError(f"{where}: not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _split_dialogue(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], str, str]:
    """Shared prefix = prompt; the final assistant messages are the two answers."""
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1].get("role") != "assistant":
            raise InputError(f"{where}: field '{name}': must end with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise InputError(f"{where}: fields 'chosen' and 'rejected': the conversations differ before the last answer")
    return [{"role": m["role"], "content": m["content"]} for m in chosen[:-1]], chosen[-1]["content"], rejected[-1]["content"]


def parse_pair(record: dict[str, Any], where: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen text, rejected text) from any supported public shape."""
    for field in ("chosen", "rejected"):
        if field not in record:
            raise InputError(f"{where}: field '{field}': missing")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is not None and all(m.get("role") == "assistant" for m in chosen + rejected):
            chosen, rejected = [{"role": "user", "content": prompt}] + chosen, [{"role": "user", "content": prompt}] + rejected
        messages, good, bad = _split_dialogue(chosen, rejected, where)
    elif isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        messages, good, bad = [{"role": "user", "content": prompt}], chosen, rejected
    elif isinstance(chosen, str) and isinstance(rejected, str):
        messages, good, bad = _split_dialogue(_hh_messages(chosen, where), _hh_messages(rejected, where), where)
    else:
        raise InputError(f"{where}: fields 'chosen' / 'rejected': expected two strings (with 'prompt'), "
                         "two message lists, or two Human/Assistant transcripts")
    if not messages or not any(m["content"].strip() for m in messages):
        raise InputError(f"{where}: empty prompt")
    for field, answer in (("chosen", good), ("rejected", bad)):
        if not answer.strip():
            raise InputError(f"{where}: field '{field}': empty final answer")
    if good.strip() == bad.strip():
        raise InputError(f"{where}: fields 'chosen' and 'rejected': the same answer")
    return messages, good, bad


def make_pair(messages: list[dict[str, str]], chosen: str, rejected: str, judge: dict[str, Any]) -> dict[str, Any]:
    """A pair record; its `split` is set by `assign_splits` once all pairs are known."""
    pid = prompt_id(messages)
    pair_hash = hashlib.sha256(json.dumps([pid, chosen, rejected], ensure_ascii=False).encode()).hexdigest()[:16]
    return {"id": pair_hash, "prompt_id": pid, "prompt": messages, "chosen": chosen, "rejected": rejected,
            "judge": judge, "split": None}


def import_file(source: str, output: str, seed: int, eval_fraction: float, skip_bad: bool = False) -> dict[str, Any]:
    """Read a public preference file, write it in the pair schema (validated, atomically); return the report."""
    def parse(record: dict[str, Any], where: str) -> dict[str, Any]:
        messages, chosen, rejected = parse_pair(record, where)
        return make_pair(messages, chosen, rejected, {"kind": "import", "source": source, "line": int(where.rsplit(":", 1)[1])})

    parsed, skipped = read_tolerant(source, parse, skip_bad)
    pairs: dict[str, dict[str, Any]] = {}
    for pair in parsed:
        pairs.setdefault(pair["id"], pair)  # the same pair twice is kept once
    records = assign_splits(list(pairs.values()), seed, eval_fraction)
    contracts.validate("pairs", records, output)
    report = skip_report(source, len(parsed) + len(skipped), len(records), skipped, repeated=len(parsed) - len(pairs))
    with atomic_path(output) as tmp, atomic_path(report_path(output)) as tmp_report:
        dump_jsonl(records, tmp)
        dump_json(report, tmp_report)
    log.info("imported %d pairs (%d prompts) from %s into %s; %d records skipped%s", len(records),
             len({r["prompt_id"] for r in records}), source, output, len(skipped), f" (see {report_path(output)})" if skipped else "")
    return report


def report_path(output: str) -> Path:
    """`<output>.report.json`: what an import read, wrote and skipped."""
    return Path(f"{output}.report.json")


def skip_report(source: str, read: int, written: int, skipped: list[dict[str, str]], repeated: int = 0) -> dict[str, Any]:
    """Counts of an import and every skipped record: {"where": "file:line", "reason"}, by reason too."""
    reasons: dict[str, int] = {}
    for item in skipped:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    return {"source": source, "records": read, "written": written, "repeated": repeated, "skipped": len(skipped),
            "skipped_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])), "skipped_records": skipped}


# --- reading the pairs back (reward_model and the alignment stages) ---


@dataclass
class PreferenceSplit:
    prompts: list[list[dict[str, str]]]
    chosen: list[str]
    rejected: list[str]

    @property
    def dataset(self):
        """TRL's conversational preference format: prompt messages, chosen / rejected assistant turns."""
        from datasets import Dataset

        return Dataset.from_list([{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
                                   "rejected": [{"role": "assistant", "content": r}]}
                                  for p, c, r in zip(self.prompts, self.chosen, self.rejected)])


def load_preference_splits(path: str) -> tuple[PreferenceSplit, PreferenceSplit]:
    splits = {"train": PreferenceSplit([], [], []), "eval": PreferenceSplit([], [], [])}
    for line, pair in read_jsonl(path, {"prompt": list, "chosen": str, "rejected": str, "split": str}):
        if pair["split"] not in splits:
            raise InputError(f"{path}:{line}: field 'split': expected 'train' or 'eval', got {pair['split']!r}")
        split = splits[pair["split"]]
        split.prompts.append(pair["prompt"])
        split.chosen.append(pair["chosen"])
        split.rejected.append(pair["rejected"])
    for name, split in splits.items():
        if not split.prompts:
            raise InputError(f"{path}: no {name} pairs; the alignment stages train on 'train' and measure on 'eval'")
    return splits["train"], splits["eval"]
