"""Public prompt sets in: any prompt / instruction JSONL or CSV as the pipeline's prompt file.

    alignflow import-prompts user_oriented_instructions.jsonl data/eval/self_instruct_user.jsonl --category benign
    alignflow import-prompts redteam.csv data/eval/redteam.jsonl --text-column question --category-column label \
        --harmful-values unsafe,harmful --skip-bad

Writes the schema of `paths.eval_prompts` and `paths.prompts` (both stages read it):
    {"id", "prompt", "category": "benign" | "benign_alarming" | "harmful", "harmful": bool, "lang": "en" | "zh"}
so a user points `paths.eval_prompts` (evaluate) or `paths.prompts` (samples) at the output.

- the text: `--text-column` (default: the first of prompt, instruction, question, text that the record has); a
  Self-Instruct task's first instance input, when it has one, is appended as the task's input;
- the category: `--category` for the whole set, or `--category-column`: a value that is one of the three categories
  is taken as is; otherwise the value is harmful when it is in `--harmful-values` (default true, 1, yes, harmful,
  unsafe), else `--otherwise` (default benign);
- the id: `--id-column` (default `id`), else `<file stem>-<line>`; the language: Chinese when the text has CJK.
Strict by default (the first bad record stops the import, nothing written); `--skip-bad` writes the good records
and `<output>.report.json` counts them and names every skipped one (file:line and reason), as import-preferences does.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from alignflow.core.io import InputError, atomic_path, dump_json, dump_jsonl, parse_each, read_tolerant
from alignflow.core.pairs import report_path, skip_report
from alignflow.core.rouge import has_cjk

log = logging.getLogger(__name__)

CATEGORIES = ("benign", "benign_alarming", "harmful")
TEXT_COLUMNS = ("prompt", "instruction", "question", "text")
HARMFUL_VALUES = ("true", "1", "yes", "harmful", "unsafe")


def prompt_record(record: dict[str, Any], where: str, *, text_column: str | None, id_column: str, category: str | None,
                  category_column: str | None, harmful_values: tuple[str, ...], otherwise: str, stem: str) -> dict[str, Any]:
    """One prompt in the pipeline's schema from a public record (a JSON object or a CSV row as a dict)."""
    column = text_column or next((c for c in TEXT_COLUMNS if c in record), None)
    if column is None or column not in record:
        raise InputError(f"{where}: field '{text_column or '|'.join(TEXT_COLUMNS)}': missing")
    text = record[column]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: field '{column}': expected a non-empty string, got {text!r}"[:200])
    instances = record.get("instances")
    if isinstance(instances, list) and instances and isinstance(instances[0], dict) and str(instances[0].get("input") or "").strip():
        text = f"{text.strip()}\n\n{str(instances[0]['input']).strip()}"  # a Self-Instruct task with its input
    if category is None:
        if category_column not in record:
            raise InputError(f"{where}: field '{category_column}': missing")
        value = str(record[category_column]).strip()
        category = value if value in CATEGORIES else "harmful" if value.lower() in harmful_values else otherwise
    raw_id = record.get(id_column)
    pid = str(raw_id).strip() if raw_id not in (None, "") else f"{stem}-{where.rsplit(':', 1)[1]}"
    return {"id": pid, "prompt": text.strip(), "category": category, "harmful": category == "harmful",
            "lang": "zh" if has_cjk(text) else "en"}


def csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, row) for each CSV row (line = the row's first line in the file, the header being line 1)."""
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        rows.append((f"{path}:{reader.line_num}", row))  # line_num: the last line read (a row can span lines)
    return rows


def import_prompts(source: str, output: str, *, text_column: str | None = None, id_column: str = "id",
                   category: str | None = None, category_column: str | None = None,
                   harmful_values: tuple[str, ...] = HARMFUL_VALUES, otherwise: str = "benign",
                   skip_bad: bool = False) -> dict[str, Any]:
    """Read a JSONL or CSV prompt set, write it in the prompt schema (atomically); return the report."""
    if (category is None) == (category_column is None):
        raise InputError("import-prompts: give either --category (one for the whole set) or --category-column")
    for value in (category, otherwise):
        if value is not None and value not in CATEGORIES:
            raise InputError(f"import-prompts: category {value!r}: expected one of {', '.join(CATEGORIES)}")
    path = Path(source)
    options = dict(text_column=text_column, id_column=id_column, category=category, category_column=category_column,
                   harmful_values=tuple(v.lower() for v in harmful_values), otherwise=otherwise, stem=path.stem)

    def parse(record: dict[str, Any], where: str) -> dict[str, Any]:
        return prompt_record(record, where, **options)

    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        records, skipped = parse_each(path, ((where, lambda row=row: row) for where, row in csv_rows(path)), parse, skip_bad)
    else:
        records, skipped = read_tolerant(path, parse, skip_bad)
    kept, where_of = [], {}
    for record in records:  # a repeated id is a bad record too
        if record["id"] in where_of:
            message = f"field 'id': {record['id']!r} repeats"
            if not skip_bad:
                raise InputError(f"{path}: {message}")
            skipped.append({"where": str(path), "reason": message})
            continue
        where_of[record["id"]] = True
        kept.append(record)
    report = skip_report(source, len(records) + len(skipped), len(kept), skipped)
    report["categories"] = {c: sum(r["category"] == c for r in kept) for c in CATEGORIES}
    with atomic_path(output) as tmp, atomic_path(report_path(output)) as tmp_report:
        dump_jsonl(kept, tmp)
        dump_json(report, tmp_report)
    log.info("imported %d prompts (%s) from %s into %s; %d records skipped", len(kept),
             ", ".join(f"{k} {v}" for k, v in report["categories"].items()), source, output, len(skipped))
    return report
