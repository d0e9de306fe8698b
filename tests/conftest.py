"""Shared fixtures: a tiny random model with the bundled SmolLM2 tokenizer, and throwaway pipeline repos.

The tiny model is a 2-layer Llama built from a config (random weights, seeded) plus the real tokenizer
and chat template of the embedded SmolLM2 GGUF, so every stage runs for real in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
import yaml

# One OpenMP thread in every test process and every process it starts (DVC, Snakemake, the stages, Slurm jobs): the
# pytest-xdist workers already keep the cores busy, and a second thread per process only spins. Measured on CI's two
# cores, two test modules side by side: 228 s with the default threads, 160 s with one. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
# The ONNX exports of the generation engine, shared by every test process (the DVC and the Snakemake pipeline train
# byte-identical models, so the second one finds its exports here). Keyed by a hash of the weights: never stale.
os.environ.setdefault("ALIGNFLOW_CACHE", str(ROOT / ".pytest_cache" / "alignflow"))

SHARED_SEEDS = ROOT.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"
VENV_BIN = str(Path(sys.executable).parent)
PROJECT_FILES = ["Snakefile", "dvc.yaml", "params.yaml", "workflow", "src", "requirements", "data/seeds", "data/demonstrations", "data/prompts", "data/annotations", "data/ab_annotations", "data/eval",
                 "slurm", ".dvcignore", ".gitignore"]


def env() -> dict[str, str]:
    """The environment for `alignflow`, `dvc` and `snakemake` subprocesses: the venv first on PATH."""
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "GX_ANALYTICS_ENABLED": "False"}


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


def pytest_collection_modifyitems(items):
    """The longest tests first (a stable sort, so a module's tests keep their order): with `-n` workers the long ones
    start early and the quick ones fill the gaps at the end. `slow(seconds=N)` gives a measured length (default 60)."""
    def length(item) -> float:
        mark = item.get_closest_marker("slow")
        return 0 if mark is None else mark.kwargs.get("seconds", 60)

    items.sort(key=lambda item: -length(item))


def tiny_llama(out: Path, hidden_size: int = 32, heads: int = 2, kv_heads: int = 1, **config) -> Path:
    """A 2-layer Llama with seeded random weights and the embedded SmolLM2 tokenizer, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignflow.core.models import load_tokenizer, resolve_source
    from alignflow.core.params import ModelParams

    tokenizer = load_tokenizer(resolve_source(ModelParams("embedded:smollm2", None, None, False, "auto")))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, **config,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny64_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama 64 wide: bitsandbytes' 4-bit layers on an AVX512-BF16 CPU repack their weights for inference
    in blocks of 64 input features, which a 32-wide model does not fill (QLoRA's tests use this one)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny64-llama"), hidden_size=64, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with large random weights, so that greedy answers differ from prompt to prompt (the default
    initialisation answers every prompt with one repeated token, which any engine would match)."""
    return tiny_llama(tmp_path_factory.mktemp("lively-llama"), hidden_size=64, heads=4, kv_heads=2, initializer_range=0.5)


ALIGN_METHODS = ("ppo", "grpo", "dpo", "ipo", "orpo", "simpo")
TINY_METHODS = ("ppo", "grpo", "dpo", "orpo")


def tiny_params(model_dir: Path, engine: str | None = "transformers", **overrides) -> dict:
    """params.yaml of the project, shrunk for tests: tiny model, few instructions, short generations.

    `engine`: the generation backend of self_instruct, samples and evaluate. The stage tests generate with
    transformers, which needs no export of each new tiny model (ORT GenAI's model builder: seconds per model, and
    the DVC loops train dozens); None keeps params.yaml's default (auto: ONNX Runtime GenAI on a CPU), which the
    end-to-end pipelines run, and tests/test_generation.py checks that engine against transformers token for token."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["model"]["name_or_path"] = str(model_dir)
    if engine is not None:
        for section in ("self_instruct", "samples", "evaluate"):
            params[section]["backend"] = engine
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
    params["evaluate"]["models"] = {"base": params["paths"]["base_model"], "sft": params["paths"]["sft_model"],
                                    **{m: f"{params['paths']['aligned']}/{m}" for m in TINY_METHODS}}
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
    """A real single-node Slurm (tests/slurm/cluster.sh: munged, slurmctld, slurmd with four fake GPUs), started
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
    for folder in ("seeds", "demonstrations"):
        shutil.copytree(ROOT / "data" / folder, tmp_path / "data" / folder)
    return tmp_path




def stage_command(stage: str) -> list[str]:
    """The command line words of a stage: an alignment method runs as `alignflow align <method>`."""
    return ["align", stage] if stage in ALIGN_METHODS else [stage]


def alignflow(stage: str, cwd: Path, params: str = "params.yaml", extra: list[str] | None = None,
              own_process: bool = False) -> subprocess.CompletedProcess:
    """Run `alignflow --params PARAMS STAGE [EXTRA...]` in `cwd` (a method name: `alignflow align METHOD`) and
    return the finished run (not checked): its exit code and what it printed.

    It runs in this process, through `cli.main` (what the `alignflow` console script calls), which saves the ~9 s
    every new process spends importing torch / transformers / TRL. `own_process=True` runs the console script in a
    process of its own, for what only a real process shows (the ranks `accelerate launch` starts print to its
    stderr). The pipeline tests run every stage as DVC and Snakemake do, each in its own process."""
    argv = ["--params", params, *stage_command(stage), *(extra or [])]
    if own_process:
        return sh(["alignflow", *argv], cwd, check=False)
    from alignflow.core import cli

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(before)
        root = logging.getLogger()  # cli.main points the root logger at the stage's log file: close it
        for handler in root.handlers:
            handler.close()
        root.handlers.clear()
    return subprocess.CompletedProcess(["alignflow", *argv], code, out.getvalue(), err.getvalue())


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


# --- inputs the stage tests share: learnable preference pairs, small workdirs, the annotation server ---


WORDS = ("apple river stone cloud green quick table seven music paper light north winter garden silver "
         "window letter bridge orange yellow").split()
MARKER = "banana"


def marker_pairs(n_prompts: int, per_prompt: int, seed: int) -> list[dict]:
    """A learnable preference with nothing in length: chosen answers carry the MARKER word, rejected ones do not,
    both eight words; `per_prompt` pairs for each of `n_prompts` prompts, split train / eval by prompt."""
    from alignflow.core.pairs import assign_splits, make_pair

    rng = random.Random(seed)
    pairs = []
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"Say something about {rng.choice(WORDS)} number {i}."}]
        for _ in range(per_prompt):
            words = rng.choices(WORDS, k=8)
            chosen, rejected = list(words), rng.choices(WORDS, k=8)
            chosen[rng.randrange(8)] = MARKER
            pairs.append(make_pair(prompt, " ".join(chosen), " ".join(rejected), {"kind": "rules"}))
    return assign_splits(pairs, seed, 0.2)


def sft_and_marker_pairs(workdir: Path, model_dir: Path, n_prompts: int, per_prompt: int, seed: int) -> Path:
    """`model_dir` as the SFT model of `workdir`, and marker pairs as its preference pairs; returns `workdir`. The
    samples stage's records mark every other prompt harmful (what the rules judge reads: PPO's rules_weight, GRPO's
    reward: rules)."""
    shutil.copytree(model_dir, workdir / "models" / "sft")
    pairs = workdir / "data" / "preferences" / "pairs.jsonl"
    pairs.parent.mkdir(parents=True)
    rows = marker_pairs(n_prompts, per_prompt, seed=seed)
    pairs.write_text("".join(json.dumps(p) + "\n" for p in rows))
    prompts = list({json.dumps(p["prompt"]): p["prompt"] for p in rows}.values())
    (pairs.parent / "samples.jsonl").write_text("".join(
        json.dumps({"prompt_id": str(i), "prompt": p, "harmful": i % 2 == 0, "responses": []}) + "\n"
        for i, p in enumerate(prompts)))
    return workdir


@pytest.fixture
def aligned_workdir(workdir, tiny_model_dir):
    """The tiny model as the SFT model and as a reward model; marker pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.save_pretrained(workdir / "models" / "reward")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(workdir / "models" / "reward")
    return sft_and_marker_pairs(workdir, tiny_model_dir, 6, 2, seed=5)


