"""JSONL in and out: errors that name file, line and field; outputs that appear whole or not at all.

Reading: `read_jsonl(path)` yields (line_number, record) and raises `InputError("seeds.jsonl:7: ...")`
on non-UTF-8 bytes, malformed JSON, a line that is not an object, or an empty file.
`check_fields(...)` checks required fields and their types against a small spec.

Writing: `atomic_path(final)` is a context manager that hands out a temporary sibling path and renames
it onto `final` only when the block finishes without an exception, so a crash or a failed contract
leaves no output behind (files and directories alike).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad input data: the message starts with `file:line:` and names the field."""


def read_jsonl(path: str | Path, fields: dict[str, type] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a UTF-8 JSONL file; with `fields`,
    each object must have those fields with those types (see `check_fields`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    seen = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            if fields:
                check_fields(f"{path}:{number}", record, fields)
            seen += 1
            yield number, record
    if seen == 0:
        raise InputError(f"{path}: empty file (no JSON lines)")


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "list", dict: "object"}


def check_fields(where: str, record: dict[str, Any], spec: dict[str, type]) -> None:
    """Raise InputError `where: field 'x': ...` for a missing field or a value of the wrong type."""
    for field, kind in spec.items():
        if field not in record:
            raise InputError(f"{where}: field '{field}': missing")
        value = record[field]
        # bool is a subclass of int: an integer field must not accept true/false
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(
                f"{where}: field '{field}': expected {_TYPE_NAMES.get(kind, kind.__name__)}, "
                f"got {type(value).__name__} {json.dumps(value, ensure_ascii=False)[:60]}"
            )


def dump_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write records as JSONL (UTF-8, keys in the given order, no ASCII escaping); return the count."""
    count = 0
    with Path(path).open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def dump_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it into place, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        # os.replace cannot replace a non-empty directory: move the old one aside first
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
