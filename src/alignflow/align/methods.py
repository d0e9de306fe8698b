"""The alignment methods `alignment.methods` can name: one entry each. This table is the one place a method is defined.

A TRL-backed preference method is one `Method` line here plus its params section (params.yaml, the schema's
section taking in `$defs/training`, a dataclass in core/params.py); `align/preference.py` trains any of them.
Each entry says:
  start_from  the model it trains: "sft" (paths.sft_model) or "base" (paths.base_model, ORPO folds SFT into its loss)
  reads       "pairs" (chosen / rejected, TRL's preference format) or "prompts" (the train prompts of the pairs; the
              method samples its own responses and scores them: PPO, GRPO)
  trainer     "module:Class" of the trainer and of its config (imported when the method runs)
  options     the section's own knobs as fields of that config (beta, loss_type, ...)
  held_out    held-out metrics by the paper's formula, from the log-probs of the eval pairs (`align/preference.py`
              computes them; `reference` says whether the formula needs the reference model's too), and the
              headline the report shows (metric name, label)
  accelerate  an HF / TRL Trainer: `accelerate launch` can run it on several processes (our PPO cannot)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignflow.align import losses
from alignflow.core.io import InputError


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
           options=lambda c: {"beta": c.beta, "max_length": c.max_length},
           held_out=lambda h, c: losses.dpo_metrics(h.pi_chosen, h.pi_rejected, h.ref_chosen, h.ref_rejected, c.beta),
           reference=True, headline=("reward_margin", "held-out margin")),
    Method("ipo", "sft", "pairs", "trl:DPOTrainer", "trl:DPOConfig",
           options=lambda c: {"loss_type": ["ipo"], "beta": c.tau, "max_length": c.max_length},
           held_out=lambda h, c: losses.ipo_metrics(h.pi_chosen_mean, h.pi_rejected_mean, h.ref_chosen_mean,
                                                    h.ref_rejected_mean, c.tau),
           reference=True, headline=("logratio_margin", "held-out log-ratio margin per token")),
    Method("orpo", "base", "pairs", "trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig",
           options=lambda c: {"beta": c.lam, "max_length": c.max_length},
           held_out=lambda h, c: losses.orpo_metrics(h.pi_chosen_mean, h.pi_rejected_mean, c.lam),
           headline=("log_odds_ratio", "held-out log odds ratio")),
    Method("simpo", "sft", "pairs", "trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig",
           options=lambda c: {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": c.beta, "simpo_gamma": c.gamma,
                              "max_length": c.max_length},
           held_out=lambda h, c: losses.simpo_metrics(h.pi_chosen_mean, h.pi_rejected_mean, c.beta, c.gamma),
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
