"""Log-probabilities of responses under a model, and the log odds ORPO's formula needs: the numbers the held-out
formulas of alignflow.align.methods are computed from.

    sums, means = response_logps(model, tokenizer, prompts, responses)   # over each response's tokens, given its prompt
    log_odds(means)                                                      # log(P / (1 - P)), P = exp(mean log-prob)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


LOG_HALF = -0.6931471805599453  # log(1/2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurately (Maechler, 2012; TRL's ORPO trainer uses the same form):
    log1p(-exp(x)) below log(1/2), log(-expm1(x)) above, where 1 - exp(x) would cancel."""
    return torch.where(x < LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P, stably and unclamped (+inf only at log P = 0 exactly, i.e. P = 1)."""
    return mean_logps - log1mexp(mean_logps)


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
