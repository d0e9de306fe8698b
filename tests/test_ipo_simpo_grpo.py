"""The methods added through the table (align/methods.py): IPO and SimPO (TRL preference trainers) and GRPO (TRL's
online trainer): their held-out formulas on hand-worked numbers, then real training runs on the tiny model through
`alignflow align <method>`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignflow.align.methods import ipo_metrics, simpo_metrics
from conftest import alignflow, tiny_params, write_params


def test_ipo_metrics_follow_the_paper():
    # per-token log-ratio margins h: pair 1 (-1.0 + 1.5) - (-2.0 + 1.5) = 1.0; pair 2 (-1.0 + 1.0) - (-1.0 + 1.0) = 0.0
    m = ipo_metrics(torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -1.0]),
                    torch.tensor([-1.5, -1.0]), tau=0.25)
    assert m["target_margin"] == 2.0  # 1 / (2 tau)
    assert m["loss"] == pytest.approx(((1.0 - 2.0) ** 2 + (0.0 - 2.0) ** 2) / 2)
    assert m["logratio_margin"] == pytest.approx(0.5) and m["preference_accuracy"] == 0.5


def test_simpo_metrics_follow_the_paper():
    # rewards beta * mean log-prob: chosen 2 * -0.5 = -1, rejected 2 * -1.5 = -3; margin 2, gamma 0.5
    m = simpo_metrics(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert m["reward_margin"] == pytest.approx(2.0) and m["reward_accuracy"] == 1.0
    assert m["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-(2.0 - 0.5)))))


@pytest.mark.slow(seconds=120)
@pytest.mark.parametrize("method,margin_key,rise,change", [
    ("ipo", "eval_logratio_margin", 0.01, {"tau": 0.5}),
    ("simpo", "eval_reward_margin", 0.02, {"beta": 2.0, "gamma": 0.5}),
])
def test_ipo_and_simpo_raise_the_held_out_margin(method, margin_key, rise, change, pairs_workdir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params[method].update(method="full", epochs=4, learning_rate=3e-3, batch_size=8, warmup_ratio=0.0, **change)
    write_params(pairs_workdir, params)
    result = alignflow(method, pairs_workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((pairs_workdir / "metrics" / f"{method}.json").read_text())
    assert metrics[margin_key] > metrics[margin_key + "_before"] + rise, {k: v for k, v in metrics.items() if "eval" in k}
    head = metrics["headline"]  # pair by pair: means equal to the batch's, with intervals and the paired change
    assert head["after"]["value"] == pytest.approx(metrics[margin_key], abs=1e-6) and head["after"]["n"] == metrics["eval_pairs"]
    assert head["change"]["value"] == pytest.approx(metrics[margin_key] - metrics[margin_key + "_before"], abs=1e-6)
    assert head["change"]["low"] > 0 and head["change"]["holds"]
    accuracy = "eval_preference_accuracy" if method == "ipo" else "eval_reward_accuracy"
    assert metrics[accuracy] >= 0.6, metrics[accuracy]
    assert metrics["model_copies"] == (2 if method == "ipo" else 1)  # full IPO holds a frozen reference; SimPO has none
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pairs_workdir / "models" / "aligned" / method)
    assert (pairs_workdir / "dvclive" / method / "plots" / "metrics").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["reward_model", "rules"])
def test_grpo_trains_from_the_sft_model_on_the_prompts(reward, aligned_workdir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["grpo"]["reward"] = reward
    write_params(aligned_workdir, params)
    result = alignflow("grpo", aligned_workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((aligned_workdir / "metrics" / "grpo.json").read_text())
    assert metrics["reward"] == reward and metrics["steps"] >= 1 and metrics["train_reward_first"] is not None
    assert {"eval_reward_before", "eval_reward", "headline", "wall_seconds", "peak_memory_mb"} <= metrics.keys()
    assert metrics["model_copies"] == (2 if reward == "reward_model" else 1)
    if reward == "rules":  # scores are sums of five checks
        assert 0 <= metrics["eval_reward_before"] <= 5 and 0 <= metrics["eval_reward"] <= 5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(aligned_workdir / "models" / "aligned" / "grpo")
    assert (aligned_workdir / "dvclive" / "grpo" / "plots" / "metrics").is_dir()


def test_grpo_batch_must_hold_whole_groups(aligned_workdir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["grpo"].update(batch_size=6, num_generations=4)
    write_params(aligned_workdir, params)
    result = alignflow("grpo", aligned_workdir)
    assert result.returncode == 2 and "grpo.batch_size=6 is not a multiple of grpo.num_generations=4" in result.stderr
    assert not (aligned_workdir / "models" / "aligned" / "grpo").exists()
