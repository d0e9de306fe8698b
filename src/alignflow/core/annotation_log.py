"""Human annotations: the append-only answer logs that `alignflow annotate` writes and the stages read.

Two modes, one log file per annotator and mode (`<paths.annotations>/<name>.jsonl` for rankings,
`<paths.ab_annotations>/<name>.jsonl` for A/B answers). Every line is an event, appended and fsynced
the moment it happens; nothing is ever rewritten:

    {"event": "answer", "mode": "rank", "id": "ana-3", "annotator": "ana", "time": "2026-11-30T07:12:03Z",
     "item": "<prompt_id>", "shown": ["<response id>", ...],            # the order the page showed
     "ranking": ["<best id>", ..., ["<unacceptable id>", ...]],         # best first; a list = tied at the bottom
     "unacceptable": ["<id>", ...], "seconds": 12.3}
    {"event": "answer", "mode": "ab", ..., "item": "<eval prompt id>", "shown": {"A": "dpo", "B": "sft"},
     "texts": {"dpo": "<sha256 of its response, 16 hex>", "sft": "..."}, "answer": "A" | "B" | "tie", "winner": "dpo" | null}
    {"event": "skip", "mode": ..., "id": ..., "annotator": ..., "time": ..., "item": ...(, "models": [...])}
    {"event": "undo", "mode": ..., "id": ..., "annotator": ..., "time": ..., "undoes": "ana-3"}

`replay` turns a log into what is in effect: the answers not undone (the latest per item), the items
skipped and not answered since, and what an undo would take back. The server resumes from it; the
`preferences` stage (judge `human`) and the `compare` stage read the answers through `rank_answers` /
`ab_answers`. Hand-written rankings in the older short form, {"prompt_id", "ranking", "annotator"}, are
still read as answers. Agreement between annotators, and between people and a judge, is computed here.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from alignflow.core.io import InputError, check_fields, read_jsonl
from alignflow.core.pairs import ranking_to_pairs

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")  # an annotator's name is also their file's name
ANSWERS = ("A", "B", "tie")


def text_hash(text: str) -> str:
    """Which text an A/B answer was about: a rerun of evaluate@<model> that changes it makes the answer stale."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InputError(f"{where}: field 'annotator': {name!r} is not a name of 1-40 letters, digits, '_', '.' or '-' "
                         "(starting with a letter or digit)")
    return name


def ranking_tiers(ranking: list) -> list[list[str]]:
    """A ranking as tiers, best first: an id alone is its own tier, a list of ids is one tier (tied)."""
    return [t if isinstance(t, list) else [t] for t in ranking]


@dataclass
class Replayed:
    """One annotator's log, replayed: what is in effect now."""

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # item -> its answer in effect
    skipped: list[str] = field(default_factory=list)                  # skipped, not answered since; oldest first
    undo_stack: list[str] = field(default_factory=list)               # answer ids in effect, newest last
    reopened: str | None = None                                       # the item an undo just took back


def replay(records: list[tuple[str, dict[str, Any]]], mode: str) -> dict[str, Replayed]:
    """Replay (where, record) events of one mode into each annotator's state (A/B: pass one model pair's events)."""
    states: dict[str, Replayed] = {}
    by_id: dict[str, tuple[str, dict[str, Any]]] = {}  # answer id -> (annotator, record)
    for where, record in records:
        if "event" not in record:  # the short hand-written form: an answer
            check_fields(where, record, {"prompt_id": str, "ranking": list, "annotator": str})
            record = {"event": "answer", "mode": "rank", "id": where, "annotator": record["annotator"],
                      "item": record["prompt_id"], "ranking": record["ranking"], "unacceptable": []}
        check_fields(where, record, {"event": str, "mode": str, "id": str, "annotator": str})
        if record["mode"] != mode:
            continue
        state = states.setdefault(record["annotator"], Replayed())
        event = record["event"]
        if event == "answer":
            check_fields(where, record, {"item": str})
            old = state.answers.get(record["item"])
            if old is not None:
                state.undo_stack.remove(old["id"])
            state.answers[record["item"]] = {**record, "where": where}
            state.undo_stack.append(record["id"])
            by_id[record["id"]] = (record["annotator"], record)
            state.skipped = [i for i in state.skipped if i != record["item"]]
            state.reopened = None
        elif event == "skip":
            check_fields(where, record, {"item": str})
            state.skipped = [i for i in state.skipped if i != record["item"]] + [record["item"]]
            state.reopened = None
        elif event == "undo":
            check_fields(where, record, {"undoes": str})
            target = by_id.get(record["undoes"])
            if target is None or target[0] != record["annotator"] or record["undoes"] not in state.undo_stack:
                raise InputError(f"{where}: field 'undoes': {record['undoes']!r} is not an answer of "
                                 f"{record['annotator']} in effect")
            item = target[1]["item"]
            state.undo_stack.remove(record["undoes"])
            del state.answers[item]
            state.reopened = item
        else:
            raise InputError(f"{where}: field 'event': {event!r} is not answer, skip or undo")
    return states


