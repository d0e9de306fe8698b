"""Reward models: a sequence classifier with one output, the reward of a whole conversation.

    model, tokenizer = load_reward_model("models/reward")
    rewards = score(model, tokenizer, [conversation_ids(tokenizer, prompt, response), ...])

A conversation is rendered with the chat template (prompt messages + the assistant's response) and the
reward is read at its last token, the way `AutoModelForSequenceClassification` reads it. The same
`conversation_ids` feeds training (reward/reward_model.py), scoring for PPO and GRPO, and evaluation, so
they all see identical tokens. `from_causal_lm` builds the classifier from what the SFT stage
wrote: a plain checkpoint, or a LoRA adapter merged into its base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from alignflow.core.io import InputError


def conversation_ids(tokenizer, prompt: list[dict[str, str]], response: str) -> list[int]:
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def from_causal_lm(path: str | Path, dtype: Any = torch.float32):
    """A one-output sequence classifier whose backbone holds the weights of the trained causal LM at
    `path`; the score head is new (initialised from torch's global RNG: seed it first)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    info_file = Path(path) / "alignflow_model.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {"kind": "full"}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" / "lm_head unused" are expected here
    try:
        if info["kind"] == "full":
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        from alignflow.core.models import load_trained

        trained = load_trained(path, dtype=dtype)
        config = getattr(trained, "peft_config", {}).get("default")
        if config is None or config.peft_type != "LORA":
            raise InputError(f"{path}: a reward model starts from SFT weights that merge into a plain model (sft.method "
                             f"full, lora or qlora); this one is {info.get('method', info['kind'])}")
        merged = trained.merge_and_unload()
        model = AutoModelForSequenceClassification.from_pretrained(info["base"], num_labels=1, dtype=dtype)
        model.base_model.load_state_dict(merged.base_model.state_dict())
        return model
    finally:
        hf_logging.set_verbosity(verbosity)


def load_reward_model(path: str | Path, device: str = "cpu"):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def score(model, tokenizer, sequences: list[list[int]], batch_size: int = 16) -> list[float]:
    """The reward of each tokenised conversation (right-padded batches; the model finds the last token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rewards: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
        rewards.extend(model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().tolist())
    model.train(was_training)
    return rewards
