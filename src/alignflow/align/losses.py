"""The DPO, IPO, ORPO and SimPO objectives on log-probabilities, and the log-probabilities of responses under a model.

    logps = response_logps(model, tokenizer, prompts, responses)           # sum over response tokens
    m = dpo_metrics(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)

DPO (Rafailov et al., 2023):  loss = -log sigmoid(beta * ((log pi_w - log ref_w) - (log pi_l - log ref_l))),
  implicit rewards beta * (log pi - log ref); accuracy = reward_w > reward_l.
ORPO (Hong et al., 2024):     loss = NLL(chosen) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)),
  odds(y) = P / (1 - P) with P the geometric-mean token probability (exp of the mean log-prob).
IPO (Azar et al., 2024) and SimPO (Meng et al., 2024): see `ipo_metrics`, `simpo_metrics`.
The stages train with TRL's trainers and use these to report held-out metrics with the same formulas;
tests check them on hand-worked numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_metrics(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    chosen_rewards = beta * (pi_chosen - ref_chosen)
    rejected_rewards = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return {
        "loss": loss.mean().item(), "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
    }


LOG_HALF = -0.6931471805599453  # log(1/2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurately (Maechler, 2012; TRL's ORPO trainer uses the same form):
    log1p(-exp(x)) below log(1/2), log(-expm1(x)) above, where 1 - exp(x) would cancel."""
    return torch.where(x < LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P, stably and unclamped (+inf only at log P = 0 exactly, i.e. P = 1)."""
    return mean_logps - log1mexp(mean_logps)


def orpo_metrics(chosen_mean_logps, rejected_mean_logps, lam: float) -> dict[str, float]:
    ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    odds_loss = -F.logsigmoid(ratio)
    nll = -chosen_mean_logps
    return {
        "loss": (nll + lam * odds_loss).mean().item(), "nll_chosen": nll.mean().item(),
        "log_odds_ratio": ratio.mean().item(), "odds_ratio_loss": odds_loss.mean().item(),
        "preference_accuracy": (ratio > 0).float().mean().item(),
    }


def _pair_ids(tokenizer, prompt: list[dict[str, str]], response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response (chat template) and where the response starts."""
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    return head_ids + tokenizer(full[len(head):], add_special_tokens=False)["input_ids"], len(head_ids)


@torch.no_grad()
def response_logps(model, tokenizer, prompts, responses, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) of the log-probabilities of each response's tokens given its prompt."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, means = [], []
    for start in range(0, len(prompts), batch_size):
        items = [_pair_ids(tokenizer, p, r) for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])]
        width = max(len(ids) for ids, _ in items)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in items], device=device)
        attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in items], device=device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
        for row, (seq, start_of_response) in enumerate(items):
            picked = token_logps[row, start_of_response - 1 : len(seq) - 1]
            sums.append(picked.sum())
            means.append(picked.mean())
    return torch.stack(sums).cpu(), torch.stack(means).cpu()


def ipo_metrics(pi_chosen_mean, pi_rejected_mean, ref_chosen_mean, ref_rejected_mean, tau: float) -> dict[str, float]:
    """IPO (Azar et al., 2024, eq. 17): loss = (h - 1 / (2 tau))^2 with h the log-ratio margin
    (log pi_w - log ref_w) - (log pi_l - log ref_l); per token (mean log-probs), as TRL trains it (its code notes the
    IPO authors' results use this normalised form). accuracy = h > 0."""
    margin = (pi_chosen_mean - ref_chosen_mean) - (pi_rejected_mean - ref_rejected_mean)
    return {"loss": ((margin - 1 / (2 * tau)) ** 2).mean().item(), "logratio_margin": margin.mean().item(),
            "preference_accuracy": (margin > 0).float().mean().item(), "target_margin": 1 / (2 * tau)}


def simpo_metrics(chosen_mean_logps, rejected_mean_logps, beta: float, gamma: float) -> dict[str, float]:
    """SimPO (Meng et al., 2024, eq. 6): reward r(y) = beta / |y| * log pi(y) = beta * mean token log-prob;
    loss = -log sigmoid(r_w - r_l - gamma); accuracy = r_w > r_l. No reference model."""
    chosen, rejected = beta * chosen_mean_logps, beta * rejected_mean_logps
    return {"loss": (-F.logsigmoid(chosen - rejected - gamma)).mean().item(), "reward_margin": (chosen - rejected).mean().item(),
            "reward_accuracy": (chosen > rejected).float().mean().item(), "chosen_reward": chosen.mean().item(),
            "rejected_reward": rejected.mean().item()}