def read_logs(folder: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Every event of every *.jsonl file in `folder` (sorted by name), as (file:line, record)."""
    events = []
    for file in sorted(Path(folder).glob("*.jsonl")):
        if file.stat().st_size:
            events += [(f"{file}:{line}", record) for line, record in read_jsonl(file)]
    return events


# --- rankings (the preference stage's human judge) ---


def rank_answers(folder: str | Path, samples: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rankings in effect in `folder`, checked against the samples: ([{"annotator", "item", "tiers",
    "where"}], [where of each stale answer: its prompt or responses are no longer in the samples])."""
    answers, stale = [], []
    for annotator, state in sorted(replay(read_logs(folder), "rank").items()):
        for item, record in state.answers.items():
            where = record["where"]
            check_name(annotator, where)
            if not isinstance(record.get("ranking"), list) or not record["ranking"]:
                raise InputError(f"{where}: field 'ranking': expected a non-empty list of response ids")
            tiers = ranking_tiers(record["ranking"])
            ids = [i for t in tiers for i in t]
            if not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
                raise InputError(f"{where}: field 'ranking': response ids must be distinct strings")
            sample = samples.get(item)
            if sample is None or not set(ids) <= {r["id"] for r in sample["responses"]}:
                stale.append(where)
                continue
            answers.append({"annotator": annotator, "item": item, "tiers": tiers, "where": where})
    return answers, stale


def preference_sets(answers: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str, str], int]]:
    """Per annotator: (item, a, b) with a < b -> +1 if a was preferred, -1 if b; pairs in one tier are left out."""
    out: dict[str, dict[tuple[str, str, str], int]] = {}
    for answer in answers:
        prefs = out.setdefault(answer["annotator"], {})
        for better, worse in ranking_to_pairs(answer["tiers"]):
            a, b = sorted((better, worse))
            prefs[(answer["item"], a, b)] = 1 if better == a else -1
    return out


# --- A/B answers (the compare stage) ---


def ab_answers(folder: str | Path, model: str, reference: str, texts: dict[str, dict[str, str]]
               ) -> tuple[list[dict[str, Any]], list[str]]:
    """A/B answers in effect for `model` against `reference`: ([{"annotator", "item", "outcome": win | tie | loss
    from `model`'s side, "where"}], [stale: the item or either response text changed since]). `texts` is
    {item: {model: response, reference: response}}."""
    answers, stale = [], []
    if not Path(folder).is_dir():
        return answers, stale
    events = read_logs(folder)
    pair_events = [(w, r) for w, r in events if same_models(r, model, reference)]
    for annotator, state in sorted(replay(pair_events, "ab").items()):
        for item, record in state.answers.items():
            where = record["where"]
            check_fields(where, record, {"answer": str, "shown": dict, "texts": dict})
            if record["answer"] not in ANSWERS or set(record["shown"].values()) != {model, reference}:
                raise InputError(f"{where}: fields 'answer' / 'shown': expected A, B or tie over {model} and {reference}")
            now = texts.get(item)
            if now is None or any(record["texts"].get(m) != text_hash(now[m]) for m in (model, reference)):
                stale.append(where)
                continue
            winner = None if record["answer"] == "tie" else record["shown"][record["answer"]]
            outcome = "tie" if winner is None else "win" if winner == model else "loss"
            answers.append({"annotator": annotator, "item": item, "outcome": outcome, "where": where})
    return answers, stale


def same_models(record: dict[str, Any], model: str, reference: str) -> bool:
    """Whether an A/B event (every one carries "models": [model, reference]) is about these two models."""
    return sorted(record.get("models") or []) == sorted([model, reference])


def majority(outcomes: list[str]) -> str:
    """Several people's outcomes for one item: the most common; a tie between win and loss counts (is) a tie."""
    counts = Counter(outcomes)
    if counts["win"] == counts["loss"]:
        return "tie"
    return "win" if counts["win"] > counts["loss"] else "loss"


# --- agreement ---


def cohen_kappa(pairs: list[tuple[Any, Any]]) -> float | None:
    """Cohen's kappa over (label of one rater, label of the other) pairs, marginals pooled over both raters."""
    if not pairs:
        return None
    observed = sum(a == b for a, b in pairs) / len(pairs)
    pooled = Counter(x for pair in pairs for x in pair)
    expected = sum((n / (2 * len(pairs))) ** 2 for n in pooled.values())
    return None if expected == 1 else (observed - expected) / (1 - expected)


def between_annotators(labels: dict[str, dict[Any, Any]]) -> dict[str, Any]:
    """Agreement on shared units: `labels` is {annotator: {unit: label}}. For every two annotators and every
    unit both labelled: the share with the same label, overall and per pair of annotators, and Cohen's kappa."""
    shared: list[tuple[Any, Any]] = []
    per_pair = {}
    for x, y in combinations(sorted(labels), 2):
        common = sorted(set(labels[x]) & set(labels[y]), key=str)
        if common:
            pairs = [(labels[x][u], labels[y][u]) for u in common]
            shared += pairs
            per_pair[f"{x}|{y}"] = {"shared": len(pairs), "agreement": sum(a == b for a, b in pairs) / len(pairs)}
    return {"shared": len(shared), "agreement": sum(a == b for a, b in shared) / len(shared) if shared else None,
            "kappa": cohen_kappa(shared), "pairs_of_annotators": per_pair}


def with_judge(people: dict[Any, Any], judge: dict[Any, Any]) -> dict[str, Any]:
    """People's (majority) labels against a judge's on the units both labelled."""
    common = sorted(set(people) & set(judge), key=str)
    pairs = [(people[u], judge[u]) for u in common]
    return {"shared": len(pairs), "agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None,
            "kappa": cohen_kappa(pairs)}
