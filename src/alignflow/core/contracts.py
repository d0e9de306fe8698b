"""Data contracts: one great-expectations suite per dataset the pipeline writes.

`validate(name, records, data_path)` checks the records against suite `name` in an ephemeral
great-expectations context before the stage renames `data_path` into place. On failure it writes the
full validation result to `<data_path>.validation.json`, and raises `ContractError` listing each failed
expectation with a few offending rows; the stage then exits non-zero and writes no data.

Suites are plain data (expectation name -> arguments) so a newcomer reads them at a glance; nested
fields are flattened into scalar columns by the suite's `columns` function first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignflow.core.io import dump_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


class ContractError(ValueError):
    """A dataset broke its contract."""


@dataclass(frozen=True)
class Suite:
    columns: Callable[[dict[str, Any]], dict[str, Any]]  # record -> flat row
    expectations: Sequence[tuple[str, dict[str, Any]]]  # (ExpectationClassName, kwargs)
    # checks across records: all records -> {column: one value per record}
    derived: Callable[[Sequence[dict[str, Any]]], dict[str, list[Any]]] | None = None


def _prompt_in_both_splits(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    sides: dict[str, set[str]] = {}
    for r in records:
        sides.setdefault(r.get("prompt_id"), set()).add(r.get("split"))
    return {"prompt_in_both_splits": [len(sides[r.get("prompt_id")]) > 1 for r in records]}


def _text(column: str, min_length: int = 1, max_length: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("ExpectColumnValuesToNotBeNull", {"column": column}),
        ("ExpectColumnValuesToBeOfType", {"column": column, "type_": "str"}),
        ("ExpectColumnValueLengthsToBeBetween", {"column": column, "min_value": min_length, "max_value": max_length}),
    ]


def _unique_id() -> list[tuple[str, dict[str, Any]]]:
    return [("ExpectColumnValuesToBeUnique", {"column": "id"}), *_text("id")]


def _bool(column: str) -> list[tuple[str, dict[str, Any]]]:
    return [("ExpectColumnValuesToBeInSet", {"column": column, "value_set": [True, False]})]


def _instruction_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("id", "instruction", "input", "output", "is_classification")}


SUITES: dict[str, Suite] = {
    "seed_tasks": Suite(
        columns=lambda r: {
            "id": r.get("id"),
            "instruction": r.get("instruction"),
            "is_classification": r.get("is_classification"),
            "n_instances": len(r.get("instances") or []),
            "first_output": (r.get("instances") or [{}])[0].get("output"),
        },
        expectations=[
            *_unique_id(),
            *_text("instruction"),
            *_bool("is_classification"),
            ("ExpectColumnValuesToBeBetween", {"column": "n_instances", "min_value": 1}),
            *_text("first_output"),
        ],
    ),
    "machine_instructions": Suite(
        columns=lambda r: {**_instruction_row(r), "round": (r.get("provenance") or {}).get("round")},
        expectations=[
            *_unique_id(),
            *_text("instruction", max_length=4000),
            *_text("input", min_length=0),
            *_text("output", min_length=0),
            *_bool("is_classification"),
            ("ExpectColumnValuesToBeBetween", {"column": "round", "min_value": 0}),
        ],
    ),
    "filtered_instructions": Suite(
        columns=_instruction_row,
        expectations=[
            *_unique_id(),
            *_text("instruction"),
            ("ExpectColumnValuesToBeUnique", {"column": "instruction"}),
            *_text("input", min_length=0),
            *_text("output"),
            *_bool("is_classification"),
        ],
    ),
    "formatted": Suite(
        columns=lambda r: {
            "id": r.get("id"),
            "split": r.get("split"),
            "prompt": r.get("prompt"),
            "completion": r.get("completion"),
            "text": r.get("text"),
            "chat_text": r.get("chat_text"),
            "n_messages": len(r.get("messages") or []),
        },
        expectations=[
            *_unique_id(),
            ("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": ["train", "eval"]}),
            *_text("prompt"),
            *_text("completion"),
            *_text("text"),
            *_text("chat_text"),
            ("ExpectColumnValuesToBeBetween", {"column": "n_messages", "min_value": 2, "max_value": 3}),
        ],
    ),
    "samples": Suite(
        columns=lambda r: {
            "prompt_id": r.get("prompt_id"), "source_id": r.get("source_id"), "harmful": r.get("harmful"),
            "n_prompt_messages": len(r.get("prompt") or []), "n_responses": len(r.get("responses") or []),
            "response_ids_unique": len({x.get("id") for x in r.get("responses") or []}) == len(r.get("responses") or []),
            "responses_are_text": all(isinstance(x.get("text"), str) for x in r.get("responses") or []),
        },
        expectations=[
            ("ExpectColumnValuesToBeUnique", {"column": "prompt_id"}),
            *_text("prompt_id"),
            *_text("source_id"),
            *_bool("harmful"),
            ("ExpectColumnValuesToBeBetween", {"column": "n_prompt_messages", "min_value": 1}),
            ("ExpectColumnValuesToBeBetween", {"column": "n_responses", "min_value": 1}),
            ("ExpectColumnValuesToBeInSet", {"column": "response_ids_unique", "value_set": [True]}),
            ("ExpectColumnValuesToBeInSet", {"column": "responses_are_text", "value_set": [True]}),
        ],
    ),
    "pairs": Suite(
        columns=lambda r: {
            "id": r.get("id"), "prompt_id": r.get("prompt_id"), "split": r.get("split"),
            "n_prompt_messages": len(r.get("prompt") or []), "chosen": r.get("chosen"), "rejected": r.get("rejected"),
            "same_answer": (r.get("chosen") or "").strip() == (r.get("rejected") or "").strip(),
            "judge": (r.get("judge") or {}).get("kind"),
        },
        expectations=[
            *_unique_id(),
            *_text("prompt_id"),
            ("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": ["train", "eval"]}),
            ("ExpectColumnValuesToBeBetween", {"column": "n_prompt_messages", "min_value": 1}),
            *_text("chosen"),
            *_text("rejected"),
            ("ExpectColumnValuesToBeInSet", {"column": "same_answer", "value_set": [False]}),
            ("ExpectColumnValuesToBeInSet", {"column": "judge", "value_set": ["import", "ai", "rules", "constitution", "human"]}),
            ("ExpectColumnValuesToBeInSet", {"column": "prompt_in_both_splits", "value_set": [False]}),
        ],
        derived=_prompt_in_both_splits,
    ),
    "evaluation": Suite(  # one model's responses to the held-out prompts (evaluate/evaluate.py)
        columns=lambda r: {
            "id": r.get("id"), "category": r.get("category"), "lang": r.get("lang"), "harmful": r.get("harmful"),
            "refused": r.get("refused"), "response": r.get("response"), "reward": r.get("reward"),
            "response_tokens": r.get("response_tokens"),
        },
        expectations=[
            *_unique_id(),
            ("ExpectColumnValuesToBeInSet", {"column": "category", "value_set": ["benign", "benign_alarming", "harmful"]}),
            ("ExpectColumnValuesToBeInSet", {"column": "lang", "value_set": ["en", "zh"]}),
            *_bool("harmful"),
            *_bool("refused"),
            *_text("response", min_length=0),
            ("ExpectColumnValuesToNotBeNull", {"column": "reward"}),
            ("ExpectColumnValuesToBeBetween", {"column": "response_tokens", "min_value": 0}),
        ],
    ),
}


def _failure_summary(result: Any, rows: list[dict[str, Any]], limit: int = 3) -> list[str]:
    lines = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        column = config.kwargs.get("column")
        found = item.result or {}
        indices = (found.get("unexpected_index_list") or [])[:limit]
        examples = [f"row {i} (id={rows[i].get('id', rows[i].get('prompt_id'))!r}): {rows[i].get(column)!r}"[:160] for i in indices]
        if not indices and found.get("partial_unexpected_list"):
            examples = [repr(v)[:120] for v in found["partial_unexpected_list"][:limit]]
        count = found.get("unexpected_count")
        head = f"{config.type}(column={column!r})" + (f": {count} rows" if count is not None else "")
        lines.append(head + "".join(f"\n      {e}" for e in examples))
    return lines


def validate(name: str, records: Sequence[dict[str, Any]], data_path: str | Path) -> None:
    """Check `records` against suite `name`; on failure write `<data_path>.validation.json` and raise."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines drown the stage's log
    import great_expectations as gx  # slow import (~5 s): only when a stage validates
    import pandas as pd

    suite_def = SUITES[name]
    rows = [suite_def.columns(r) for r in records]
    if suite_def.derived:
        for column, values in suite_def.derived(records).items():
            for row, value in zip(rows, values):
                row[column] = value
    frame = pd.DataFrame(rows, columns=list(rows[0].keys()) if rows else None, dtype=object)

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("alignflow").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name=name)
    for expectation, kwargs in suite_def.expectations:
        suite.add_expectation(getattr(gx.expectations, expectation)(**kwargs))
    if not rows:
        raise ContractError(f"{data_path}: contract '{name}': the dataset is empty")
    result = batch.validate(suite, result_format="COMPLETE")
    if result.success:
        return
    report = Path(f"{data_path}.validation.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    dump_json(result.to_json_dict(), report)
    failed = _failure_summary(result, rows)
    raise ContractError(
        f"{data_path}: contract '{name}' failed ({len(failed)} expectations; full result in {report}):\n    "
        + "\n    ".join(failed)
    )
