"""Generator backends: the OpenAI-compatible one keeps a bounded number of requests in flight, retries
failed ones, and returns answers in prompt order; the vLLM one says clearly what it needs when it cannot run."""

from __future__ import annotations

import threading
import time

import pytest

from alignflow.core.generation import OpenAIGenerator, VLLMGenerator
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