@pytest.fixture
def pairs_workdir(workdir, tiny_model_dir):
    """The tiny model as the SFT model; 48 marker pairs over 12 prompts."""
    return sft_and_marker_pairs(workdir, tiny_model_dir, 12, 4, seed=5)


PAIRS = [("What is the capital of France?", "Paris."), ("把这句话翻译成英文：你好。", "Hello."),
         ("Name a primary colour.", "Red."), ("2 + 2 = ?", "4")]


@pytest.fixture
def sft_dir(workdir):
    """workdir with a small, learnable formatted dataset (the same kind of examples in train and eval)."""
    for split, repeat in (("train", 4), ("eval", 1)):
        path = workdir / "data" / "formatted" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": f"{split}{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for i, (q, a) in enumerate(PAIRS * repeat)]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return workdir


@contextlib.contextmanager
def server(cwd: Path, *args: str):
    """`alignflow annotate ARGS --port 0` in cwd; yields (process, URL it printed); SIGKILLs it at the end."""
    proc = subprocess.Popen(["alignflow", "annotate", *args, "--port", "0"], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), proc.stderr.read() if proc.poll() is not None else url
        yield proc, url
    finally:
        kill(proc)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def call(url: str, path: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """One request to the annotation server: (HTTP status, JSON body); a JSON body for a dict, raw bytes as given."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = Request(url.split("?")[0].rstrip("/") + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except HTTPError as err:
        return err.code, json.loads(err.read())


def events(path: Path) -> list[dict]:
    """The records of an annotation log (JSONL); none if it does not exist."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def self_instruct_reply(body: dict, counter=[0]) -> str:  # noqa: B006 (a call counter)
    """A Self-Instruct teacher for `openai_server`: new tasks, "No" to the classification question, an instance."""
    prompt = body["messages"][-1]["content"]
    counter[0] += 1
    n = counter[0]
    if prompt.startswith("Come up with a series of tasks"):
        return f"9. Name {n} animals that live in the sea.\n10. 写一首关于第{n}个秋天的短诗。"
    if prompt.startswith("Can the following task"):
        return "No"
    return f" <noinput>\nOutput: answer {n}"
