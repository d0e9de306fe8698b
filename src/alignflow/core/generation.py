"""Generator backends: text in, text out, in batches, reproducibly.

- `TransformersGenerator`: a local causal LM (directory or hub id), left-padded batched sampling,
  optionally wrapping each prompt as a user turn of the model's chat template. Seeded per call.
- `OpenAIGenerator`: any OpenAI-compatible chat server (vLLM, TGI, Ollama) by `api_base`; the API
  key is read from the environment variable named in params and is never logged or written. Requests
  go out concurrently from a bounded pool (`concurrency` in flight at most); the openai client retries
  connection errors, timeouts, 429 and 5xx answers with exponential backoff (`max_retries`).
- `VLLMGenerator`: vLLM's offline engine on a local checkpoint, when `vllm` is installed (a CUDA GPU);
  prompts are rendered with the checkpoint's own chat template, one sampling seed per prompt.
- `OnnxGenerator`: ONNX Runtime GenAI on the CPU (backends `onnx-int4`, `onnx-int8`, `onnx-fp32`): the checkpoint
  (LoRA merged) is exported once by ORT GenAI's model builder into a cache keyed by a hash of its weights, so an
  unchanged model is never exported twice and a changed one never reuses a stale export
  (`$ALIGNFLOW_CACHE`, default `~/.cache/alignflow`). fp32: the fastest exact engine at batch 1 (2.5x transformers'
  `generate` on two cores); int4 / int8: 6-7x at batch 1, another model's answers.
- `TorchGenerator`: the checkpoint (LoRA merged) on torch, sampled by our decoding loop (core/decoding.py; backends
  `torch-fp32`, exact, and `torch-bf16`, the fastest at batch 32 on a CPU with AVX512-BF16: 2.9x `generate`).
  Numbers: benchmarks/results/generation.json.

All five expose `generate(prompts, *, max_new_tokens, seed, stop=None) -> list[str]` (the `Generator`
protocol; a reply is cut at its first stop string) and `describe()`, the provenance recorded beside each
generated example (no secrets in it: backend, engine and its version, model). The local backends also have
`generate_ids(prompts, *, max_new_tokens, seed, min_new_tokens=0) -> list[list[int]]`, the new tokens, and the ONNX
and torch engines `sample_ids(prompt_ids, ...)`, an RL rollout's new tokens through their end-of-sequence token. A prompt is a string (one user turn) or a list of chat messages;
the local backends take chat messages only with `chat_template` on.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]  # one user turn, or chat messages


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render_chat(tokenizer, prompt: Prompt) -> str:
    """The chat template's text of `prompt`, ready for the assistant's turn; messages that end with an assistant
    message are continued from it (a prefilled opening: the model writes what follows, in the same turn)."""
    messages = as_messages(prompt)
    if messages[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
        import transformers

        return {"backend": "transformers", "engine": f"transformers {transformers.__version__}", "model": self.model_path,
                "chat_template": self.chat_template}

    def _render(self, prompt: Prompt) -> str:
        if not self.chat_template:
            if not isinstance(prompt, str):
                raise ValueError("chat messages need chat_template: true")
            return prompt
        return render_chat(self.tokenizer, prompt)

    def generate_ids(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, min_new_tokens: int = 0,
                     stop: list[str] | None = None) -> list[list[int]]:
        import torch

        torch.manual_seed(seed)  # one seed per call: a rerun with the same params samples the same tokens
        outputs: list[list[int]] = []
        batches = range(0, len(prompts), self.batch_size)
        for start in tqdm(batches, desc="generate", unit="batch", leave=False, disable=len(batches) < 2):
            texts = [self._render(p) for p in prompts[start : start + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat_template)
            enc = enc.to(self.device)
            with torch.no_grad():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens or None,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature if self.temperature > 0 else None,
                    top_p=self.top_p if self.temperature > 0 else None,
                    top_k=0 if self.temperature > 0 else None,  # 0 disables top-k; the checkpoint's config may set one
                    pad_token_id=self.tokenizer.pad_token_id,
                    stop_strings=stop or None,
                    tokenizer=self.tokenizer if stop else None,
                )
            outputs.extend(_until_eos(row, self.tokenizer.eos_token_id) for row in out[:, enc["input_ids"].shape[1] :].tolist())
        return outputs

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, stop: list[str] | None = None) -> list[str]:
        ids = self.generate_ids(prompts, max_new_tokens=max_new_tokens, seed=seed, stop=stop)
        return [_cut_at_stop(text, stop) for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


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
        return {"backend": "vllm", "engine": f"vllm {self.vllm.__version__}", "model": self.model_path,
                "chat_template": self.chat_template}

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, stop: list[str] | None = None) -> list[str]:
        texts = [render_chat(self.tokenizer, p) if self.chat_template else p for p in prompts]
        sampling = [self.vllm.SamplingParams(temperature=self.temperature, top_p=self.top_p if self.temperature > 0 else 1.0,
                                             max_tokens=max_new_tokens, seed=seed + i, stop=stop or None)
                    for i in range(len(texts))]
        outputs = self.llm.generate(texts, sampling, use_tqdm=True)
        return [_cut_at_stop(o.outputs[0].text, stop) for o in outputs]


class _LocalEngine:
    """What the ONNX and torch engines share: prompts rendered and tokenised here, sorted by length into batches
    (a batch is padded to its longest prompt), each batch's new tokens from `_batch`, answers back in prompt order."""

    tokenizer: Any
    chat_template: bool
    batch_size: int
    pad_id: int

    def _render(self, prompt: Prompt) -> str:
        return TransformersGenerator._render(self, prompt)  # type: ignore[arg-type]

    def _batch(self, rows: list[list[int]], max_new_tokens: int, seed: int, min_new_tokens: int) -> list[list[int]]:
        raise NotImplementedError

    def generate_ids(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, min_new_tokens: int = 0,
                     stop: list[str] | None = None) -> list[list[int]]:
        encoded = [self.tokenizer(self._render(p), add_special_tokens=not self.chat_template)["input_ids"] for p in prompts]
        raw = self._run(encoded, max_new_tokens, seed, min_new_tokens)
        return [_until_eos(new, self.tokenizer.eos_token_id, self.pad_id) for new in raw]

    def sample_ids(self, prompt_ids: list[list[int]], *, max_new_tokens: int, seed: int) -> list[list[int]]:
        """New tokens for prompts already tokenised, each up to and including its end-of-sequence token (where a
        policy's action ends), as an RL rollout takes them."""
        eos, out = self.tokenizer.eos_token_id, []
        for new in self._run(prompt_ids, max_new_tokens, seed, 0):
            kept = _until_eos(new, eos, self.pad_id)
            out.append(kept + [eos] if len(kept) < len(new) and new[len(kept)] == eos else kept)
        return out

    def _run(self, encoded: list[list[int]], max_new_tokens: int, seed: int, min_new_tokens: int) -> list[list[int]]:
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        outputs: list[list[int]] = [[] for _ in encoded]
        batches = list(range(0, len(encoded), self.batch_size))
        for number, start in enumerate(tqdm(batches, desc="generate", unit="batch", leave=False, disable=len(batches) < 2)):
            members = order[start : start + self.batch_size]
            new = self._batch([encoded[i] for i in members], max_new_tokens, seed + number, min_new_tokens)
            for i, tokens in zip(members, new):
                outputs[i] = tokens
        return outputs

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, seed: int, stop: list[str] | None = None) -> list[str]:
        ids = self.generate_ids(prompts, max_new_tokens=max_new_tokens, seed=seed)
        return [_cut_at_stop(text, stop) for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class OnnxGenerator(_LocalEngine):
    """ONNX Runtime GenAI on the CPU: the checkpoint exported (once per distinct weights) at `precision`
    (int4 / int8: weight-only quantized MatMuls with int8 activations; fp32: the weights as they are)."""

    def __init__(self, model_path: str, *, precision: str, temperature: float, top_p: float, batch_size: int,
                 chat_template: bool, model: Any = None):
        import onnxruntime_genai as og

        from alignflow.core.models import Source, load_for_inference, load_tokenizer

        self.model_path, self.precision, self.temperature, self.top_p = model_path, precision, temperature, top_p
        self.batch_size, self.chat_template = min(batch_size, MAX_ONNX_BATCH), chat_template
        self.tokenizer = load_tokenizer(Source(model_path))
        self.og = og
        if model is None:
            model = load_for_inference(model_path, dtype="float32")
        self.engine = og.Model(str(onnx_export(model, self.tokenizer, precision)))
        del model
        self.pad_id = _pad_id(self.tokenizer)

    def describe(self) -> dict[str, Any]:
        return {"backend": f"onnx-{self.precision}", "engine": f"onnxruntime-genai {self.og.__version__}",
                "model": self.model_path, "chat_template": self.chat_template}

    def _batch(self, rows: list[list[int]], max_new_tokens: int, seed: int, min_new_tokens: int) -> list[list[int]]:
        import numpy as np

        width = max(map(len, rows))
        # ORT GenAI reads a batch right-padded with the model's pad token (never a prompt's token; see onnx_export)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        params = self.og.GeneratorParams(self.engine)
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                    "random_seed": seed} if self.temperature > 0 else {"do_sample": False}
        params.set_search_options(batch_size=len(rows), max_length=width + max_new_tokens,
                                  min_length=width + min_new_tokens if min_new_tokens else 0, **sampling)
        generator = self.og.Generator(self.engine, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        # a sequence is its padded prompt, then the new tokens
        return [[int(t) for t in generator.get_sequence(row)[width : width + max_new_tokens]] for row in range(len(rows))]


class TorchGenerator(_LocalEngine):
    """The checkpoint (LoRA merged) on torch in `dtype`, sampled by our decoding loop (core/decoding.py). `bf16` on a
    CPU with AVX512-BF16 / AMX runs oneDNN's bf16 kernels: 2x fp32's matrix products (benchmarks/results/generation.json);
    `fp32` computes what transformers computes. `model`: the checkpoint already loaded, left as it is (a copy is cast)."""

    def __init__(self, model_path: str, *, dtype: str, temperature: float, top_p: float, batch_size: int,
                 chat_template: bool, model: Any = None):
        import copy

        import torch

        from alignflow.core.models import Source, load_for_inference, load_tokenizer

        if dtype not in TORCH_DTYPES:
            raise ValueError(f"torch dtype must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
        self.model_path, self.dtype, self.temperature, self.top_p = model_path, dtype, temperature, top_p
        self.batch_size, self.chat_template = batch_size, chat_template
        self.tokenizer = load_tokenizer(Source(model_path))
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        if model is None:  # merged in fp32, then cast: the merge itself is not rounded
            model = load_for_inference(model_path, dtype="float32")
        elif model.dtype != torch_dtype:
            model = copy.deepcopy(model)
        self.model = model.to(dtype=torch_dtype).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def describe(self) -> dict[str, Any]:
        import torch

        return {"backend": f"torch-{self.dtype}", "engine": f"torch {torch.__version__} (alignflow decoding)",
                "model": self.model_path, "chat_template": self.chat_template}

    def _batch(self, rows: list[list[int]], max_new_tokens: int, seed: int, min_new_tokens: int) -> list[list[int]]:
        from alignflow.core.decoding import decode

        return decode(self.model, rows, pad_id=self.pad_id, eos_ids=[self.tokenizer.eos_token_id], max_new_tokens=max_new_tokens,
                      seed=seed, temperature=self.temperature, top_p=self.top_p, min_new_tokens=min_new_tokens)


TORCH_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
ONNX_PRECISIONS = ("int4", "int8", "fp32")
MAX_ONNX_BATCH = 32  # onnxruntime-genai 0.18's generator takes at most 32 sequences at once


def _pad_id(tokenizer) -> int:
    """A special token no rendered prompt contains, to pad with: ORT GenAI treats every pad token in a batch as
    padding, and SmolLM2 pads with <|im_end|>, which ends each chat turn inside the prompt."""
    for token in (tokenizer.unk_token, "<|endoftext|>", tokenizer.pad_token):
        if token is not None and token != tokenizer.eos_token and token in tokenizer.get_vocab():
            return tokenizer.convert_tokens_to_ids(token)
    raise ValueError("the tokenizer has no special token to pad with besides its end of sequence; use backend transformers")


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNFLOW_CACHE") or Path.home() / ".cache" / "alignflow")


def onnx_export(model: Any, tokenizer: Any, precision: str) -> Path:
    """The ORT GenAI export of `model` (a transformers model, adapters merged) at `precision`, from the cache when
    these exact weights were exported before. The key hashes every weight tensor, the config, the precision and
    the onnxruntime-genai version; the export is written to a temporary directory and renamed into place."""
    import contextlib
    import hashlib
    import io
    import shutil
    import tempfile

    import onnxruntime_genai as og

    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"onnx precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{og.__version__} {precision} {model.config.to_json_string()}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    target = cache_dir() / "onnx" / digest.hexdigest()
    if (target / "genai_config.json").is_file():
        log.info("ONNX export of %s (%s) from the cache: %s", model.config.name_or_path, precision, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "hf", Path(tmp) / "onnx"
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        log.info("exporting %s to ONNX (%s) with onnxruntime-genai %s's model builder", model.config.name_or_path, precision, og.__version__)
        # in this process (what `python -m onnxruntime_genai.models.builder` runs, byte-identical output): a new
        # interpreter would spend ~6 s importing torch and transformers again, for a ~1 s export of a small model
        from onnxruntime_genai.models import builder

        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                options = builder.parse_extra_options(None, str(source), str(built), precision, "cpu", str(Path(tmp) / "cache"), {})
                builder.create_model(None, str(source), str(built), precision, "cpu", str(Path(tmp) / "cache"), **options)
        except Exception as err:
            raise RuntimeError(f"onnxruntime-genai's model builder failed: {err}\n{said.getvalue()[-3000:]}") from err
        config_path = built / "genai_config.json"
        config = json.loads(config_path.read_text())
        config["model"]["pad_token_id"] = _pad_id(tokenizer)
        config_path.write_text(json.dumps(config, indent=2))
        try:
            os.replace(built, target)
        except OSError:  # another process exported the same weights first: use theirs
            shutil.rmtree(built, ignore_errors=True)
    return target


def _visible_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def resolve_backend(backend: str, model_path: str | None = None) -> str:
    """`auto`: on a CUDA GPU `vllm` when vllm is installed and the checkpoint is a plain one (vLLM takes no adapter),
    else `transformers` (bf16); on a CPU `onnx-fp32`: the same model transformers computes (the same greedy tokens),
    faster (benchmarks/results/generation.json)."""
    if backend != "auto":
        return backend
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "onnx-fp32"
    info = Path(model_path or "") / "alignflow_model.json"
    plain = not info.is_file() or json.loads(info.read_text())["kind"] == "full"
    return "vllm" if plain and importlib.util.find_spec("vllm") is not None else "transformers"


def local_generator(backend: str, model_path: str, *, temperature: float, top_p: float, batch_size: int,
                    chat_template: bool, seed: int, model: Any = None) -> "TransformersGenerator | OnnxGenerator | VLLMGenerator":
    """The generator for a local checkpoint: `auto` (see resolve_backend), `onnx-<precision>` (ONNX Runtime GenAI,
    CPU), `torch-<dtype>` (our decoding loop), `transformers` (batched, any device; the fallback for checkpoints that
    cannot be merged: prefix and bottleneck adapters) or `vllm` (offline engine, GPU). `model`: the checkpoint already loaded (by a stage that also scores with it), to export
    without loading it again."""
    backend = resolve_backend(backend, model_path)
    if backend == "vllm":
        return VLLMGenerator(model_path, temperature=temperature, top_p=top_p, chat_template=chat_template, seed=seed)
    if backend.startswith(("onnx-", "torch-")):
        if _mergeable(model_path) and backend.startswith("onnx-"):
            return OnnxGenerator(model_path, precision=backend.removeprefix("onnx-"), temperature=temperature, top_p=top_p,
                                 batch_size=batch_size, chat_template=chat_template, model=model)
        if _mergeable(model_path):
            return TorchGenerator(model_path, dtype=backend.removeprefix("torch-"), temperature=temperature, top_p=top_p,
                                  batch_size=batch_size, chat_template=chat_template, model=model)
        log.warning("%s is a prefix / bottleneck adapter, which %s cannot merge: generating with transformers", model_path, backend)
    return TransformersGenerator(model_path, temperature=temperature, top_p=top_p, batch_size=batch_size,
                                 chat_template=chat_template)


def _mergeable(model_path: str) -> bool:
    info = Path(model_path) / "alignflow_model.json"
    if not info.is_file():
        return True
    kind = json.loads(info.read_text())
    if kind["kind"] == "full":
        return True
    config = Path(model_path) / "adapter_config.json"
    return kind["kind"] == "peft" and config.is_file() and json.loads(config.read_text()).get("peft_type") == "LORA"


def _until_eos(tokens: list[int], *ends: int | None) -> list[int]:
    """The new tokens up to (not including) the first end-of-sequence or padding token."""
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[:i]
    return tokens


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    for marker in stop or []:
        index = text.find(marker)
        if index >= 0:
            text = text[:index]
    return text
