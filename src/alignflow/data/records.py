"""What the data phase's stages share: the seed tasks they read and the machine-instruction record they pass on.

Seed tasks (`paths.seeds`, read by self_instruct and filter): Self-Instruct's format, one JSON object a line,
`id`, `instruction`, `instances: [{input, output}]`, and optionally `name` (read by nothing) and
`is_classification` (false when absent), so the Self-Instruct repository's 252 user-oriented tasks (`id`,
`motivation_app`, `instruction`, `instances`) read as seeds too.
A machine-instruction record (written by self_instruct, filtered by filter, rendered by format):
`id`, `instruction`, `input`, `output`, `is_classification` (and the generator's `provenance`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignflow.core.io import InputError, check_fields, read_jsonl

RECORD_FIELDS = {"id": str, "instruction": str, "input": str, "output": str, "is_classification": bool}
SEED_FIELDS = {"id": str, "instruction": str, "instances": list}
OPTIONAL_SEED_FIELDS = {"name": str, "is_classification": bool}
INSTANCE_FIELDS = {"input": str, "output": str}


def read_seed_tasks(path: str | Path) -> list[dict[str, Any]]:
    """All seed tasks of a .jsonl file or of every *.jsonl in a directory (sorted by name)."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no *.jsonl seed files in this directory")
    tasks, where_of_id = [], {}
    for file in files:
        for line, record in read_jsonl(file, SEED_FIELDS):
            where = f"{file}:{line}"
            check_fields(where, record, {k: v for k, v in OPTIONAL_SEED_FIELDS.items() if k in record})
            record.setdefault("is_classification", False)
            if not record["instruction"].strip():
                raise InputError(f"{where}: field 'instruction': empty")
            if not record["instances"]:
                raise InputError(f"{where}: field 'instances': empty list")
            for i, instance in enumerate(record["instances"]):
                if not isinstance(instance, dict):
                    raise InputError(f"{where}: field 'instances[{i}]': expected object, got {type(instance).__name__}")
                check_fields(where, instance, INSTANCE_FIELDS)
            if record["id"] in where_of_id:
                raise InputError(f"{where}: field 'id': {record['id']!r} already used at {where_of_id[record['id']]}")
            where_of_id[record["id"]] = where
            tasks.append(record)
    return tasks
