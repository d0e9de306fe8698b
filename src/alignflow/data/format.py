"""Stage `format`: render kept instructions for training and split them into train / eval.

    alignflow format                # reads params.yaml: seed, format, paths

Reads:  `paths.filtered`, and `paths.demonstrations` when `format.demonstrations` (written examples in git: refusals
        of harmful requests and full answers to alarming-but-benign ones, the chapter's balance for SFT data; the
        same fields as a machine instruction, plus category and lang), and the tokenizer (with its chat template) in
        `paths.base_model`.
Writes: `paths.train`, `paths.eval` and `<paths.metrics>/format.json`. Each record has
        id, split, instruction, input, output,
        prompt / completion / text   the Alpaca template (with-input or no-input variant, text exactly
                                     as in Stanford Alpaca's train.py); text = prompt + completion,
        messages / chat_text         the example as chat messages, and rendered by the model's chat template.
The split is a seeded hash of the instruction: the same instruction lands on the same side in every
rerun, whatever else changed in the data.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from alignflow.core import contracts
from alignflow.core.io import InputError, atomic_path, dump_json, dump_jsonl, read_jsonl
from alignflow.core.models import Source, load_tokenizer
from alignflow.core.params import Params
from alignflow.data.records import RECORD_FIELDS

log = logging.getLogger(__name__)

# From tatsu-lab/stanford_alpaca, train.py (PROMPT_DICT), verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input_text: str) -> str:
    if input_text:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def chat_messages(instruction: str, input_text: str, output: str, system_prompt: str | None) -> list[dict[str, str]]:
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def split_of(instruction: str, seed: int, eval_fraction: float) -> str:
    """'eval' for a seeded-hash share of `eval_fraction` of all instructions, else 'train'."""
    digest = hashlib.sha256(f"{seed}\x00{instruction}".encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def run(params: Params) -> str | None:
    paths, fmt = params.paths, params.format
    tokenizer = load_tokenizer(Source(paths.base_model))
    if tokenizer.chat_template is None:
        raise InputError(f"{paths.base_model}: the tokenizer has no chat template")
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    records = [record for _, record in read_jsonl(paths.filtered, RECORD_FIELDS)]
    demonstrations = [record for _, record in read_jsonl(paths.demonstrations, RECORD_FIELDS)] if fmt.demonstrations else []
    seen = {r["id"] for r in records}
    for line, record in enumerate(demonstrations, 1):
        if record["id"] in seen:
            raise InputError(f"{paths.demonstrations}:{line}: field 'id': {record['id']!r} is also an instruction's id in {paths.filtered}")
    for record in records + demonstrations:
        instruction, input_text, output = record["instruction"].strip(), record["input"].strip(), record["output"].strip()
        split = split_of(instruction, params.seed, fmt.eval_fraction)
        prompt = alpaca_prompt(instruction, input_text)
        messages = chat_messages(instruction, input_text, output, fmt.system_prompt)
        splits[split].append({
            "id": record["id"], "split": split, "instruction": instruction, "input": input_text, "output": output,
            "prompt": prompt, "completion": output, "text": prompt + output,
            "messages": messages, "chat_text": tokenizer.apply_chat_template(messages, tokenize=False),
        })
    for name, records in splits.items():
        if not records:
            raise InputError(f"{paths.filtered}: the {name} split is empty; generate more or change format.eval_fraction")
    contracts.validate("formatted", splits["train"] + splits["eval"], paths.train)
    metrics = {name: {"examples": len(r), "with_input": sum(bool(x["input"]) for x in r)} for name, r in splits.items()}
    metrics["demonstrations"] = len(demonstrations)
    with (atomic_path(paths.train) as tmp_train, atomic_path(paths.eval) as tmp_eval,
          atomic_path(Path(paths.metrics) / "format.json") as tmp_metrics):
        dump_jsonl(splits["train"], tmp_train)
        dump_jsonl(splits["eval"], tmp_eval)
        dump_json(metrics, tmp_metrics)
    return f"wrote {paths.train} and {paths.eval}: {metrics}"
