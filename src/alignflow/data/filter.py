"""Stage `filter`: keep the machine instructions worth training on, and count what each rule dropped.

    alignflow filter                # reads params.yaml: filter, paths

Reads:  `paths.generated` (from self_instruct) and `paths.seeds`.
Writes: `paths.filtered` (the kept records, unchanged, in their original order) and
        `<paths.metrics>/filter.json`: `{"in": N, "dropped": {rule: n, ...}, "kept": K}`.

Rules, applied in this order (a record is counted under the first rule it breaks):
  empty_output   the output is empty
  invalid_text   the instruction holds a replacement character (U+FFFD: bytes cut mid-character)
                 or a control character
  too_short      fewer than `min_tokens` ROUGE tokens (words, or CJK characters)
  too_long       more than `max_tokens`
  blacklist      contains a blacklisted keyword (whole word for Latin text, substring for a word with a CJK
                 character, alignflow.core.rouge.CJK)
  punctuation    starts with punctuation
  near_duplicate ROUGE-L F above `rouge_threshold` against any seed instruction or an instruction kept
                 before it (exact, see alignflow.core.rouge; as in Self-Instruct, every seed is in the pool,
                 even one close to another seed)
"""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path
from typing import Any

from alignflow.core import contracts
from alignflow.core.io import atomic_path, dump_json, dump_jsonl, read_jsonl
from alignflow.core.params import FilterParams, Params
from alignflow.core.rouge import NearDuplicateFilter, has_cjk, tokenize
from alignflow.data.records import RECORD_FIELDS, read_seed_tasks

log = logging.getLogger(__name__)

RULES = ("empty_output", "invalid_text", "too_short", "too_long", "blacklist", "punctuation", "near_duplicate")


def blacklist_matcher(words: tuple[str, ...]):
    """A function text -> bool: whole-word, case-insensitive for Latin words; substring for CJK words."""
    latin = [w for w in words if not has_cjk(w)]
    cjk = [w for w in words if has_cjk(w)]
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, latin)) + r")\b", re.IGNORECASE) if latin else None
    return lambda text: bool(pattern and pattern.search(text)) or any(w in text for w in cjk)


def first_rule_broken(record: dict[str, Any], p: FilterParams, blacklisted) -> str | None:
    """The first cheap rule the record breaks, or None (near-duplicates are checked afterwards)."""
    instruction = record["instruction"].strip()
    n_tokens = len(tokenize(instruction))
    if not record["output"].strip():
        return "empty_output"
    if any(c == "\ufffd" or unicodedata.category(c) == "Cc" for c in instruction):
        return "invalid_text"
    if n_tokens < p.min_tokens:
        return "too_short"
    if n_tokens > p.max_tokens:
        return "too_long"
    if blacklisted(instruction):
        return "blacklist"
    if unicodedata.category(instruction[0]).startswith("P"):
        return "punctuation"
    return None


def seeded_pool(seed_instructions: list[str], threshold: float) -> NearDuplicateFilter:
    """The near-duplicate pool before any machine instruction: every seed, unchecked (never written out)."""
    pool = NearDuplicateFilter(threshold=threshold)
    for instruction in seed_instructions:
        pool.add_unchecked(instruction)
    return pool


def run(params: Params) -> str | None:
    p, paths = params.filter, params.paths
    records = [record for _, record in read_jsonl(paths.generated, RECORD_FIELDS)]

    blacklisted = blacklist_matcher(p.blacklist)
    dedup = seeded_pool([seed["instruction"] for seed in read_seed_tasks(paths.seeds)], p.rouge_threshold)

    dropped = dict.fromkeys(RULES, 0)
    kept = []
    for record in records:
        rule = first_rule_broken(record, p, blacklisted)
        if rule is None and not dedup.add(record["instruction"])[0]:
            rule = "near_duplicate"
        if rule:
            dropped[rule] += 1
        else:
            kept.append(record)
    metrics = {"in": len(records), "dropped": dropped, "kept": len(kept)}
    log.info("filter: %s", metrics)

    contracts.validate("filtered_instructions", kept, paths.filtered)
    with atomic_path(paths.filtered) as tmp, atomic_path(Path(paths.metrics) / "filter.json") as tmp_metrics:
        dump_jsonl(kept, tmp)
        dump_json(metrics, tmp_metrics)
    return f"wrote {paths.filtered}: kept {len(kept)} of {len(records)} instructions (dropped: {dict(dropped)})"
