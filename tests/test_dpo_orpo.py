"""DPO and ORPO: the formulas on given log-probabilities, then real TRL training runs on the tiny model over a
learnable preference (chosen answers carry a marker word) through `alignflow align dpo` / `alignflow align orpo`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignflow.align.logprobs import log_odds
from alignflow.align.methods import dpo_metrics, orpo_metrics
from conftest import alignflow, tiny_params, write_params


def test_dpo_metrics_follow_the_loss_formula():
    pi_w, pi_l = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0])
    ref_w, ref_l = torch.tensor([-11.0, -12.5]), torch.tensor([-13.0, -11.5])
    m = dpo_metrics(pi_w, pi_l, ref_w, ref_l, beta=0.5)
    # pair 1: 0.5 * ((-10 + 11) - (-14 + 13)) = 1.0; pair 2: 0.5 * ((-12 + 12.5) - (-11 + 11.5)) = 0.0
    expected = [-math.log(1 / (1 + math.exp(-1.0))), -math.log(0.5)]
    assert m["loss"] == pytest.approx(sum(expected) / 2)
    assert m["reward_margin"] == pytest.approx(0.5)
    assert m["reward_accuracy"] == 0.5  # the second pair is a tie, not a win
    assert m["chosen_reward"] == pytest.approx((0.5 + 0.25) / 2) and m["rejected_reward"] == pytest.approx((-0.5 + 0.25) / 2)


def test_orpo_metrics_follow_the_loss_formula():
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    assert log_odds(chosen).item() == pytest.approx(0.0)  # odds(0.5) = 1
    m = orpo_metrics(chosen, rejected, lam=0.1)
    ratio = 0.0 - math.log(0.2 / 0.8)
    assert m["log_odds_ratio"] == pytest.approx(ratio)
    assert m["loss"] == pytest.approx(-math.log(0.5) + 0.1 * -math.log(1 / (1 + math.exp(-ratio))))
    assert m["preference_accuracy"] == 1.0


@pytest.mark.parametrize("mean_logp", [-1e-9, -1e-7, -1e-6, -1e-5, -1e-3, -0.5, -0.6931, -0.6932, -1.0, -10.0, -50.0])
def test_log_odds_near_zero_match_float64(mean_logp):
    """float32 log odds within a few float32 ulps of the float64 value, as P -> 1 too (no clamp: -1e-9 gives 20.7;
    the old clamp at 1 - 1e-7 was off by 1.3e-2 at -1e-6 and stopped at 15.9)."""
    x = torch.tensor([mean_logp], dtype=torch.float32)
    v = x.double().item()  # the float32 input, exactly
    reference = v - math.log(-math.expm1(v))
    assert log_odds(x).item() == pytest.approx(reference, rel=2e-7, abs=1e-7)


def test_log_odds_do_not_saturate():
    values = log_odds(torch.tensor([-1e-6, -1e-7, -1e-8, -1e-9, -1e-10], dtype=torch.float32)).tolist()
    assert values == sorted(values) and values[-1] == pytest.approx(23.03, abs=0.01)  # log(1 / 1e-10)
    assert log_odds(torch.tensor([0.0])).item() == math.inf  # P = 1: infinite odds, not a clamped number


@pytest.mark.slow(seconds=130)
@pytest.mark.parametrize("method,margin_key,rise", [
    ("dpo", "eval_reward_margin", 0.05),      # beta * log-ratio margin (0.13 measured; 0 before: policy = reference)
    ("orpo", "eval_log_odds_ratio", 0.02),    # of the mean token probability, so one marker token in ~20 moves it less
])
def test_dpo_and_orpo_raise_the_held_out_margin(method, margin_key, rise, pairs_workdir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params[method].update(method="full", epochs=4, learning_rate=3e-3, batch_size=8, warmup_ratio=0.0)
    if method == "orpo":
        params["orpo"]["lam"] = 1.0  # the random model's NLL (~10.8 nats) would drown a small odds-ratio term
    write_params(pairs_workdir, params)
    result = alignflow(method, pairs_workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((pairs_workdir / "metrics" / f"{method}.json").read_text())
    assert metrics[margin_key] > metrics[margin_key + "_before"] + rise, {k: v for k, v in metrics.items() if "eval" in k}
    if method == "dpo":  # dpo.sft_weight (default 1): TRL adds the chosen response's NLL, which raises its likelihood
        assert metrics["loss_type"] == ["sigmoid", "sft"] and metrics["loss_weights"] == [1.0, params["dpo"]["sft_weight"]]
        assert metrics["eval_chosen_reward"] > 0, metrics["eval_chosen_reward"]  # beta * (log pi - log ref) on chosen
    accuracy = "eval_reward_accuracy" if method == "dpo" else "eval_preference_accuracy"
    assert metrics[accuracy] >= 0.6, metrics[accuracy]
    assert metrics["wall_seconds"] > 0 and metrics["peak_memory_mb"] > 0 and metrics["model_copies"] >= 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pairs_workdir / "models" / "aligned" / method)  # plain transformers loads it
    assert (pairs_workdir / "dvclive" / method / "plots" / "metrics").is_dir()
