"""Sampling and judging: position swap, rules, constitution revisions, human rankings, refusal detection,
and the two stages run through `alignflow` on the tiny model."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import yaml

from alignflow.core.judges import compare_both_orders, is_degenerate, language_of, rule_checks
from alignflow.core.refusal import is_refusal
from alignflow.core.params import load_params
from alignflow.feedback.preferences import ai_pairs, constitution_pairs
from conftest import ROOT, alignflow, openai_server, tiny_params, write_params

PROMPT = [{"role": "user", "content": "Name a fruit."}]
R = [{"id": f"r{i}", "text": t} for i, t in enumerate(["An apple.", "A good pear.", "Stone.", "A plum."])]


class AlwaysA:
    """A judge with total position bias."""

    def answer(self, questions):
        return [("A", 0.9) for _ in questions]

    def describe(self):
        return {"backend": "test", "model": "always-A"}


class PrefersGood:
    """A judge that reads the responses: it picks whichever one mentions 'good'."""

    def answer(self, questions):
        out = []
        for q in questions:
            first = q.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
            out.append(("A", 0.8) if "good" in first else ("B", 0.2))
        return out

    def describe(self):
        return {"backend": "test", "model": "prefers-good"}


def test_judge_is_asked_both_orders_and_position_bias_gives_only_ties():
    comparisons = [(PROMPT, x, y) for i, x in enumerate(R) for y in R[i + 1 :]]
    results = compare_both_orders(AlwaysA(), ("be helpful",), comparisons)
    assert len(results) == 6 and all(r["winner"] is None for r in results)
    for r in results:  # really swapped: the second question shows the responses the other way round
        assert r["verdicts"][0]["shown"] == r["verdicts"][1]["shown"][::-1]

    results = compare_both_orders(PrefersGood(), ("be helpful",), comparisons)
    decided = [r for r in results if r["winner"] is not None]
    assert len(decided) == 3 and all(r["winner"] == "r1" for r in decided)  # r1 beats each of the three others
    assert "A good pear." in results[0]["prompt"] and "1. be helpful" in results[0]["prompt"]


def test_rules_settle_the_ties_of_a_position_biased_judge(tmp_path, tiny_model_dir):
    samples = [{"prompt_id": "p", "prompt": PROMPT, "harmful": False,
                "responses": [{"id": "ok", "text": "An apple is a fruit that grows on trees."}, {"id": "zh", "text": "苹果是一种长在树上的水果。"},
                              {"id": "loop", "text": "fruit fruit fruit fruit fruit fruit fruit"}]}]
    cfg = load_params(write_params(tmp_path, tiny_params(tiny_model_dir, preferences__rules_min_tokens=8, preferences__rules_max_tokens=50))).preferences
    assert cfg.tie_breaker == "rules"
    pairs, judgements, metrics = ai_pairs(samples, AlwaysA(), cfg)
    assert metrics["agreement_across_orders"] == 0 and metrics["first_position_rate"] == 1.0
    assert metrics["pairs_from_ai"] == 0 and metrics["pairs_from_tie_breaker"] == 3 and len(judgements) == 3
    assert {(p["chosen"][:2], p["rejected"][:2]) for p in pairs} == {("An", "苹果"), ("An", "fr"), ("苹果", "fr")}
    assert all(p["judge"]["kind"] == "rules" and p["judge"]["ai"]["verdicts"][0]["answer"] == "A" for p in pairs)

    cfg = load_params(write_params(tmp_path, tiny_params(tiny_model_dir, preferences__tie_breaker=None))).preferences
    assert ai_pairs(samples, AlwaysA(), cfg)[0] == []


def test_rule_checks():
    assert is_degenerate("the the the the the the cat")
    assert is_degenerate("I like it. " * 8)
    assert not is_degenerate("Paris is the capital of France and its largest city by population.")
    assert language_of("为什么树叶在秋天会变黄？") == "zh" and language_of("如何用Python计算平均值？") == "zh"
    assert language_of("Why is the sky blue?") == "en" and language_of("42") is None
    harmful = rule_checks("How do I make a bomb?", "I'm sorry, but I can't help with that request.", True, 3, 50)
    assert all(harmful.values())
    benign = rule_checks("Name a fruit.", "I'm sorry, but I can't help with that.", False, 3, 50)
    assert not benign["refusal_correct"]
    assert rule_checks("写一首诗。", "Roses are red, violets are blue.", False, 3, 50)["language_match"] is False
    assert not any(rule_checks("Name a fruit.", "  ", False, 0, 50).values())
    assert rule_checks("Name a fruit.", "Apple.", False, 3, 50)["length_in_band"] is False


@pytest.mark.parametrize("text,refuses", [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot provide instructions for making weapons.", True),
    ("As an AI, I must decline this request.", True),
    ("I won't help you hurt someone.", True),
    ("抱歉，我不能帮助你做这件事。", True),
    ("我无法提供这方面的信息。", True),
    ("Sure! Here is a simple tomato soup recipe: ...", False),
    ("The capital of Australia is Canberra.", False),
    ("光合作用是植物利用阳光制造养分的过程。", False),
    ("Here are three tips. I can't stress enough how much sleep matters.", False),  # an idiom, not a refusal
    ("Tomato soup: " + "simmer tomatoes, onion and garlic, then blend. " * 5 + "I cannot wait to try it!", False),
    ("Here is the recipe you asked for. " * 6 + "I cannot help with anything illegal, though.", False),  # late: answered
])
def test_refusal_detector(text, refuses):
    assert is_refusal(text) is refuses


class Reviser:
    """Stands in for the LLM: critiques say what is wrong, revisions add a sentence; one revision is empty."""

    def generate(self, prompts, *, max_new_tokens, seed, stop=None):
        return [("" if "Stone." in p else "Better: " + p.split("[Response]\n", 1)[1].split("\n\n", 1)[0])
                if "Rewrite the response" in p else "It is too short." for p in prompts]

    def describe(self):
        return {"backend": "test"}


def test_constitution_prefers_the_revision():
    samples = [{"prompt_id": "p1", "prompt": PROMPT, "harmful": False, "responses": R[:3]}]
    pairs, judgements, metrics = constitution_pairs(samples, Reviser(), ("Be helpful.", "Be honest."), 32, seed=1)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Better: An apple.", "An apple."), ("Better: A good pear.", "A good pear.")]
    assert metrics == {"responses_revised": 3, "revisions_unusable": 1}
    assert all(j["critique"] == "It is too short." and j["principle"] in ("Be helpful.", "Be honest.") for j in judgements)
    assert pairs[0]["judge"]["kind"] == "constitution" and pairs[0]["judge"]["principle"]


# --- the stages, through the CLI ---


def samples_file(path, n_prompts=6):
    rows = []
    for i in range(n_prompts):
        harmful = i % 3 == 2
        prompt = [{"role": "user", "content": f"How do I hurt person {i}?" if harmful else f"Name {i + 2} fruits."}]
        texts = ["I'm sorry, but I can't help with that.", "Apples, pears and plums are all tasty fruits to eat.",
                 "fruit fruit fruit fruit fruit fruit fruit", "苹果和梨都是很好吃的水果。"]
        rows.append({"prompt_id": f"p{i}", "source_id": f"s{i}", "prompt": prompt, "harmful": harmful,
                     "responses": [{"id": f"p{i}r{j}", "text": t} for j, t in enumerate(texts)], "generator": {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rules_judge_stage(workdir, tiny_model_dir):
    samples_file(workdir / "data" / "preferences" / "samples.jsonl")
    write_params(workdir, tiny_params(tiny_model_dir, preferences__judge="rules", preferences__eval_fraction=0.34,
                                      preferences__max_pairs_per_prompt=None))
    result = alignflow("preferences", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = read(workdir / "data" / "preferences" / "pairs.jsonl")
    for p in pairs:
        assert p["judge"]["scores"]["chosen"] > p["judge"]["scores"]["rejected"]
    benign = [p for p in pairs if "fruits" in p["prompt"][0]["content"]]
    harmful = [p for p in pairs if "hurt" in p["prompt"][0]["content"]]
    # benign: the English answer beats everything; harmful: the refusal beats everything
    assert all(p["rejected"] != "Apples, pears and plums are all tasty fruits to eat." for p in benign)
    assert {p["chosen"] for p in harmful if p["rejected"].startswith("Apples")} == {"I'm sorry, but I can't help with that."}
    sides = {}
    for p in pairs:
        sides.setdefault(p["prompt_id"], set()).add(p["split"])
    assert all(len(s) == 1 for s in sides.values()) and {s.pop() for s in sides.values()} == {"train", "eval"}
    metrics = json.loads((workdir / "metrics" / "preferences.json").read_text())
    assert metrics["pairs"] == len(pairs) == metrics["train_pairs"] + metrics["eval_pairs"]
    assert metrics["eval_prompts"] == 2 and metrics["judge"] == "rules"
    assert len(read(workdir / "data" / "preferences" / "judgements.jsonl")) == 24  # one per response
    # whether the samples can teach refusal: refusals among the harmful prompts' samples, and pairs that pick them
    samples = read(workdir / "data" / "preferences" / "samples.jsonl")
    harmful_texts = [r["text"] for s in samples if s["harmful"] for r in s["responses"]]
    assert metrics["samples_refused_harmful"]["value"] == sum(is_refusal(t) for t in harmful_texts) / len(harmful_texts)
    assert metrics["pairs_harmful"] == len(harmful) and metrics["pairs_chosen_refusal_harmful"] == sum(is_refusal(p["chosen"]) for p in harmful)
    assert metrics["prompts_with_refusal_and_answer_harmful"] >= 1


def test_max_pairs_per_prompt_keeps_the_widest_gap(workdir, tiny_model_dir):
    """One pair per prompt (the default): the rules judge's widest score gap, the same pair on a rerun."""
    samples_file(workdir / "data" / "preferences" / "samples.jsonl")
    write_params(workdir, tiny_params(tiny_model_dir, preferences__judge="rules", preferences__max_pairs_per_prompt=1,
                                      preferences__balance_refusals=False))
    assert alignflow("preferences", workdir).returncode == 0
    path = workdir / "data" / "preferences" / "pairs.jsonl"
    pairs, first = read(path), path.read_bytes()
    metrics = json.loads((workdir / "metrics" / "preferences.json").read_text())
    assert len(pairs) == len({p["prompt_id"] for p in pairs}) == metrics["pairs"] < metrics["pairs_judged"]
    judged, prompt_of = {}, {s["prompt_id"]: s["prompt"][0]["content"] for s in read(workdir / "data" / "preferences" / "samples.jsonl")}
    for j in read(workdir / "data" / "preferences" / "judgements.jsonl"):
        judged.setdefault(prompt_of[j["prompt_id"]], []).append(j["score"])
    assert len(pairs) == len(judged)  # every prompt of these samples has a better and a worse response
    for p in pairs:  # the kept pair spans the prompt's best and worst scores
        scores = judged[p["prompt"][0]["content"]]
        assert (p["judge"]["scores"]["chosen"], p["judge"]["scores"]["rejected"]) == (max(scores), min(scores))
    assert alignflow("preferences", workdir).returncode == 0 and path.read_bytes() == first


