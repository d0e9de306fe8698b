"""Our batched decoding loop on a transformers causal LM: prefill, then one token a step from the KV cache.

Used by the `torch-<dtype>` generation backend (core/generation.py), which on a CPU with AVX512-BF16 / AMX runs the
model in bf16 through oneDNN, and by PPO's rollouts on that engine. Reads and writes no files: token ids in, token
ids out.

Why not `model.generate`: at batch 32 on two CPU cores a third of its decoding step is sampling (top-p sorts the
49,152-token vocabulary of every row, then draws over all of it; benchmarks/results/generation_step_profile.json).
Here:
- nucleus sampling sorts only the `TOP_CANDIDATES` most likely tokens. That is exact, not an approximation: a token
  is kept when the probability mass ranked above it is below `top_p` (transformers' rule), so when the top
  candidates already hold `top_p` of the mass, every token outside them is cut anyway; a row whose candidates hold
  less is drawn from its whole sorted vocabulary instead;
- the draw is over the kept candidates, from a `torch.Generator` seeded per call: the same seed, model and dtype
  sample the same tokens;
- the prefill computes the logits of the last position alone (`logits_to_keep=1`), and the positions of a
  left-padded row count from its first real token, as `generate` counts them.
"""

from __future__ import annotations

import torch

TOP_CANDIDATES = 256


def nucleus_sample(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` ([batch, vocab], float32): greedy when `temperature` is 0, else a draw from the
    tempered distribution cut to its top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p >= 1.0:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    top, index = logits.topk(min(TOP_CANDIDATES, logits.shape[-1]), dim=-1)  # sorted, most likely first
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()
    token = _draw(probs, index, top_p, generator)
    wide = probs.sum(-1) < top_p  # rows whose nucleus is wider than the candidates: sort their whole vocabulary
    if bool(wide.any()):
        top, index = logits[wide].sort(dim=-1, descending=True)
        token[wide] = _draw(top.softmax(-1), index, top_p, generator)
    return token


def _draw(probs: torch.Tensor, index: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """A draw from each row's nucleus; `probs` sorted, most likely first, `index` their token ids."""
    mass_above = probs.cumsum(-1) - probs
    kept = probs.masked_fill(mass_above >= top_p, 0.0)  # the first token always stays (nothing above it)
    return index.gather(-1, torch.multinomial(kept, 1, generator=generator)).squeeze(-1)


@torch.inference_mode()
def decode(model, prompts: list[list[int]], *, pad_id: int, eos_ids: list[int], max_new_tokens: int, seed: int,
           temperature: float, top_p: float, min_new_tokens: int = 0) -> list[list[int]]:
    """The new tokens of each prompt (a batch of token-id lists, left-padded here), each up to and including its first
    end-of-sequence token, or `max_new_tokens` of them."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)

    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    position = positions[:, -1:]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if step < min_new_tokens:
            logits[:, eos] = float("-inf")
        token = nucleus_sample(logits, temperature=temperature, top_p=top_p, generator=generator)
        token = token.masked_fill(done, pad_id)
        steps.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                    cache=out.cache, use_cache=True)
    new = torch.stack(steps, dim=-1).tolist()
    ends = set(eos_ids)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in ends), len(row))] for row in new]
