"""The alignment methods `alignment.methods` can name: one entry each. This table is the one place a method is defined.

A TRL-backed preference method is one `Method` entry here (with its held-out formula beside it) plus its params
section: in params.yaml and in the schema, where the section takes in `$defs/training` (core/params.py types such a
section from the schema alone). `align/preference.py` trains any of them. Each entry says:
  start_from  the model it trains: "sft" (paths.sft_model) or "base" (paths.base_model, ORPO folds SFT into its loss)
  reads       "pairs" (chosen / rejected, TRL's preference format) or "prompts" (the train prompts of the pairs; the
              method samples its own responses and scores them: PPO, GRPO)
  trainer     "module:Class" of the trainer and of its config (imported when the method runs)
  options     the section's own knobs as fields of that config (beta, loss_type, ...)
  held_out    held-out metrics by the paper's formula (below), from the log-probs of the eval pairs, which
              `align/preference.py` computes (`reference`: the formula needs the reference model's too), and the
              headline the report shows (metric name, label)
  accelerate  an HF / TRL Trainer: `accelerate launch` can run it on several processes (our PPO cannot)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from alignflow.align.logprobs import log_odds
from alignflow.core.io import InputError


# --- each method's held-out formula, from the eval pairs' log-probs (tests check them on hand-worked numbers) ---


def dpo_metrics(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """DPO (Rafailov et al., 2023): implicit rewards beta * (log pi - log ref), summed over the response's tokens;
    loss = -log sigmoid(reward_w - reward_l); accuracy = reward_w > reward_l."""
    chosen_rewards = beta * (pi_chosen - ref_chosen)
    rejected_rewards = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return {
        "loss": loss.mean().item(), "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
    }


def ipo_metrics(pi_chosen_mean, pi_rejected_mean, ref_chosen_mean, ref_rejected_mean, tau: float) -> dict[str, float]:
    """IPO (Azar et al., 2024, eq. 17): loss = (h - 1 / (2 tau))^2 with h the log-ratio margin
    (log pi_w - log ref_w) - (log pi_l - log ref_l); per token (mean log-probs), as TRL trains it (its code notes the
    IPO authors' results use this normalised form). accuracy = h > 0."""
    margin = (pi_chosen_mean - ref_chosen_mean) - (pi_rejected_mean - ref_rejected_mean)
    return {"loss": ((margin - 1 / (2 * tau)) ** 2).mean().item(), "logratio_margin": margin.mean().item(),
            "preference_accuracy": (margin > 0).float().mean().item(), "target_margin": 1 / (2 * tau)}


def orpo_metrics(chosen_mean_logps, rejected_mean_logps, lam: float) -> dict[str, float]:
    """ORPO (Hong et al., 2024): loss = NLL(chosen) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)),
    odds(y) = P / (1 - P), P the geometric-mean token probability (exp of the mean log-prob)."""
    ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    odds_loss = -F.logsigmoid(ratio)
    nll = -chosen_mean_logps
    return {
        "loss": (nll + lam * odds_loss).mean().item(), "nll_chosen": nll.mean().item(),
        "log_odds_ratio": ratio.mean().item(), "odds_ratio_loss": odds_loss.mean().item(),
        "preference_accuracy": (ratio > 0).float().mean().item(),
    }


def simpo_metrics(chosen_mean_logps, rejected_mean_logps, beta: float, gamma: float) -> dict[str, float]:
    """SimPO (Meng et al., 2024, eq. 6): reward r(y) = beta / |y| * log pi(y) = beta * mean token log-prob;
    loss = -log sigmoid(r_w - r_l - gamma); accuracy = r_w > r_l. No reference model."""
    chosen, rejected = beta * chosen_mean_logps, beta * rejected_mean_logps
    return {"loss": (-F.logsigmoid(chosen - rejected - gamma)).mean().item(), "reward_margin": (chosen - rejected).mean().item(),
            "reward_accuracy": (chosen > rejected).float().mean().item(), "chosen_reward": chosen.mean().item(),
            "rejected_reward": rejected.mean().item()}


def with_nll_on_chosen(weight: float) -> dict[str, Any]:
    """DPO plus `weight` times the NLL of the chosen response (RPO, Pang et al., 2024: the term keeps DPO from lowering
    the chosen response's likelihood along with the rejected one's); TRL sums its listed losses with these weights."""
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, weight]} if weight > 0 else {}


# --- the table ---


@dataclass(frozen=True)
class Method:
    name: str
    start_from: str
    reads: str
    trainer: str
    config: str
    options: Callable[[Any], dict[str, Any]]
    held_out: Callable[..., dict[str, float]] | None = None
    reference: bool = False
    headline: tuple[str, str] = ("", "")
    accelerate: bool = True


METHODS = {m.name: m for m in (
    Method("ppo", "sft", "prompts", "alignflow.align.ppo.ppo_trainer:PPOTrainer", "alignflow.align.ppo.ppo_config:PPOConfig",
           options=lambda c: {}, headline=("eval_reward", "held-out reward"), accelerate=False),
    Method("grpo", "sft", "prompts", "trl:GRPOTrainer", "trl:GRPOConfig",
           options=lambda c: {"num_generations": c.num_generations, "max_completion_length": c.max_new_tokens,
                              "temperature": c.temperature, "beta": c.beta},
           headline=("eval_reward", "held-out reward")),
    Method("dpo", "sft", "pairs", "trl:DPOTrainer", "trl:DPOConfig",
           options=lambda c: {"beta": c.beta, "max_length": c.max_length, **with_nll_on_chosen(c.sft_weight)},
           held_out=lambda h, c: dpo_metrics(h.pi_chosen, h.pi_rejected, h.ref_chosen, h.ref_rejected, c.beta),
           reference=True, headline=("reward_margin", "held-out margin")),
    Method("ipo", "sft", "pairs", "trl:DPOTrainer", "trl:DPOConfig",
           options=lambda c: {"loss_type": ["ipo"], "beta": c.tau, "max_length": c.max_length},
           held_out=lambda h, c: ipo_metrics(h.pi_chosen_mean, h.pi_rejected_mean, h.ref_chosen_mean, h.ref_rejected_mean,
                                             c.tau),
           reference=True, headline=("logratio_margin", "held-out log-ratio margin per token")),
    Method("orpo", "base", "pairs", "trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig",
           options=lambda c: {"beta": c.lam, "max_length": c.max_length},
           held_out=lambda h, c: orpo_metrics(h.pi_chosen_mean, h.pi_rejected_mean, c.lam),
           headline=("log_odds_ratio", "held-out log odds ratio")),
    Method("simpo", "sft", "pairs", "trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig",
           options=lambda c: {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": c.beta, "simpo_gamma": c.gamma,
                              "max_length": c.max_length},
           held_out=lambda h, c: simpo_metrics(h.pi_chosen_mean, h.pi_rejected_mean, c.beta, c.gamma),
           headline=("reward_margin", "held-out reward margin")),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"alignment method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def load(spec: str):
    """The class a "module:Class" string names."""
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)
