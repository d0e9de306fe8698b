"""Stage base_model: a local directory or the embedded GGUF becomes a plain Hugging Face checkpoint."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow.core.params import load_params
from alignflow.data import base_model
from conftest import tiny_params, write_params


def _materialise(tmp_path, monkeypatch, params_dict):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_params(tmp_path, params_dict))
    base_model.run(params)
    out = tmp_path / params.paths.base_model
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no gguf_file
    tokenizer = AutoTokenizer.from_pretrained(out)
    return out, model, tokenizer


def test_local_directory(tmp_path, monkeypatch, tiny_model_dir):
    out, model, tokenizer = _materialise(tmp_path, monkeypatch, tiny_params(tiny_model_dir))
    assert (out / "model.safetensors").exists() and model.config.num_hidden_layers == 2
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert json.loads((out / "alignflow_source.json").read_text())["name_or_path"] == str(tiny_model_dir)


@pytest.mark.slow
def test_embedded_smollm2_gguf(tmp_path, monkeypatch, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["model"]["name_or_path"] = "embedded:smollm2"
    out, model, tokenizer = _materialise(tmp_path, monkeypatch, params)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape[-1] == 49152 and bool(logits.isfinite().all())
