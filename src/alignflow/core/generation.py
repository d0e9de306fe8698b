"""Generator backends: text in, text out, in batches, reproducibly.

- `TransformersGenerator`: a local causal LM (directory or hub id), left-padded batched sampling,
  optionally wrapping each prompt as a user turn of the model's chat template. Seeded per call.
- `OpenAIGenerator`: any OpenAI-compatible chat server (vLLM, TGI, Ollama) by `api_base`; the API
  key is read from the environment variable named in params and is never logged or written. Requests
  go out concurrently from a bounded pool (`concurrency` in flight at most); the openai client retries
  connection errors, timeouts, 429 and 5xx answers with exponential backoff (`max_retries`).
- `VLLMGenerator`: vLLM's offline engine on a local checkpoint, when `vllm` is installed (a CUDA GPU);
  prompts are rendered with the checkpoint's own chat template, one sampling seed per prompt.

All three expose `generate(prompts, *, max_new_tokens, seed, stop=None) -> list[str]` (the `Generator`
protocol; a reply is cut at its first stop string) and `describe()`, the provenance recorded beside each
generated example (no secrets in it). A prompt is a string (one user turn) or a list of chat messages;
the local backends take chat messages only with `chat_template` on.
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
        from alignflow.core.models import Source, load_for_inference, load_tokenizer, pick_device_dtype

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
    def __init__(self, model: str, *, api_base: str, api_key_env: str, temperature: float, top_p: float, concurrency: int,
                 max_retries: int = 5, timeout: float = 600.0):
        from openai import OpenAI

        self.model, self.api_base, self.temperature, self.top_p = model, api_base, temperature, top_p
        self.concurrency = concurrency
        # servers such as vLLM or Ollama accept any key when they were started without one
        key = os.environ.get(api_key_env) or "EMPTY"
        self.client = OpenAI(base_url=api_base, api_key=key, max_retries=max_retries, timeout=timeout)

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


class VLLMGenerator:
    """vLLM's offline engine (`pip install vllm`, a CUDA GPU) on a plain local checkpoint."""

    def __init__(self, model_path: str, *, temperature: float, top_p: float, chat_template: bool, seed: int):
        import json
        from pathlib import Path

        from alignflow.core.io import InputError

        try:
            import vllm
        except ImportError as err:
            raise InputError(f"backend 'vllm' needs the vllm package and a CUDA GPU (pip install vllm): {err}") from err
        info = Path(model_path) / "alignflow_model.json"
        if info.is_file() and json.loads(info.read_text())["kind"] != "full":
            raise InputError(f"{model_path}: backend 'vllm' needs a plain checkpoint, not an adapter "
                             "(for the SFT model set sft.lora_merge: true)")
        self.model_path, self.temperature, self.top_p, self.chat_template = model_path, temperature, top_p, chat_template
        self.vllm = vllm
        self.llm = vllm.LLM(model=model_path, seed=seed, tensor_parallel_size=_visible_gpus())
        self.tokenizer = self.llm.get_tokenizer()

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "model": self.model_path, "chat_template": self.chat_template}

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, stop: list[str] | None = None) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
                 if self.chat_template else p for p in prompts]
        sampling = [self.vllm.SamplingParams(temperature=self.temperature, top_p=self.top_p if self.temperature > 0 else 1.0,
                                             max_tokens=max_new_tokens, seed=seed + i, stop=stop or None)
                    for i in range(len(texts))]
        outputs = self.llm.generate(texts, sampling, use_tqdm=True)
        return [_cut_at_stop(o.outputs[0].text, stop) for o in outputs]


def _visible_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def local_generator(backend: str, model_path: str, *, temperature: float, top_p: float, batch_size: int,
                    chat_template: bool, seed: int) -> "TransformersGenerator | VLLMGenerator":
    """The generator for a local checkpoint: `transformers` (batched, any device) or `vllm` (offline engine)."""
    if backend == "vllm":
        return VLLMGenerator(model_path, temperature=temperature, top_p=top_p, chat_template=chat_template, seed=seed)
    return TransformersGenerator(model_path, temperature=temperature, top_p=top_p, batch_size=batch_size,
                                 chat_template=chat_template)


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    for marker in stop or []:
        index = text.find(marker)
        if index >= 0:
            text = text[:index]
    return text
