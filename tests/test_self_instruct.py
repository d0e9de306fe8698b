"""Stage self_instruct: seed reading (and its errors), prompt parsing, both generator backends."""

from __future__ import annotations

import json

import pytest
import yaml

from alignflow.core.io import InputError
from alignflow.core.params import load_params
from alignflow.data import self_instruct
from alignflow.data.records import read_seed_tasks
from alignflow.data.self_instruct import parse_instance, parse_instructions, parse_yes_no
from conftest import ROOT, SHARED_SEEDS, alignflow, openai_server, self_instruct_reply, tiny_params, write_params

GOOD = {"id": "t1", "name": "t", "instruction": "Say hi.", "instances": [{"input": "", "output": "Hi"}], "is_classification": False}


def test_reads_the_original_self_instruct_seeds_unchanged():
    tasks = read_seed_tasks(SHARED_SEEDS)
    assert len(tasks) == 175
    assert tasks[0]["id"] == "seed_task_0" and tasks[-1]["id"] == "seed_task_174"
    assert sum(t["is_classification"] for t in tasks) > 0


def test_project_seeds_are_bilingual_and_enough():
    tasks = read_seed_tasks(ROOT / "data" / "seeds")
    zh = [t for t in tasks if any("\u4e00" <= c <= "\u9fff" for c in t["instruction"])]
    assert len(tasks) >= 40 and len(zh) >= 20 and len(tasks) - len(zh) >= 20


