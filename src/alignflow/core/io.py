"""JSONL in and out: errors that name file, line and field; outputs that appear whole or not at all.

Reading: `read_jsonl(path)` yields (line_number, record) and raises `InputError("seeds.jsonl:7: ...")`
on non-UTF-8 bytes, malformed JSON, a line that is not an object, or an empty file.
`check_fields(...)` checks required fields and their types against a small spec, naming every problem of a line.
`read_tolerant(path, parse, skip_bad)` is the reader for public data: strict by default, and with `skip_bad` it
keeps the good lines and lists every bad one (file:line and reason) for the caller's report.

Writing: `atomic_path(final)` is a context manager that hands out a temporary sibling path and renames
it onto `final` only when the block finishes without an exception, so a crash or a failed contract
leaves no output behind (files and directories alike).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad input data: the message starts with `file:line:` and names the field."""


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("rb") as handle:
        yield from enumerate(handle, start=1)


def _record(raw: bytes, where: str) -> dict[str, Any] | None:
    """One JSONL line as an object (None for a blank line), or InputError `where: ...`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 ({err.reason} at byte {err.start} of the line)") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path: str | Path, fields: dict[str, type] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a UTF-8 JSONL file; with `fields`,
    each object must have those fields with those types (see `check_fields`)."""
    path = Path(path)
    seen = 0
    for number, raw in _lines(path):
        record = _record(raw, f"{path}:{number}")
        if record is None:
            continue
        if fields:
            check_fields(f"{path}:{number}", record, fields)
        seen += 1
        yield number, record
    if seen == 0:
        raise InputError(f"{path}: empty file (no JSON lines)")


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "list", dict: "object"}


def check_fields(where: str, record: dict[str, Any], spec: dict[str, type]) -> None:
    """Raise InputError `where: field 'x': ...; field 'y': ...` naming every missing field and every value of the
    wrong type of the record at once (so one fix-and-rerun round covers the whole line)."""
    problems = []
    for field, kind in spec.items():
        if field not in record:
            problems.append(f"field '{field}': missing")
            continue
        value = record[field]
        # bool is a subclass of int: an integer field must not accept true/false
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"field '{field}': expected {_TYPE_NAMES.get(kind, kind.__name__)}, "
                            f"got {type(value).__name__} {json.dumps(value, ensure_ascii=False)[:60]}")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems))


def read_tolerant(path: str | Path, parse: Callable[[dict[str, Any], str], Any], skip_bad: bool) -> tuple[list[Any], list[dict[str, str]]]:
    """`parse(record, "file:line")` for each line of a JSONL file: (the parsed values, the skipped lines). Strict
    (`skip_bad` false): the first bad line (not UTF-8, malformed JSON, or an InputError from `parse`) stops with its
    file:line message. With `skip_bad`: bad lines are left out and listed as {"where": "file:line", "reason"}."""
    path = Path(path)
    lines = ((f"{path}:{number}", functools.partial(_record, raw, f"{path}:{number}")) for number, raw in _lines(path))
    return parse_each(path, lines, parse, skip_bad)


def parse_each(path: Path, items: Iterable[tuple[str, Callable[[], dict[str, Any] | None]]],
               parse: Callable[[dict[str, Any], str], Any], skip_bad: bool) -> tuple[list[Any], list[dict[str, str]]]:
    """`parse(read(), where)` for each (where, read) of a file's records (read: None for a blank line), strict or
    skipping as `read_tolerant` says."""
    values, skipped = [], []
    for where, read in items:
        try:
            record = read()
            if record is not None:
                values.append(parse(record, where))
        except InputError as err:
            if not skip_bad:
                raise
            skipped.append({"where": where, "reason": str(err).removeprefix(f"{where}: ")})
    if not values:
        raise InputError(f"{path}: no usable records" + (f" ({len(skipped)} skipped, the first: {skipped[0]['where']}: "
                                                        f"{skipped[0]['reason']})" if skipped else " (empty file)"))
    return values, skipped


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
