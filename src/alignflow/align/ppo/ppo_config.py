"""Settings of our PPO trainer (alignflow.align.ppo.ppo_trainer), one dataclass as in TRL's `*_config.py`.

The stage builds it from `params.yaml`'s `ppo` section; tests build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PPOConfig:
    batch_size: int = 8               # prompts (= responses) per rollout
    minibatch_size: int = 4           # responses per gradient step; must divide batch_size
    ppo_epochs: int = 4               # passes over each rollout
    learning_rate: float = 1e-5
    max_new_tokens: int = 48
    temperature: float = 1.0          # sampling temperature; log-probabilities use the same one
    kl_coef: float = 0.05             # beta of the per-token penalty beta * (log pi - log pi_ref)
    adaptive_kl: bool = False         # adjust beta toward target_kl (Ziegler et al., 2019)
    target_kl: float = 6.0            # target of the adaptive controller: KL summed over a response
    kl_horizon: int = 10000           # the controller's horizon, in responses
    gamma: float = 1.0
    lam: float = 0.95                 # GAE lambda
    clip_range: float = 0.2           # epsilon of the clipped surrogate
    clip_range_value: float = 0.2     # the value loss is clipped around the rollout's values
    value_coef: float = 0.1           # weight of the value loss
    max_grad_norm: float = 1.0
    stop_kl: float | None = 0.1       # stop an iteration's epochs once the approximate KL passes this (None: never)
    whiten_advantages: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"ppo.batch_size={self.batch_size} does not divide into minibatches of "
                             f"ppo.minibatch_size={self.minibatch_size}")
        if self.kl_coef < 0:
            raise ValueError(f"ppo.kl_coef={self.kl_coef}: must be 0 or more")
