"""Stage filter: every rule drops what it should, counts are exact, bad records are named."""

from __future__ import annotations

import json

import pytest

from alignflow.core.io import InputError
from alignflow.core.params import load_params
from alignflow.data import filter as filter_stage
from alignflow.data.filter import blacklist_matcher, seeded_pool
from alignflow.data.records import read_seed_tasks
from conftest import SHARED_SEEDS, alignflow, tiny_params, write_params


def rec(i, instruction, output="an answer", **extra):
    return {"id": f"m{i}", "instruction": instruction, "input": "", "output": output, "is_classification": False, **extra}


RECORDS = [
    rec(0, "Write a short poem about the ocean at night."),                  # kept
    rec(1, "Explain why the sky looks blue during the day.", output="  "),   # empty_output
    rec(2, "Hi there"),                                                       # too_short (2 tokens)
    rec(3, " ".join(["word"] * 200)),                                         # too_long
    rec(4, "Describe the picture of a cat on the sofa."),                     # blacklist (picture)
    rec(5, "请根据下面的描述绘制一张流程图。"),                                   # blacklist (CJK substring)
    rec(6, "- list three fruits that are yellow and sweet"),                 # punctuation
    rec(7, "Write a short poem about the ocean at night time."),             # near_duplicate of m0
    rec(8, "Rewrite the following message so that it sounds polite and professional."),  # near_duplicate of a seed
    rec(9, "把下面这句话翻译成英文，注意语气要礼貌。"),                              # kept
    rec(10, "把下面这句话翻译成英文，注意语气要礼貌！"),                             # near_duplicate (Chinese)
    rec(11, "Summarise the profile of a good software engineer."),           # kept: 'file' only as a whole word
    rec(12, "因劳性的\ufffd 请解释这个词语"),                                       # invalid_text
]


def test_each_rule_and_counts(workdir, tiny_model_dir):
    params = load_params(write_params(workdir, tiny_params(tiny_model_dir)))
    generated = workdir / params.paths.generated
    generated.parent.mkdir(parents=True)
    generated.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS))
    filter_stage.run(params)
    kept = [json.loads(line)["id"] for line in (workdir / params.paths.filtered).read_text().splitlines()]
    metrics = json.loads((workdir / "metrics" / "filter.json").read_text())
    assert kept == ["m0", "m9", "m11"]
    assert metrics == {"in": 13, "kept": 3, "dropped": {"empty_output": 1, "invalid_text": 1, "too_short": 1, "too_long": 1,
                       "blacklist": 2, "punctuation": 1, "near_duplicate": 3}}


def seed(i, instruction):
    return {"id": f"s{i}", "name": f"seed_{i}", "instruction": instruction,
            "instances": [{"input": "", "output": "an answer"}], "is_classification": False}


def test_every_seed_is_in_the_pool_even_one_near_another(workdir, tiny_model_dir):
    """Seed s1 is a near-duplicate of seed s0 (F 0.82); it still counts, so a machine instruction near s1
    (F 0.82 against it, 0.63 against s0) is dropped."""
    params = load_params(write_params(workdir, tiny_params(tiny_model_dir)))
    seeds = workdir / "data" / "seeds"
    for old in seeds.glob("*.jsonl"):
        old.unlink()
    (seeds / "pair.jsonl").write_text("".join(json.dumps(s) + "\n" for s in [
        seed(0, "Write a conversation based on the given facts."), seed(1, "Write a cover letter based on the given facts.")]))
    generated = workdir / params.paths.generated
    generated.parent.mkdir(parents=True)
    generated.write_text("".join(json.dumps(r) + "\n" for r in [
        rec(0, "Write a cover letter for the given facts."), rec(1, "Plan a three-day trip to the mountains.")]))
    filter_stage.run(params)
    kept = [json.loads(line)["id"] for line in (workdir / params.paths.filtered).read_text().splitlines()]
    assert kept == ["m1"]
    assert json.loads((workdir / "metrics" / "filter.json").read_text())["dropped"]["near_duplicate"] == 1


def test_shared_seeds_all_in_the_pool():
    """Of the 175 Self-Instruct seeds, seed_task_74 and seed_task_113 are near-duplicates of earlier seeds;
    both are in the pool, so an instruction near seed 74 (F 0.82) is dropped, and matched to it."""
    seeds = read_seed_tasks(SHARED_SEEDS)
    assert len(seeds) == 175
    pool = seeded_pool([s["instruction"] for s in seeds], 0.7)
    kept, score, match = pool.add("Write a cover letter for the given facts.")
    assert (kept, seeds[match]["id"]) == (False, "seed_task_74") and score == pytest.approx(14 / 17)
    assert pool.add("Use a positive stereotype to complete this sentence.")[2] == 113  # F 0.88; 0.63 vs seed 77
    assert pool.add("Plan a three-day trip to the mountains.")[0]


def test_blacklist_matches_whole_latin_words_and_cjk_substrings():
    matches = blacklist_matcher(("file", "go to", "地图"))
    assert matches("Open the FILE and read it") and matches("please go to the shop") and matches("画一张地图")
    assert not matches("Update your profile") and not matches("good tomatoes") and not matches("画一张图")
    kana_hangul = blacklist_matcher(("ファイル", "지도"))  # CJK as the ROUGE tokenizer has it: substrings too
    assert kana_hangul("このファイルを開いて") and kana_hangul("지도를 그려") and not kana_hangul("file map")


def test_record_missing_a_field_is_named_and_nothing_written(workdir, tiny_model_dir):
    params = load_params(write_params(workdir, tiny_params(tiny_model_dir)))
    generated = workdir / params.paths.generated
    generated.parent.mkdir(parents=True)
    bad = {k: v for k, v in RECORDS[0].items() if k != "output"}
    generated.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(bad) + "\n")
    result = alignflow("filter", workdir)
    assert result.returncode == 2
    assert "machine_instructions.jsonl:2: field 'output': missing" in result.stderr
    assert not (workdir / params.paths.filtered).exists() and not (workdir / "metrics").exists()
    with pytest.raises(InputError):
        filter_stage.run(params)
