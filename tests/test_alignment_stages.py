"""The ppo / dpo / orpo stages through `alignflow`: the PPO stage end to end on the tiny model, and bad input
stopped with a clear message before any training."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import alignflow, tiny_params, write_params


def test_ppo_stage_writes_a_loadable_policy_metrics_and_curves(aligned_workdir, tiny_model_dir):
    write_params(aligned_workdir, tiny_params(tiny_model_dir))
    result = alignflow("ppo", aligned_workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((aligned_workdir / "metrics" / "ppo.json").read_text())
    assert metrics["iterations"] == 2 and metrics["model_copies"] == 3 and metrics["wall_seconds"] > 0
    assert {"eval_reward_before", "eval_reward", "final_kl", "peak_memory_mb"} <= metrics.keys()
    curves = (aligned_workdir / "dvclive" / "ppo" / "plots" / "metrics")
    # fp32 even where the other stages take bf16 (this CPU): in bf16 the updates' log-prob changes round away and
    # the ratio stays exactly 1 (approximate KL 0.0, nothing clipped)
    assert metrics["precision"] == "float32"
    approx_kl = [float(line.split("\t")[1]) for line in (curves / "approx_kl.tsv").read_text().splitlines()[1:]]
    assert len(approx_kl) == 2 and all(kl > 0 for kl in approx_kl), approx_kl
    for name in ("reward", "kl", "entropy", "clip_fraction", "value_loss", "approx_kl", "response_length"):
        assert len((curves / f"{name}.tsv").read_text().splitlines()) == 3, name  # header + 2 iterations
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(aligned_workdir / "models" / "aligned" / "ppo")
    info = json.loads((aligned_workdir / "models" / "aligned" / "ppo" / "alignflow_model.json").read_text())
    assert info == {"kind": "full", "method": "ppo", "start": "models/sft"}  # the report's lineage reads it


@pytest.mark.slow
def test_ppo_rules_weight_adds_the_rules_judges_score_to_the_reward(aligned_workdir, tiny_model_dir):
    """reward = reward model + rules_weight * rules score. Before training both runs sample the same held-out responses
    (same seed, same SFT policy), so their mean rewards differ by exactly rules_weight times the mean rules score: a
    mean of integers from 0 to 5 over the eval prompts."""
    pairs = [json.loads(line) for line in (aligned_workdir / "data" / "preferences" / "pairs.jsonl").read_text().splitlines()]
    n_eval = len({json.dumps(p["prompt"]) for p in pairs if p["split"] == "eval"})  # harmful flags: the fixture's samples
    before = {}
    for weight in (0.0, 100.0):
        params = tiny_params(tiny_model_dir)
        params["ppo"].update(iterations=1, rules_weight=weight)
        write_params(aligned_workdir, params)
        result = alignflow("ppo", aligned_workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        before[weight] = json.loads((aligned_workdir / "metrics" / "ppo.json").read_text())["eval_reward_before"]
    rules_mean = (before[100.0] - before[0.0]) / 100.0
    assert 0 < rules_mean <= 5, before  # a non-empty response passes at least one check
    assert abs(rules_mean * n_eval - round(rules_mean * n_eval)) < 1e-2, (rules_mean, n_eval)


@pytest.mark.parametrize("method,change,expected", [
    ("ppo", {"ppo": {"batch_size": 6, "minibatch_size": 4}}, "ppo.batch_size=6 does not divide into minibatches"),
    ("ppo", {"remove": "models/reward"}, "no reward model; PPO needs one"),
    ("dpo", {"dpo": {"beta": 0.0}}, "dpo.beta: 0.0 is less than or equal to the minimum of 0"),
    ("dpo", {"no_eval": True}, "no eval pairs"),
    ("orpo", {"no_eval": True}, "no eval pairs"),
])
def test_bad_input_stops_before_training(method, change, expected, aligned_workdir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    for section, values in change.items():
        if section in params:
            params[section].update(values)
    if "remove" in change:
        shutil.rmtree(aligned_workdir / change["remove"])
    if change.get("no_eval"):
        pairs = aligned_workdir / "data" / "preferences" / "pairs.jsonl"
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        pairs.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    write_params(aligned_workdir, params)
    result = alignflow(method, aligned_workdir)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert not (aligned_workdir / "models" / "aligned" / method).exists()
    assert not (aligned_workdir / "dvclive" / method).exists()  # no trainer was even built
