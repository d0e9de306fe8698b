"""Preference pairs: rankings to pairs, the three public shapes, the pairs contract, the import command."""

from __future__ import annotations

import json

import pytest
import yaml

from alignflow.core import contracts
from alignflow.core.contracts import ContractError
from alignflow.core.io import InputError
from alignflow.core.pairs import assign_splits, make_pair, parse_pair, ranking_to_pairs
from conftest import ROOT, alignflow, write_params


def test_ranking_of_four_gives_six_pairs_in_order_and_ties_none():
    pairs = ranking_to_pairs([["D"], ["A"], ["B"], ["C"]])  # D > A > B > C
    assert pairs == [("D", "A"), ("D", "B"), ("D", "C"), ("A", "B"), ("A", "C"), ("B", "C")]
    assert ranking_to_pairs([["A", "B"], ["C"]]) == [("A", "C"), ("B", "C")]  # A and B tied: no A/B pair
    assert ranking_to_pairs([["A", "B"]]) == []


FLAT = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
MESSAGES = {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]}
ANSWER_LISTS = {"prompt": "Say hi", "chosen": [{"role": "assistant", "content": "Hi!"}],
                "rejected": [{"role": "assistant", "content": "No."}]}
HH = {"chosen": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.\n\nHuman: Another?\n\nAssistant: A pear.",
      "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.\n\nHuman: Another?\n\nAssistant: I won't."}


@pytest.mark.parametrize(
    "record,prompt,chosen,rejected",
    [
        (FLAT, [{"role": "user", "content": "What is 2+2?"}], "4", "5"),
        (MESSAGES, [{"role": "user", "content": "Say hi"}], "Hi!", "No."),
        (ANSWER_LISTS, [{"role": "user", "content": "Say hi"}], "Hi!", "No."),
        (HH, [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
              {"role": "user", "content": "Another?"}], "A pear.", "I won't."),
    ],
)
def test_public_shapes_round_trip(record, prompt, chosen, rejected):
    assert parse_pair(record, "x.jsonl:1") == (prompt, chosen, rejected)


@pytest.mark.parametrize(
    "record,expected",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"x\.jsonl:3: fields 'chosen' and 'rejected': the same answer"),
        ({"prompt": "q", "chosen": "a"}, r"x\.jsonl:3: field 'rejected': missing"),
        ({"chosen": MESSAGES["chosen"], "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "No."}]},
         r"x\.jsonl:3: .*the conversations differ"),
        ({"chosen": "plain text", "rejected": "other text"}, r"x\.jsonl:3: not a .*transcript"),
    ],
)
def test_bad_pairs_name_the_line_and_field(record, expected):
    with pytest.raises(InputError, match=expected):
        parse_pair(record, "x.jsonl:3")


def test_contract_refuses_a_prompt_on_both_sides(tmp_path):
    prompt = [{"role": "user", "content": "q"}]
    a = {**make_pair(prompt, "good", "bad", {"kind": "rules"}), "split": "train"}
    b = {**make_pair(prompt, "good", "worse", {"kind": "rules"}), "split": "eval"}
    with pytest.raises(ContractError, match="prompt_in_both_splits"):
        contracts.validate("pairs", [a, b], tmp_path / "pairs.jsonl")
    contracts.validate("pairs", [a, {**b, "split": a["split"]}], tmp_path / "pairs.jsonl")


def test_splits_are_by_prompt_with_both_sides_even_when_small():
    pairs = [make_pair([{"role": "user", "content": f"q{i % 3}"}], f"good {i}", f"bad {i}", {"kind": "rules"}) for i in range(9)]
    assign_splits(pairs, seed=7, eval_fraction=0.1)
    sides = {}
    for p in pairs:
        sides.setdefault(p["prompt_id"], set()).add(p["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert sorted(s.pop() for s in sides.values()) == ["eval", "train", "train"]  # 3 prompts: at least one held out
    again = assign_splits([dict(p) for p in pairs], seed=7, eval_fraction=0.1)
    assert [p["split"] for p in again] == [p["split"] for p in pairs]


def test_import_command(tmp_path):
    write_params(tmp_path, yaml.safe_load((ROOT / "params.yaml").read_text()))
    source = tmp_path / "public.jsonl"
    rows = [FLAT, MESSAGES, ANSWER_LISTS, HH] + [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "?"}
                                                  for i in range(40)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = alignflow("import-preferences", tmp_path, extra=["public.jsonl", "pairs/imported.jsonl", "--eval-fraction", "0.25"])
    assert result.returncode == 0, result.stderr[-2000:]
    pairs = [json.loads(line) for line in (tmp_path / "pairs" / "imported.jsonl").read_text().splitlines()]
    assert len(pairs) == 43  # MESSAGES and ANSWER_LISTS are the same pair
    assert {p["split"] for p in pairs} == {"train", "eval"}
    sides = {}
    for p in pairs:
        sides.setdefault(p["prompt_id"], set()).add(p["split"])
        assert p["judge"]["kind"] == "import"
    assert all(len(s) == 1 for s in sides.values())

    source.write_text(json.dumps(FLAT) + "\n" + json.dumps({"prompt": "q", "chosen": 3, "rejected": "x"}) + "\n")
    result = alignflow("import-preferences", tmp_path, extra=["public.jsonl", "pairs/bad.jsonl"])
    assert result.returncode == 2 and "public.jsonl:2" in result.stderr
    assert not (tmp_path / "pairs" / "bad.jsonl").exists()