BAD_SEEDS = {
    "malformed_json": (b'{"id": "a", "name": "n"\n', r"seeds\.jsonl:1: malformed JSON"),
    "missing_field": (json.dumps({k: v for k, v in GOOD.items() if k != "instances"}).encode() + b"\n",
                      r"seeds\.jsonl:2: field 'instances': missing"),
    "wrong_type": (json.dumps({**GOOD, "is_classification": "no"}).encode() + b"\n",
                   r"seeds\.jsonl:2: field 'is_classification': expected boolean, got str"),
    "wrong_instance_type": (json.dumps({**GOOD, "instances": [{"input": "", "output": 3}]}).encode() + b"\n",
                            r"seeds\.jsonl:2: field 'output': expected string, got int"),
    "empty_file": (b"", r"seeds\.jsonl: empty file"),
    "not_utf8": (b'{"id": "caf\xe9"}\n', r"seeds\.jsonl:2: not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEEDS))
def test_bad_seed_file_stops_with_file_line_field_and_writes_nothing(case, tmp_path, tiny_model_dir):
    content, expected = BAD_SEEDS[case]
    seeds = tmp_path / "seeds.jsonl"
    # a good first line, so line numbers are checked for real (except for the empty file and line-1 cases)
    first = b"" if case in ("empty_file", "malformed_json") else json.dumps(GOOD).encode() + b"\n"
    seeds.write_bytes(first + content)
    params = tiny_params(tiny_model_dir)
    params["paths"]["seeds"] = "seeds.jsonl"
    write_params(tmp_path, params)
    result = alignflow("self_instruct", tmp_path)
    assert result.returncode == 2, result.stderr
    import re

    assert re.search(expected, result.stderr), result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


def test_duplicate_seed_id_names_both_lines(tmp_path):
    seeds = tmp_path / "s.jsonl"
    seeds.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(InputError, match=r"s\.jsonl:2: field 'id': 't1' already used at .*s\.jsonl:1"):
        read_seed_tasks(seeds)


def test_parse_instructions():
    text = "9. Write a haiku about rain.\n10) 把这句话翻译成英文。\nSome chatter\n11. 1. Nested number here\n12. ok"
    assert parse_instructions(text) == ["Write a haiku about rain.", "把这句话翻译成英文。", "Nested number here"]
    assert parse_instructions("Tell me a joke about cats.\nmore") == ["Tell me a joke about cats."]
    assert parse_instructions("") == []
    assert parse_instructions("9. 想五个店名。 10. 写一首诗。 11. Name 3 cities.") == ["想五个店名。", "写一首诗。", "Name 3 cities."]


def test_parse_instance_and_yes_no():
    assert parse_instance(" <noinput>\nOutput: Paris.", classification=False) == ("", "Paris.")
    assert parse_instance(" 2 + 2\nOutput: 4", classification=False) == ("2 + 2", "4")
    assert parse_instance(" Positive\nInput: I loved it.", classification=True) == ("I loved it.", "Positive")
    assert parse_instance(" just an answer", classification=False) == ("", "just an answer")
    assert parse_instance(" x\nOutput: y\nOutput: y again\nTask: more", classification=False) == ("x", "y")
    assert parse_yes_no(" Yes, it is") and parse_yes_no("是的") and not parse_yes_no("No.")


def _run_stage(tmp_path, params_dict):
    params = load_params(write_params(tmp_path, params_dict))
    self_instruct.run(params)
    return [json.loads(line) for line in (tmp_path / params.paths.generated).read_text().splitlines()]


def test_default_backend_on_tiny_model_with_provenance(workdir, tiny_model_dir):
    """backend auto: ONNX Runtime GenAI at fp32 on this CPU, named with its version in every record's provenance."""
    params = tiny_params(tiny_model_dir, engine=None, self_instruct__num_instructions=20)
    params["paths"]["seeds"] = str(SHARED_SEEDS)
    records = _run_stage(workdir, params)
    assert len(records) == 20 and len({r["id"] for r in records}) == 20
    seed_ids = {t["id"] for t in read_seed_tasks(SHARED_SEEDS)}
    for r in records:
        prov = r["provenance"]
        assert len(prov["prompt_examples"]) == 8 and prov["generator"]["backend"] == "onnx-fp32"
        assert prov["generator"]["engine"].startswith("onnxruntime-genai ")
        # after the first round, 2 of the 8 examples come from the machine pool
        machine = [e for e in prov["prompt_examples"] if e not in seed_ids]
        assert len(machine) == (0 if prov["round"] == 0 else 2), prov
    assert max(r["provenance"]["round"] for r in records) >= 1


SEEN_KEYS: list[str] = []


@pytest.fixture
def fake_server():
    with openai_server(self_instruct_reply, SEEN_KEYS) as url:
        yield url


def test_openai_backend_reads_key_from_env_and_never_writes_it(workdir, tiny_model_dir, fake_server, monkeypatch):
    secret = "sk-test-do-not-leak-1234"
    monkeypatch.setenv("MY_LLM_KEY", secret)
    params = tiny_params(tiny_model_dir, self_instruct__num_instructions=6)
    params["self_instruct"].update(backend="openai", generator="served-model", api_base=fake_server, api_key_env="MY_LLM_KEY")
    records = _run_stage(workdir, params)
    assert len(records) == 6
    assert records[0]["output"].startswith("answer") and records[0]["input"] == ""
    assert records[0]["provenance"]["generator"]["backend"] == "openai"
    assert SEEN_KEYS and all(k == f"Bearer {secret}" for k in SEEN_KEYS)
    for path in workdir.rglob("*"):
        if path.is_file() and "models" not in path.parts:
            assert secret not in path.read_text(errors="ignore"), path
    assert secret not in yaml.safe_dump(params)


def test_self_instruct_user_tasks_read_as_seeds_and_every_missing_field_named_at_once(tmp_path):
    """The Self-Instruct repository's user-oriented tasks (id, motivation_app, instruction, instances) are seeds:
    name is read by nothing and is_classification defaults to false; a line missing several fields names them all."""
    user = {"id": "user_oriented_task_0", "motivation_app": "Grammarly", "instruction": "Fix the grammar.",
            "instances": [{"input": "i has a apple", "output": "I have an apple."}]}
    seeds = tmp_path / "user.jsonl"
    seeds.write_text(json.dumps(user) + "\n")
    [task] = read_seed_tasks(seeds)
    assert task["is_classification"] is False and task["instruction"] == "Fix the grammar."
    seeds.write_text(json.dumps(user) + "\n" + json.dumps({"id": "t2", "motivation_app": "x"}) + "\n")
    with pytest.raises(InputError, match=r"user\.jsonl:2: field 'instruction': missing; field 'instances': missing$"):
        read_seed_tasks(seeds)
