"""Stage `samples`: K sampled responses per held-out prompt, from the SFT model, for the judges to rank.

    alignflow samples                  # reads params.yaml: seed, samples, paths
    dvc exp run -S samples.num_responses=6

Reads:  the prompts: `paths.prompts` (samples.prompts: file; JSONL of {"id", "prompt" or "messages",
        "harmful", "lang"}) or the eval split of the instructions `paths.eval` (samples.prompts: eval; its
        chat messages without the answer); the SFT model `paths.sft_model` (on `paths.base_model`).
Writes: `paths.samples`: one record per prompt {"prompt_id", "source_id", "prompt": [messages], "harmful",
        "responses": [{"id", "text"} or {"id", "text", "opener"}], "generator"}; identical responses are kept once.
        `<paths.metrics>/samples.json`.

Sampling is batched (every prompt repeated K times, `batch_size` sequences at a time) and seeded, so the
same params give the same file byte for byte. `samples.refusal_openers` (by the prompt's language) adds one more
response per prompt: the SFT model's own continuation of a refusal's opening words (the response keeps the opener
in its `opener` field). A small SFT model refuses few of its samples of harmful prompts and almost none of the
alarming-but-benign ones, so most prompts have no refusal to rank against an answer; with the opener every prompt
has one, and the judge decides which side it falls on (RLCD, Yang et al. 2023, steers the two sides of a pair by
prompting; a prefilled opening steers a small model more surely than an instruction does). Kept apart from judging so that a change of judge does not
resample, and so that people can rank exactly these responses (data/annotations/).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

from alignflow.core import contracts
from alignflow.core.io import InputError, atomic_path, check_fields, dump_json, dump_jsonl, read_jsonl
from alignflow.core.pairs import prompt_id
from alignflow.core.params import Params

log = logging.getLogger(__name__)


def read_prompt_file(path: str) -> list[dict[str, Any]]:
    """{"id", "prompt": str | "messages": [...], "harmful": bool (optional), "lang" (optional)} per line."""
    prompts, seen = [], {}
    for line, record in read_jsonl(path, {"id": str}):
        where = f"{path}:{line}"
        if "messages" in record:
            check_fields(where, record, {"messages": list})
            messages = record["messages"]
            if not messages or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                       and isinstance(m.get("content"), str) for m in messages) or messages[-1]["role"] != "user":
                raise InputError(f"{where}: field 'messages': chat messages ending with a user turn expected")
        else:
            check_fields(where, record, {"prompt": str})
            if not record["prompt"].strip():
                raise InputError(f"{where}: field 'prompt': empty")
            messages = [{"role": "user", "content": record["prompt"]}]
        harmful = record.get("harmful", False)
        if not isinstance(harmful, bool):
            raise InputError(f"{where}: field 'harmful': expected true or false, got {harmful!r}")
        if record["id"] in seen:
            raise InputError(f"{where}: field 'id': {record['id']!r} already used on line {seen[record['id']]}")
        seen[record["id"]] = line
        prompts.append({"source_id": record["id"], "prompt": messages, "harmful": harmful, "lang": record.get("lang", "en")})
    return prompts


def read_eval_split(path: str) -> list[dict[str, Any]]:
    """The eval split of the formatted instructions: the chat messages before the answer."""
    prompts = []
    for line, record in read_jsonl(path, {"id": str, "messages": list}):
        messages = record["messages"]
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise InputError(f"{path}:{line}: field 'messages': must end with an assistant message")
        prompts.append({"source_id": record["id"], "prompt": messages[:-1], "harmful": False, "lang": "en"})
    return prompts


def opener_for(openers: dict[str, str], lang: str, source: str) -> str:
    """The refusal opener in the prompt's language."""
    if lang not in openers:
        raise InputError(f"{source}: a prompt in language {lang!r}, but samples.refusal_openers has only "
                         f"{', '.join(sorted(openers))}: add an opener for {lang!r}")
    return openers[lang]


def response_id(pid: str, text: str) -> str:
    return hashlib.sha256(f"{pid}\x00{text}".encode()).hexdigest()[:12]


def run(params: Params) -> str | None:
    from alignflow.core.generation import local_generator

    cfg, paths = params.samples, params.paths
    source = paths.prompts if cfg.prompts == "file" else paths.eval
    prompts = read_prompt_file(source) if cfg.prompts == "file" else read_eval_split(source)
    if cfg.max_prompts is not None and len(prompts) > cfg.max_prompts:  # a seeded draw, in file order
        keep = set(random.Random(params.seed).sample(range(len(prompts)), cfg.max_prompts))
        prompts = [p for i, p in enumerate(prompts) if i in keep]
    if not prompts:
        raise InputError(f"{source}: no prompts")

    openers = [opener_for(cfg.refusal_openers, p["lang"], source) for p in prompts] if cfg.refusal_openers else []
    generator = local_generator(cfg.backend, paths.sft_model, temperature=cfg.temperature, top_p=cfg.top_p,
                                batch_size=cfg.batch_size, chat_template=True, seed=params.seed)
    started = time.perf_counter()
    repeated = [p["prompt"] for p in prompts for _ in range(cfg.num_responses)]
    texts = generator.generate(repeated, max_new_tokens=cfg.max_new_tokens, seed=params.seed)
    opened = generator.generate([p["prompt"] + [{"role": "assistant", "content": o}] for p, o in zip(prompts, openers)],
                                max_new_tokens=cfg.max_new_tokens, seed=params.seed + 1) if openers else []
    wall = time.perf_counter() - started

    records, duplicates = [], 0
    for i, p in enumerate(prompts):
        pid = prompt_id(p["prompt"])
        unique = list(dict.fromkeys(t.strip() for t in texts[i * cfg.num_responses : (i + 1) * cfg.num_responses]))
        duplicates += cfg.num_responses - len(unique)
        responses = [{"id": response_id(pid, t), "text": t} for t in unique]
        if openers:  # the opener and what the model wrote after it (its first token carries its own space)
            text = (openers[i] + opened[i]).strip()
            if text in unique:
                duplicates += 1
            else:
                responses.append({"id": response_id(pid, text), "text": text, "opener": openers[i]})
        records.append({"prompt_id": pid, "source_id": p["source_id"], "prompt": p["prompt"], "harmful": p["harmful"],
                        "responses": responses,
                        "generator": {**generator.describe(), "temperature": cfg.temperature, "top_p": cfg.top_p,
                                      "max_new_tokens": cfg.max_new_tokens, "seed": params.seed,
                                      "refusal_opener_seed": params.seed + 1 if openers else None}})
    contracts.validate("samples", records, paths.samples)
    tokens = [len(generator.tokenizer.encode(t, add_special_tokens=False)) for t in texts + opened]
    metrics = {
        "prompts": len(records), "harmful_prompts": sum(r["harmful"] for r in records), "responses": len(texts) + len(opened),
        "responses_after_a_refusal_opener": len(opened),
        "duplicate_responses": duplicates, "empty_responses": sum(not t.strip() for t in texts),
        "mean_response_tokens": sum(tokens) / len(tokens), "source": source,
    }  # no timings here: a data stage's outputs are byte-identical on a rerun
    with atomic_path(paths.samples) as tmp, atomic_path(Path(paths.metrics) / "samples.json") as tmp_metrics:
        dump_jsonl(records, tmp)
        dump_json(metrics, tmp_metrics)
    return (f"wrote {paths.samples}: {len(texts) + len(opened)} responses for {len(records)} prompts from {paths.sft_model} "
            f"({generator.describe()['backend']}, {sum(tokens) / wall:.1f} tokens/s; {duplicates} duplicates dropped)")
