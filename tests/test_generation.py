"""Generator backends: the OpenAI-compatible one keeps a bounded number of requests in flight, retries
failed ones, and returns answers in prompt order; the vLLM one says clearly what it needs when it cannot run; the ONNX
Runtime GenAI one (the CPU default) answers as transformers does at fp32, samples reproducibly per seed, names itself
in the provenance, and never reuses an export made from other weights."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from alignflow.core.generation import (OnnxGenerator, OpenAIGenerator, TorchGenerator, VLLMGenerator, local_generator,
                                       onnx_export)
from alignflow.core.io import InputError
from conftest import openai_server


def test_openai_backend_bounded_pool_retries_and_order():
    lock, state = threading.Lock(), {"in_flight": 0, "peak": 0, "requests": 0, "failed": 0}

    def reply(body):
        with lock:
            state["requests"] += 1
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            fail = state["failed"] < 4  # the first four requests fail: overloaded, rate limited
            state["failed"] += fail
        time.sleep(0.05)  # long enough for the pool to fill up
        with lock:
            state["in_flight"] -= 1
        if fail:
            return (503, "overloaded") if state["failed"] % 2 else (429, "slow down")
        return f"echo {body['messages'][-1]['content']} seed {body['seed']}"

    with openai_server(reply) as url:
        generator = OpenAIGenerator("served", api_base=url, api_key_env="ALIGNFLOW_TEST_NO_KEY", temperature=0.7,
                                    top_p=0.9, concurrency=3, max_retries=3)
        answers = generator.generate([f"prompt {i}" for i in range(12)], max_new_tokens=8, seed=100)

    assert answers == [f"echo prompt {i} seed {100 + i}" for i in range(12)]  # prompt order, one seed per prompt
    assert state["peak"] == 3  # concurrent, and never more than the pool
    assert state["requests"] == 12 + 4  # each failure retried once, by the client's backoff


def test_openai_backend_gives_up_after_its_retries():
    with openai_server(lambda body: (503, "down for maintenance")) as url:
        generator = OpenAIGenerator("served", api_base=url, api_key_env="ALIGNFLOW_TEST_NO_KEY", temperature=0.0,
                                    top_p=1.0, concurrency=2, max_retries=1)
        with pytest.raises(Exception, match="down for maintenance"):
            generator.generate(["hello"], max_new_tokens=8, seed=0)


def test_vllm_backend_without_vllm_says_what_it_needs(tiny_model_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="needs the vllm package and a CUDA GPU"):
            VLLMGenerator(str(tiny_model_dir), temperature=0.0, top_p=1.0, chat_template=True, seed=0)
    else:
        pytest.skip("vllm is installed here: its engine is exercised on a GPU machine, not in this test")


# --- the ONNX Runtime GenAI engine (the CPU default) ---------------------------------------------------------------

PROMPTS = ["Write a poem about the sea.", "Hi", "What is two plus two? Explain it step by step, please.",
           "Name three colours.", "Translate 'good morning' into French and into German."]


@pytest.fixture(scope="module")
def lora_on_lively(lively_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on that model, written as a training stage writes one (alignflow_model.json names its base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("lively-lora")
    model.save_pretrained(out)
    (out / "alignflow_model.json").write_text(json.dumps({"kind": "peft", "base": str(lively_model_dir)}))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(lively_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("backend", ["onnx-fp32", "torch-fp32"])
@pytest.mark.parametrize("which", ["plain", "lora"])
def test_fp32_engines_answer_exactly_as_transformers(backend, which, lively_model_dir, lora_on_lively):
    """fp32, greedy: the same tokens as transformers' `generate` for prompts of different lengths in one batch (ORT
    GenAI reads right-padded batches, our loop left-padded ones with position ids from the mask; padded wrongly, the
    shorter prompts' answers change) and for a LoRA checkpoint (merged first)."""
    path = str(lively_model_dir if which == "plain" else lora_on_lively)
    settings = {"temperature": 0.0, "top_p": 1.0, "batch_size": 3, "chat_template": True, "seed": 0}
    expected = local_generator("transformers", path, **settings).generate_ids(PROMPTS, max_new_tokens=12, seed=0)
    engine = local_generator(backend, path, **settings)
    assert isinstance(engine, OnnxGenerator if backend.startswith("onnx") else TorchGenerator)
    got = engine.generate_ids(PROMPTS, max_new_tokens=12, seed=0)
    assert len({tuple(ids) for ids in expected}) >= 3, "the test model answers every prompt alike: the check would be empty"
    assert got == expected
    assert all(isinstance(t, int) for ids in got for t in ids)


