"""Stage `self_instruct`: grow a pool of machine-written tasks from seed tasks (Wang et al., 2023).

    alignflow self_instruct         # reads params.yaml: seed, self_instruct, paths

Reads:  `paths.seeds` (a Self-Instruct seed .jsonl, or a directory of them: `id`, `name`, `instruction`,
        `instances: [{input, output}]`, `is_classification`), and the generator: `paths.base_model`
        by default, another local model, or an OpenAI-compatible server (`self_instruct.backend`).
Writes: `paths.generated` (JSONL: id, instruction, input, output, is_classification, provenance) and
        `<paths.metrics>/self_instruct.json`.

The loop, as in the paper:
1. instructions: each prompt shows `num_prompt_instructions` examples, `num_machine_examples` of them
   from the growing machine pool and the rest from the seeds; the numbered list the generator writes
   back is parsed, and instructions not seen before join the pool, until `num_instructions`;
2. classification: the generator is asked whether each new task has a finite set of output labels;
3. instances: an example input and output for each task, with a seed task of the same kind as a
   demonstration; input first for ordinary tasks, output (the label) first for classification tasks.
Every record keeps its provenance: the round, the ids of the in-context examples, the generator
and its sampling settings. All randomness comes from `params.seed`.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alignflow.core import contracts
from alignflow.core.generation import Generator, OpenAIGenerator, local_generator
from alignflow.core.io import InputError, atomic_path, dump_json, dump_jsonl
from alignflow.core.params import Params, SelfInstructParams
from alignflow.data.records import read_seed_tasks

log = logging.getLogger(__name__)

NO_INPUT = "<noinput>"


# --- prompts and parsers (pure functions: tests/test_self_instruct.py exercises them) ---


def instruction_prompt(examples: list[str]) -> str:
    """The paper's 'Come up with a series of tasks:' list, ending after the last example, so a
    completion model continues the list and a chat model answers with the next numbers."""
    listed = "".join(f"{i}. {text.strip()}\n" for i, text in enumerate(examples, start=1))
    return (
        "Come up with a series of tasks. Write new, diverse tasks that differ from the examples, "
        f"one per line, numbered from {len(examples) + 1}.\n\n{listed}"
    )


_NUMBER = re.compile(r"^\s*\d+\s*[.)、．]\s*")
_INLINE_NUMBER = re.compile(r"\s+(?=\d{1,2}\.\s)")


def parse_instructions(completion: str) -> list[str]:
    """The numbered lines of a completion, without their numbers ('9. 1. Do x' gives 'Do x').
    A completion with no numbered line at all contributes its first non-empty line."""
    lines = [line for line in completion.splitlines() if line.strip()]
    if lines and not any(_NUMBER.match(line) for line in lines):
        return [lines[0].strip()] if len(lines[0].strip()) >= 3 else []
    found = []
    # a model may run several items into one line: '9. Do x. 10. Do y.'
    lines = [part for line in lines for part in _INLINE_NUMBER.split(line)]
    for line in lines:
        if not _NUMBER.match(line):
            continue
        while _NUMBER.match(line):
            line = _NUMBER.sub("", line, count=1)
        if len(line.strip()) >= 3:
            found.append(line.strip())
    return found


def classification_prompt(instruction: str) -> str:
    return (
        "Can the following task be regarded as a classification task with finite output labels? "
        f"Answer Yes or No.\n\nTask: {instruction}\nAnswer:"
    )


def parse_yes_no(completion: str) -> bool:
    head = completion.strip().lower()
    return head.startswith(("yes", "是", "对", "可以"))


def _show_input(text: str) -> str:
    return text.strip() or NO_INPUT


def instance_prompt(instruction: str, demo: dict[str, Any], classification: bool) -> str:
    example = demo["instances"][0]
    if classification:  # output first, so the label does not follow whatever input came to mind
        return (
            "Given the classification task, write a class label and then an input that has that label.\n\n"
            f"Task: {demo['instruction'].strip()}\nClass label: {example['output'].strip()}\n"
            f"Input: {_show_input(example['input'])}\n\n"
            f"Task: {instruction}\nClass label:"
        )
    return (
        f"Write an example for the task: an input (or {NO_INPUT} when the task needs none), then the output.\n\n"
        f"Task: {demo['instruction'].strip()}\nInput: {_show_input(example['input'])}\n"
        f"Output: {example['output'].strip()}\n\n"
        f"Task: {instruction}\nInput:"
    )


def parse_instance(completion: str, classification: bool) -> tuple[str, str]:
    """(input, output) from a completion that continues `Input:` (or `Class label:`)."""
    text = completion.strip()
    marker = "Input:" if classification else "Output:"
    if marker not in text:  # no second part: the whole completion is the output, the input is empty
        return "", _until_next_field(re.sub(r"^\s*(Output:|Class label:)\s*", "", text))
    if classification:
        label, _, rest = text.partition(marker)
        first, second = rest, label  # input, output
    else:
        first, _, second = text.partition(marker)
    first = re.sub(r"^\s*(Input:|Class label:)\s*", "", first.strip())
    cleaned_input = "" if first.strip() in ("", NO_INPUT) else first.strip()
    return cleaned_input, _until_next_field(second)


def _until_next_field(text: str) -> str:
    """Cut where the model starts another field or task ('\nOutput:', '\nInput:', '\nTask:')."""
    return re.split(r"\n\s*(?:Input|Output|Task|Class label):", text, maxsplit=1)[0].strip()


# --- the stage ---


def make_generator(si: SelfInstructParams, base_model: str, seed: int) -> Generator:
    if si.backend == "openai":
        if not si.api_base or not si.generator:
            raise InputError("params.yaml: self_instruct: backend 'openai' needs api_base and generator (the served model name)")
        return OpenAIGenerator(si.generator, api_base=si.api_base, api_key_env=si.api_key_env,
                               temperature=si.temperature, top_p=si.top_p, concurrency=si.batch_size)
    return local_generator(si.backend, si.generator or base_model, temperature=si.temperature, top_p=si.top_p,
                           batch_size=si.batch_size, chat_template=si.chat_template, seed=seed)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def generate_instructions(gen: Generator, seeds: list[dict], si: SelfInstructParams, rng: random.Random, seed: int):
    """Rounds of batched prompts until `num_instructions` new instructions (or `max_rounds`)."""
    seen = {_normalise(t["instruction"]) for t in seeds}
    pool: list[dict[str, Any]] = []
    bar = tqdm(total=si.num_instructions, desc="instructions", unit="inst")
    for round_ in range(si.max_rounds):
        if len(pool) >= si.num_instructions:
            break
        examples_per_prompt = []
        for _ in range(si.batch_size):
            n_machine = min(si.num_machine_examples, len(pool))
            chosen = rng.sample(seeds, si.num_prompt_instructions - n_machine) + rng.sample(pool, n_machine)
            examples_per_prompt.append(chosen)
        prompts = [instruction_prompt([e["instruction"] for e in chosen]) for chosen in examples_per_prompt]
        completions = gen.generate(prompts, max_new_tokens=si.max_new_tokens, seed=seed + round_)
        for chosen, completion in zip(examples_per_prompt, completions):
            for text in parse_instructions(completion):
                key = _normalise(text)
                if key in seen or len(pool) >= si.num_instructions:
                    continue
                seen.add(key)
                pool.append({"instruction": text, "round": round_, "prompt_examples": [e["id"] for e in chosen],
                             "id": f"machine_{len(pool):06d}"})
                bar.update(1)
        log.info("round %d: %d/%d instructions", round_, len(pool), si.num_instructions)
    bar.close()
    return pool


def run(params: Params) -> str | None:
    si, paths = params.self_instruct, params.paths
    seeds = read_seed_tasks(paths.seeds)
    contracts.validate("seed_tasks", seeds, paths.seeds)
    log.info("%d seed tasks from %s", len(seeds), paths.seeds)
    if len(seeds) < si.num_prompt_instructions:
        raise InputError(f"{paths.seeds}: {len(seeds)} seed tasks, fewer than self_instruct.num_prompt_instructions={si.num_prompt_instructions}")
    rng = random.Random(params.seed)
    gen = make_generator(si, paths.base_model, params.seed)

    pool = generate_instructions(gen, seeds, si, rng, params.seed)
    if not pool:
        raise InputError(f"the generator wrote no parsable instructions in {si.max_rounds} rounds; see {paths.logs}/self_instruct.log")

    answers = gen.generate([classification_prompt(p["instruction"]) for p in pool], max_new_tokens=4, seed=params.seed + 10_000)
    by_kind = {kind: [s for s in seeds if s["is_classification"] == kind] or seeds for kind in (True, False)}
    prompts, demos = [], []
    for item, answer in zip(pool, answers):
        item["is_classification"] = parse_yes_no(answer)
        demo = rng.choice(by_kind[item["is_classification"]])
        demos.append(demo["id"])
        prompts.append(instance_prompt(item["instruction"], demo, item["is_classification"]))
    completions = gen.generate(prompts, max_new_tokens=si.instance_max_new_tokens, seed=params.seed + 20_000, stop=["\n\nTask:"])

    generator = {**gen.describe(), "sampling": {"temperature": si.temperature, "top_p": si.top_p,
                 "max_new_tokens": si.max_new_tokens, "instance_max_new_tokens": si.instance_max_new_tokens}}
    records = []
    for item, demo_id, completion in zip(pool, demos, completions):
        input_text, output_text = parse_instance(completion, item["is_classification"])
        records.append({
            "id": item["id"], "instruction": item["instruction"], "input": input_text, "output": output_text,
            "is_classification": item["is_classification"],
            "provenance": {"round": item["round"], "prompt_examples": item["prompt_examples"],
                           "instance_demo": demo_id, "generator": generator, "seed": params.seed},
        })

    contracts.validate("machine_instructions", records, paths.generated)
    metrics = {
        "seed_tasks": len(seeds), "generated": len(records),
        "classification": sum(r["is_classification"] for r in records),
        "empty_output": sum(not r["output"] for r in records),
        "rounds": 1 + max(r["provenance"]["round"] for r in records),
    }
    with atomic_path(paths.generated) as tmp, atomic_path(Path(paths.metrics) / "self_instruct.json") as tmp_metrics:
        dump_jsonl(records, tmp)
        dump_json(metrics, tmp_metrics)
    log.info("metrics: %s", metrics)
    return f"wrote {paths.generated}: {len(records)} instructions ({gen.describe()['backend']})"
