"""PPO for language models (Ouyang et al., 2022; Ziegler et al., 2019), small enough to read in one sitting.
TRL 1.x dropped its PPO trainer, so this is ours; `alignflow.align.ppo.ppo` wires it to the pipeline.

Four roles:
  policy     the model being trained (a causal LM, usually the SFT model with a LoRA adapter)
  reference  the frozen SFT model; with a LoRA policy it is the same weights with the adapter disabled,
             so no second copy is held (`ref_model=None`)
  reward     a function (prompt ids, response ids) -> scalar score, called once per finished response
  value      the critic: a sequence-classification model (initialised from the reward model) read at
             every token, V(s_t) = score_head(hidden state before response token t)

One iteration (`step`):
  1. rollout: sample a response per prompt; log-probs under policy and reference; values; the score.
  2. per-token reward r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus the score at the last token.
  3. advantages by GAE(gamma, lambda), whitened; returns = advantages + values.
  4. `ppo_epochs` passes over shuffled minibatches: clipped surrogate (epsilon) + clipped value loss;
     stop early once the approximate KL to the rollout policy passes `stop_kl`.
  5. with `adaptive_kl`, move beta toward `target_kl`.
Everything is on token ids; texts are the stage's business. `state_dict()` / `load_state_dict()` hold what a
resumed run needs of the trainer (the stage checkpoints it with its RNG states and data position).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignflow.align.ppo.ppo_config import PPOConfig

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
# (policy, prompt ids) -> each prompt's sampled response, its tokens through its EOS: an inference engine holding the
# policy's current weights (alignflow.align.ppo.ppo.engine_sampler); None samples with the policy's own generate
Sampler = Callable[[torch.nn.Module, list[list[int]]], list[list[int]]]


# --- the formulas, each testable on hand-worked numbers ---


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * (log pi - log pi_ref) on every response token, + the reward model's score on the last one.
    Returns (rewards, per-token KL estimate), both [batch, tokens], zero on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses:
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0), A_t = delta_t + gamma * lam * A_{t+1}.
    Returns (advantages, returns = advantages + values)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_range, clip_range_value):
    """Clipped surrogate and clipped value loss (masked means), with the clip fraction and approximate KL."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    value_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return policy_loss, value_loss, clip_fraction, approx_kl


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)   (Ziegler et al., 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n / self.horizon


# --- the trainer ---


@dataclass
class Rollout:
    sequences: torch.Tensor   # [B, P + T] left-padded prompt + response
    attention: torch.Tensor   # [B, P + T]
    mask: torch.Tensor        # [B, T] response tokens up to and including EOS
    logprobs: torch.Tensor    # [B, T]
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor      # [B]
    entropy: torch.Tensor     # [B, T]


class PPOTrainer:
    def __init__(self, config: PPOConfig, policy, value_model, reward_fn: RewardFn, *, pad_token_id: int, eos_token_id: int,
                 ref_model=None, sampler: Sampler | None = None):
        if ref_model is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("without a reference model the policy must be a peft model (the reference is the adapter disabled)")
        self.config, self.policy, self.value_model, self.ref_model = config, policy, value_model, ref_model
        self.sampler = sampler  # None: the policy's own generate
        self.reward_fn, self.pad, self.eos = reward_fn, pad_token_id, eos_token_id
        self.kl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, eps=1e-5)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        for model in (policy, value_model, ref_model):
            if model is not None:
                model.eval()  # no dropout: the rollout and the update must see the same function
        self.device = next(policy.parameters()).device

    def state_dict(self) -> dict:
        """What a resumed run needs of the trainer: the policy's trainable weights (the adapter, with LoRA), the
        value model, the optimizer, beta and the minibatch shuffler. The caller adds the global RNG states and
        its data position."""
        return {"policy": {n: p.detach().cpu() for n, p in self.policy.named_parameters() if p.requires_grad},
                "value_model": {k: v.detach().cpu() for k, v in self.value_model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "beta": self.kl.beta, "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: dict) -> None:
        trainable = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        if trainable.keys() != state["policy"].keys():
            raise ValueError(f"the checkpoint's policy weights are not this policy's trainable ones: "
                             f"{sorted(trainable.keys() ^ state['policy'].keys())[:5]}")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state["policy"][name])
        self.value_model.load_state_dict(state["value_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.beta = state["beta"]
        self.shuffle.set_state(state["shuffle"])

    # positions: left padding must not shift the position ids
    @staticmethod
    def _positions(attention: torch.Tensor) -> torch.Tensor:
        return (attention.cumsum(dim=1) - 1).clamp(min=0)

    def _logits(self, model, sequences, attention, prompt_len):
        out = model(input_ids=sequences, attention_mask=attention, position_ids=self._positions(attention))
        return out.logits[:, prompt_len - 1 : -1].float() / self.config.temperature

    def _token_logprobs(self, model, sequences, attention, prompt_len):
        logits = self._logits(model, sequences, attention, prompt_len)
        return torch.gather(F.log_softmax(logits, dim=-1), 2, sequences[:, prompt_len:, None]).squeeze(-1), logits

    def _values(self, sequences, attention, prompt_len):
        backbone = self.value_model.base_model
        hidden = backbone(input_ids=sequences, attention_mask=attention, position_ids=self._positions(attention)).last_hidden_state
        return self.value_model.score(hidden[:, prompt_len - 1 : -1]).squeeze(-1).float()

    def _reference_logprobs(self, sequences, attention, prompt_len):
        model = self.ref_model if self.ref_model is not None else self.policy
        context = self.policy.disable_adapter() if self.ref_model is None else nullcontext()
        with context:
            return self._token_logprobs(model, sequences, attention, prompt_len)[0]

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> Rollout:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        if self.sampler is not None:  # an inference engine samples; the training model scores below (the PPO maths)
            new = self.sampler(self.policy, prompts)
            length = max(map(len, new), default=0)
            responses = torch.tensor([r + [self.pad] * (length - len(r)) for r in new], device=self.device, dtype=ids.dtype)
            mask = torch.tensor([[1.0] * len(r) + [0.0] * (length - len(r)) for r in new], device=self.device)
            sequences = torch.cat([ids, responses], dim=1)
        else:
            sequences = self.policy.generate(
                input_ids=ids, attention_mask=attention, do_sample=True, temperature=self.config.temperature, top_k=0,
                top_p=1.0, max_new_tokens=self.config.max_new_tokens, pad_token_id=self.pad, eos_token_id=self.eos)
            responses = sequences[:, width:]
            # the response runs up to and including the first EOS; the rest is padding
            is_eos = responses == self.eos
            mask = (~((is_eos.cumsum(dim=1) - is_eos.long()) > 0)).float()
        if responses.shape[1] == 0:
            raise RuntimeError("the policy generated no tokens")
        attention = torch.cat([attention, mask.long()], dim=1)
        logprobs, logits = self._token_logprobs(self.policy, sequences, attention, width)
        probs = F.softmax(logits, dim=-1)
        entropy = -(probs * F.log_softmax(logits, dim=-1)).sum(-1)
        ref_logprobs = self._reference_logprobs(sequences, attention, width)
        values = self._values(sequences, attention, width)
        kept = [r[: int(m.sum())].tolist() for r, m in zip(responses, mask)]
        scores = self.reward_fn(prompts, kept).to(self.device).float()
        return Rollout(sequences, attention, mask, logprobs * mask, ref_logprobs * mask, values * mask, scores, entropy * mask)

    def step(self, prompts: list[list[int]]) -> dict[str, float]:
        """One rollout and its PPO epochs; returns the iteration's statistics."""
        cfg = self.config
        if len(prompts) != cfg.batch_size:
            raise ValueError(f"step() takes exactly batch_size={cfg.batch_size} prompts, got {len(prompts)}")
        ro = self.rollout(prompts)
        prompt_len = ro.sequences.shape[1] - ro.mask.shape[1]
        rewards, kl = kl_penalised_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, self.kl.beta)
        advantages, returns = gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, ro.mask)

        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": []}
        epochs_run = 0
        for _ in range(cfg.ppo_epochs):
            epochs_run += 1
            epoch_kl = []
            order = torch.randperm(cfg.batch_size, generator=self.shuffle)
            for start in range(0, cfg.batch_size, cfg.minibatch_size):
                mb = order[start : start + cfg.minibatch_size].to(self.device)
                logprobs, _ = self._token_logprobs(self.policy, ro.sequences[mb], ro.attention[mb], prompt_len)
                values = self._values(ro.sequences[mb], ro.attention[mb], prompt_len)
                policy_loss, value_loss, clip_fraction, approx_kl = ppo_losses(
                    logprobs, ro.logprobs[mb], advantages[mb], values, ro.values[mb], returns[mb], ro.mask[mb],
                    cfg.clip_range, cfg.clip_range_value)
                loss = policy_loss + cfg.value_coef * value_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
                self.optimizer.step()
                for key, value in zip(stats, (policy_loss, value_loss, clip_fraction, approx_kl)):
                    stats[key].append(value.item())
                epoch_kl.append(float(approx_kl))
            if cfg.stop_kl is not None and sum(epoch_kl) / len(epoch_kl) > cfg.stop_kl:
                break

        kl_per_response = kl.sum(dim=1).mean().item()
        result = {
            "reward": ro.scores.mean().item(), "kl": kl_per_response, "beta": self.kl.beta,
            "entropy": masked_mean(ro.entropy, ro.mask).item(), "response_length": ro.mask.sum(dim=1).mean().item(),
            "epochs_run": epochs_run, **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        if cfg.adaptive_kl:
            self.kl.update(kl_per_response, cfg.batch_size)
        return result