def test_onnx_sampling_is_reproducible_and_names_the_engine(lively_model_dir, caplog):
    """Same seed and engine, same tokens (also from a second engine built from the cached export); another seed,
    other tokens; the provenance names the backend and the engine's version; the export is cached by weights."""
    import onnxruntime_genai

    settings = {"temperature": 1.0, "top_p": 0.95, "batch_size": 2, "chat_template": True, "seed": 0}
    first = local_generator("onnx-int4", str(lively_model_dir), **settings)
    a = first.generate(PROMPTS, max_new_tokens=16, seed=7)
    assert first.generate(PROMPTS, max_new_tokens=16, seed=7) == a
    assert first.generate(PROMPTS, max_new_tokens=16, seed=8) != a
    with caplog.at_level(logging.INFO, logger="alignflow.core.generation"):
        second = local_generator("onnx-int4", str(lively_model_dir), **settings)
    assert "from the cache" in caplog.text
    assert second.generate(PROMPTS, max_new_tokens=16, seed=7) == a
    assert first.describe() == {"backend": "onnx-int4", "engine": f"onnxruntime-genai {onnxruntime_genai.__version__}",
                                "model": str(lively_model_dir), "chat_template": True}


def test_onnx_export_key_follows_the_weights(lively_model_dir, tmp_path, monkeypatch):
    """One changed weight gives another export (a stale export can never be used); the same weights, the same one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("ALIGNFLOW_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(lively_model_dir)
    first = onnx_export(model, tokenizer, "int4")
    assert onnx_export(model, tokenizer, "int4") == first
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    second = onnx_export(model, tokenizer, "int4")
    assert second != first and (second / "genai_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted([first.name, second.name])


# --- our decoding loop (backends torch-fp32 / torch-bf16) -------------------------------------------------------------


def hf_top_p_support(logits, temperature: float, top_p: float):
    """The tokens transformers' own top-p warper keeps, and their renormalised probabilities."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    return torch.isfinite(warped), warped.softmax(-1)


def test_nucleus_sampling_draws_from_exactly_transformers_nucleus():
    """Sorting only the top candidates is exact: draws come from exactly the tokens transformers' top-p keeps, at its
    probabilities; a row whose nucleus is wider than the candidates (a flat distribution over 2,000 tokens) is drawn
    from its whole vocabulary, not cut to the candidates."""
    import torch

    from alignflow.core.decoding import TOP_CANDIDATES, nucleus_sample

    peaked = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3] + [1e-6] * 1996))
    flat = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 0.1
    draws = 6000
    logits = torch.stack([peaked] * draws + [flat] * draws)
    tokens = nucleus_sample(logits, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    for row, got in ((peaked, tokens[:draws]), (flat, tokens[draws:])):
        keep, probs = hf_top_p_support(row[None], 1.0, 0.9)
        assert keep[0, got].all(), "a token outside transformers' nucleus was drawn"
        counts = torch.bincount(got, minlength=row.numel()).float() / draws
        assert (counts - probs[0]).abs().max() < 0.02
    assert torch.equal(torch.unique(tokens[:draws]), torch.tensor([1, 2, 3]))
    rank = {int(t): r for r, t in enumerate(flat.argsort(descending=True))}
    assert max(rank[int(t)] for t in tokens[draws:]) > TOP_CANDIDATES  # the wide row was not cut to the candidates


def test_torch_engine_samples_reproducibly_and_names_itself(lively_model_dir):
    """Same seed, dtype and engine: the same tokens; another seed, others; bf16 runs the model in bf16 (a copy: the
    model handed in stays fp32); the provenance names backend and engine."""
    import torch
    from transformers import AutoModelForCausalLM

    settings = {"temperature": 1.0, "top_p": 0.95, "batch_size": 2, "chat_template": True, "seed": 0}
    loaded = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    engine = local_generator("torch-bf16", str(lively_model_dir), **settings, model=loaded)
    a = engine.generate(PROMPTS, max_new_tokens=16, seed=7)
    assert engine.generate(PROMPTS, max_new_tokens=16, seed=7) == a
    assert engine.generate(PROMPTS, max_new_tokens=16, seed=8) != a
    assert local_generator("torch-bf16", str(lively_model_dir), **settings).generate(PROMPTS, max_new_tokens=16, seed=7) == a
    assert engine.model.dtype == torch.bfloat16 and loaded.dtype == torch.float32
    assert engine.describe() == {"backend": "torch-bf16", "engine": f"torch {torch.__version__} (alignflow decoding)",
                                 "model": str(lively_model_dir), "chat_template": True}
    ids = engine.generate_ids(PROMPTS, max_new_tokens=16, seed=7, min_new_tokens=16)
    assert all(len(row) == 16 for row in ids)  # no end of sequence before min_new_tokens
