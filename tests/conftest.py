"""Shared fixtures: a tiny random model with the bundled SmolLM2 tokenizer, and throwaway pipeline repos.

The tiny model is a 2-layer Llama built from a config (random weights, seeded) plus the real tokenizer
and chat template of the embedded SmolLM2 GGUF, so every stage runs for real in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_SEEDS = ROOT.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"
VENV_BIN = str(Path(sys.executable).parent)
PROJECT_FILES = ["Snakefile", "dvc.yaml", "params.yaml", "workflow", "src", "requirements", "data/seeds", "data/prompts", "data/annotations", "data/ab_annotations", "data/eval",
                 "slurm", ".dvcignore", ".gitignore"]


def env() -> dict[str, str]:
    """The environment for `alignflow`, `dvc` and `snakemake` subprocesses: the venv first on PATH."""
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "GX_ANALYTICS_ENABLED": "False"}


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignflow.core.models import load_tokenizer, resolve_source
    from alignflow.core.params import ModelParams

    tokenizer = load_tokenizer(resolve_source(ModelParams("embedded:smollm2", None, None, False, "auto")))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


ALIGN_METHODS = ("ppo", "grpo", "dpo", "ipo", "orpo", "simpo")
TINY_METHODS = ("ppo", "grpo", "dpo", "orpo")


def tiny_params(model_dir: Path, **overrides) -> dict:
    """params.yaml of the project, shrunk for tests: tiny model, few instructions, short generations."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["model"]["name_or_path"] = str(model_dir)
    params["self_instruct"].update(num_instructions=24, batch_size=8, max_new_tokens=24, instance_max_new_tokens=24)
    params["format"]["eval_fraction"] = 0.25
    params["sft"].update(epochs=1, batch_size=4, max_length=128, save_steps=2, prefix_virtual_tokens=4, adapter_bottleneck=8)
    params["samples"].update(max_prompts=8, max_new_tokens=24)
    # the rules judge needs no model; an untrained model's answers differ mostly in length, so a narrow
    # length band is what ranks them (the AI judge, with total position bias, would give only ties)
    params["preferences"].update(judge="rules", rules_min_tokens=1, rules_max_tokens=16, revision_max_new_tokens=24)
    params["reward_model"].update(epochs=1, batch_size=4, max_length=256)
    params["ppo"].update(iterations=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=8)
    params["dpo"].update(epochs=1, batch_size=4, max_length=256)
    params["orpo"].update(epochs=1, batch_size=4, max_length=256)
    params["ipo"].update(epochs=1, batch_size=4, max_length=256)
    params["simpo"].update(epochs=1, batch_size=4, max_length=256)
    params["grpo"].update(epochs=1, batch_size=4, num_generations=2, max_new_tokens=8)
    # the pipeline tests run one method of each kind in the table: ours online (ppo), TRL online (grpo), TRL on pairs
    # from the SFT model (dpo) and from the base model (orpo); ipo and simpo run dpo's and orpo's code path (their own
    # tests train them), and the default run trains all six
    params["alignment"]["methods"] = list(TINY_METHODS)
    params["evaluate"]["models"] = {name: path for name, path in params["evaluate"]["models"].items()
                                    if name not in ALIGN_METHODS or name in TINY_METHODS}
    params["evaluate"].update(max_new_tokens=8)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        params[section][key] = value
    return params


def make_repo(path: Path, params: dict) -> Path:
    """A git + DVC repository with the project's pipeline files and the given params."""
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        dst = path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    sh(["git", "init", "-q"], path)
    sh(["git", "config", "user.email", "ci@alignflow.invalid"], path)
    sh(["git", "config", "user.name", "alignflow tests"], path)
    sh(["dvc", "init", "-q"], path)
    shutil.copy2(ROOT / ".dvc" / "config", path / ".dvc" / "config")  # the project's DVC settings
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-qm", "pipeline"], path)
    return path


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Path]:
    """A real single-node Slurm (tests/slurm/cluster.sh: munged, slurmctld, slurmd with one fake GPU), started
    for the session and stopped after it; yields the directory with its config, state and daemon logs."""
    script, state = ROOT / "tests" / "slurm" / "cluster.sh", tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"the test Slurm did not start (logs in {state}):\n{started.stderr}"
        yield state
    finally:
        subprocess.run(["bash", str(script), "stop", str(state)], timeout=60)


@pytest.fixture
def tiny_repo(tmp_path, tiny_model_dir):
    """A fresh pipeline repository on the tiny model."""
    return make_repo(tmp_path / "repo", tiny_params(tiny_model_dir))


def write_params(directory: Path, params: dict) -> Path:
    """params.yaml plus the schema beside it (workflow/schemas/), as the stages expect; returns its path."""
    schema = directory / "workflow" / "schemas" / "params.schema.yaml"
    schema.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "workflow" / "schemas" / "params.schema.yaml", schema)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir):
    """An empty working directory (the cwd) with the tiny model materialised at models/base."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    shutil.copytree(ROOT / "data" / "seeds", tmp_path / "data" / "seeds")
    return tmp_path




def stage_command(stage: str) -> list[str]:
    """The command line words of a stage: an alignment method runs as `alignflow align <method>`."""
    return ["align", stage] if stage in ALIGN_METHODS else [stage]


def alignflow(stage: str, cwd: Path, params: str = "params.yaml", extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `alignflow --params PARAMS STAGE [EXTRA...]` in `cwd` (a method name: `alignflow align METHOD`);
    returns the finished process (not checked)."""
    return sh(["alignflow", "--params", params, *stage_command(stage), *(extra or [])], cwd, check=False)


@contextlib.contextmanager
def openai_server(reply: Callable[[dict], str | tuple[int, str]], seen_keys: list[str] | None = None) -> Iterator[str]:
    """A minimal OpenAI-compatible chat server on 127.0.0.1 (a vLLM / Ollama stand-in), one thread per request,
    answering each request body with `reply(body)`: the reply text, or (HTTP status, error message) to fail
    the request (with a 10 ms retry-after). Yields its base URL. Authorization headers go to `seen_keys`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if seen_keys is not None:
                seen_keys.append(self.headers.get("Authorization", ""))
            answer = reply(body)
            status, text = answer if isinstance(answer, tuple) else (200, answer)
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]} if status == 200
                              else {"error": {"message": text, "type": "server_error"}}).encode()
            self.send_response(status)
            self.send_header("retry-after-ms", "10")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