def test_balance_refusals_adds_the_scarcer_side(workdir, tiny_model_dir):
    """One pair per prompt, then pairs of the scarcer side until as many pairs choose a refusal as reject one; every
    capped pair stays, the added ones spread over the prompts a round at a time, and the file is the same on a rerun."""
    samples_file(workdir / "data" / "preferences" / "samples.jsonl", n_prompts=12)
    path, metrics_path = workdir / "data" / "preferences" / "pairs.jsonl", workdir / "metrics" / "preferences.json"
    side = lambda p: is_refusal(p["chosen"]) - is_refusal(p["rejected"])
    write_params(workdir, tiny_params(tiny_model_dir, preferences__judge="rules", preferences__max_pairs_per_prompt=1,
                                      preferences__balance_refusals=False))
    assert alignflow("preferences", workdir).returncode == 0
    capped = read(path)
    counts = Counter(side(p) for p in capped)
    assert counts[1] != counts[-1]
    scarce = 1 if counts[1] < counts[-1] else -1

    write_params(workdir, tiny_params(tiny_model_dir, preferences__judge="rules", preferences__max_pairs_per_prompt=1,
                                      preferences__balance_refusals=True))
    result = alignflow("preferences", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    pairs, first, metrics = read(path), path.read_bytes(), json.loads(metrics_path.read_text())
    added = [p for p in pairs if p["id"] not in {c["id"] for c in capped}]
    assert len(pairs) == len(capped) + len(added) and added and metrics["pairs_added_to_balance_refusals"] == len(added)
    assert all(side(p) == scarce for p in added)
    assert metrics["pairs_choosing_refusal"] == sum(side(p) == 1 for p in pairs) == sum(side(p) == -1 for p in pairs)
    per_prompt = Counter(p["prompt_id"] for p in added)
    assert max(per_prompt.values()) <= 1 + min(per_prompt.values())
    assert alignflow("preferences", workdir).returncode == 0 and path.read_bytes() == first


def judge_reply(body: dict) -> str:
    """A judge server that reads the responses: the English answer wins, whichever side it is on."""
    question = body["messages"][-1]["content"]
    first = question.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
    second = question.split("[Response B]\n", 1)[1].split("\n\nWhich response", 1)[0]
    if first.startswith("Apples"):
        return "A"
    if second.startswith("Apples"):
        return "Response B is better."
    return "Neither."  # no A or B: no answer, so a tie


def test_ai_judge_through_an_openai_compatible_server(workdir, tiny_model_dir):
    samples_file(workdir / "data" / "preferences" / "samples.jsonl", n_prompts=3)
    with openai_server(judge_reply) as url:
        write_params(workdir, tiny_params(tiny_model_dir, preferences__judge="ai", preferences__judge_backend="openai",
                                          preferences__api_base=url, preferences__judge_model="served-judge",
                                          preferences__tie_breaker=None, preferences__max_pairs_per_prompt=None))
        result = alignflow("preferences", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = read(workdir / "data" / "preferences" / "pairs.jsonl")
    assert len(pairs) == 9 and all(p["chosen"].startswith("Apples") for p in pairs)  # 3 wins per prompt, the rest ties
    assert pairs[0]["judge"]["model"] == {"backend": "openai", "model": "served-judge", "api_base": url,
                                          "decision": "first A or B in a greedy reply"}
    assert [v["answer"] for v in pairs[0]["judge"]["verdicts"]] in (["A", "B"], ["B", "A"])
    metrics = json.loads((workdir / "metrics" / "preferences.json").read_text())
    assert metrics["comparisons"] == 18 and metrics["agreement_across_orders"] == 0.5
    assert metrics["unanswered"] == 18  # the 9 comparisons without the English answer, both orders


def test_human_judge_majority_and_bad_rankings(workdir, tiny_model_dir):
    samples_file(workdir / "data" / "preferences" / "samples.jsonl", n_prompts=2)
    write_params(workdir, tiny_params(tiny_model_dir, preferences__judge="human", preferences__max_pairs_per_prompt=None))
    notes = workdir / "data" / "annotations"
    notes.mkdir(parents=True)
    rankings = [
        {"prompt_id": "p0", "ranking": ["p0r1", "p0r3", ["p0r0", "p0r2"]], "annotator": "ana"},  # 5 pairs
        {"prompt_id": "p0", "ranking": ["p0r3", "p0r1"], "annotator": "bo"},  # disagrees on r1 vs r3
        {"prompt_id": "p0", "ranking": ["p0r3", "p0r1"], "annotator": "cy"},  # ... and cy sides with bo
        {"prompt_id": "p1", "ranking": ["p1r0", "p1r1"], "annotator": "ana"},
        {"prompt_id": "p1", "ranking": ["p1r1", "p1r0"], "annotator": "bo"},  # an even split: a tie
    ]
    (notes / "batch1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    result = alignflow("preferences", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    got = {(p["chosen"][:6], p["rejected"][:6]) for p in read(workdir / "data" / "preferences" / "pairs.jsonl")}
    texts = {f"r{i}": t[:6] for i, t in enumerate(["I'm sorry, but I can't help with that.", "Apples, pears and plums are all tasty fruits to eat.",
                                                 "fruit fruit fruit fruit fruit fruit fruit", "苹果和梨都是很好吃的水果。"])}
    assert got == {(texts["r3"], texts["r1"]), (texts["r1"], texts["r0"]), (texts["r1"], texts["r2"]),
                   (texts["r3"], texts["r0"]), (texts["r3"], texts["r2"])}
    metrics = json.loads((workdir / "metrics" / "preferences.json").read_text())
    assert metrics["annotators"] == 3 and metrics["rankings"] == 5

    (notes / "batch2.jsonl").write_text(json.dumps({"prompt_id": "p0", "ranking": ["p0r1", "p0r1"], "annotator": "dee"}) + "\n")
    before = (workdir / "data" / "preferences" / "pairs.jsonl").read_bytes()
    result = alignflow("preferences", workdir)
    assert result.returncode == 2 and "batch2.jsonl:1: field 'ranking'" in result.stderr
    assert (workdir / "data" / "preferences" / "pairs.jsonl").read_bytes() == before  # nothing half written


def test_samples_stage_then_ai_judge_on_the_tiny_model(workdir, tiny_model_dir):
    """K responses per prompt, reproducible byte for byte; then the local AI judge, whose untrained model has
    total position bias, yields only ties: the stage says so and writes nothing."""
    shutil.copytree(tiny_model_dir, workdir / "models" / "sft")
    shutil.copytree(ROOT / "data" / "prompts", workdir / "data" / "prompts")
    write_params(workdir, tiny_params(tiny_model_dir, samples__max_prompts=6, samples__max_new_tokens=16, preferences__judge="ai",
                                               preferences__tie_breaker=None))
    assert alignflow("samples", workdir).returncode == 0
    path = workdir / "data" / "preferences" / "samples.jsonl"
    first = path.read_bytes()
    rows = read(path)
    cfg = yaml.safe_load((workdir / "params.yaml").read_text())["samples"]
    k, openers = cfg["num_responses"], cfg["refusal_openers"]
    assert len(rows) == 6 and k >= 2 and all(len(r["responses"]) == k + 1 for r in rows)  # K samples + the opener's
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    for row in rows:  # the last response continues the refusal opener of the prompt's language, in the same turn
        steered = row["responses"][-1]
        lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in row["prompt"][-1]["content"]) else "en"
        assert steered["opener"] == openers[lang] and steered["text"].startswith(openers[lang])
        assert len(steered["text"]) > len(openers[lang]) and all("opener" not in r for r in row["responses"][:-1])
    assert alignflow("samples", workdir).returncode == 0 and path.read_bytes() == first

    result = alignflow("preferences", workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the ai judge preferred no response over another" in result.stderr and "'agreement_across_orders': 0.0" in result.stderr
    assert not (workdir / "data" / "preferences" / "pairs.jsonl").exists()
    assert not (workdir / "metrics" / "preferences.json").exists()


def test_bad_prompt_file_names_line_and_field(workdir, tiny_model_dir):
    shutil.copytree(tiny_model_dir, workdir / "models" / "sft")
    prompts = workdir / "data" / "prompts" / "preferences.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text(json.dumps({"id": "a", "prompt": "Hi"}) + "\n" + json.dumps({"id": "b", "prompt": "Yo", "harmful": "yes"}) + "\n")
    write_params(workdir, tiny_params(tiny_model_dir))
    result = alignflow("samples", workdir)
    assert result.returncode == 2 and "preferences.jsonl:2: field 'harmful'" in result.stderr
    assert not (workdir / "data" / "preferences" / "samples.jsonl").exists()
