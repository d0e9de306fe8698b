"""Generator backends: text in, text out, in batches, reproducibly.

- `TransformersGenerator`: a local causal LM (directory or hub id), left-padded batched sampling,
  optionally wrapping each prompt as a user turn of the model's chat template. Seeded per call.
- `OpenAIGenerator`: any OpenAI-compatible chat server (vLLM, TGI, Ollama) by `api_base`; the API
  key is read from the environment variable named in params and is never logged or written.

Both expose `generate(prompts, max_new_tokens=..., seed=...) -> list[str]` and `describe()`, the
provenance recorded beside each generated example (no secrets in it). A prompt is a string (one user
turn) or a list of chat messages.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from tqdm import tqdm

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]  # one user turn, or chat messages


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class Generator(Protocol):
    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, stop: list[str] | None = None) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...


class TransformersGenerator:
    def __init__(self, model_path: str, *, temperature: float, top_p: float, batch_size: int, chat_template: bool):
        from alignflow.models import Source, load_for_inference, load_tokenizer, pick_device_dtype

        self.model_path, self.temperature, self.top_p = model_path, temperature, top_p
        self.batch_size, self.chat_template = batch_size, chat_template
        self.device, dtype = pick_device_dtype()
        self.tokenizer = load_tokenizer(Source(model_path))
        self.tokenizer.padding_side = "left"  # decoder-only batches must be padded on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_for_inference(model_path, dtype=dtype).to(self.device).eval()

    def describe(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": self.model_path, "chat_template": self.chat_template}

    def _render(self, prompt: Prompt) -> str:
        if not self.chat_template:
            if not isinstance(prompt, str):
                raise ValueError("chat messages need chat_template: true")
            return prompt
        return self.tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, stop: list[str] | None = None) -> list[str]:
        import torch

        torch.manual_seed(seed)  # one seed per call: a rerun with the same params samples the same tokens
        outputs: list[str] = []
        batches = range(0, len(prompts), self.batch_size)
        for start in tqdm(batches, desc="generate", unit="batch", leave=False, disable=len(batches) < 2):
            texts = [self._render(p) for p in prompts[start : start + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat_template)
            enc = enc.to(self.device)
            with torch.no_grad():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature if self.temperature > 0 else None,
                    top_p=self.top_p if self.temperature > 0 else None,
                    top_k=0 if self.temperature > 0 else None,  # 0 disables top-k; the checkpoint's config may set one
                    pad_token_id=self.tokenizer.pad_token_id,
                    stop_strings=stop or None,
                    tokenizer=self.tokenizer if stop else None,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return [_cut_at_stop(o, stop) for o in outputs]


class OpenAIGenerator:
    def __init__(self, model: str, *, api_base: str, api_key_env: str, temperature: float, top_p: float, concurrency: int):
        from openai import OpenAI

        self.model, self.api_base, self.temperature, self.top_p = model, api_base, temperature, top_p
        self.concurrency = concurrency
        # servers such as vLLM or Ollama accept any key when they were started without one
        key = os.environ.get(api_key_env) or "EMPTY"
        self.client = OpenAI(base_url=api_base, api_key=key, max_retries=3, timeout=600)

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.model, "api_base": self.api_base}

    def _one(self, prompt: Prompt, max_new_tokens: int, seed: int, stop: list[str] | None) -> str:
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=as_messages(prompt),
            max_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            stop=stop or None,
        )
        return _cut_at_stop(reply.choices[0].message.content or "", stop)

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, stop: list[str] | None = None) -> list[str]:
        # each prompt gets its own seed derived from the call's, so results do not depend on arrival order
        with ThreadPoolExecutor(self.concurrency) as pool:
            jobs = [pool.submit(self._one, p, max_new_tokens, seed + i, stop) for i, p in enumerate(prompts)]
            return [job.result() for job in tqdm(jobs, desc="generate", unit="prompt", leave=False)]


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    for marker in stop or []:
        index = text.find(marker)
        if index >= 0:
            text = text[:index]
    return text
