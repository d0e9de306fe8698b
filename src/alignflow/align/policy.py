"""The policy an alignment method trains, and the checkpoint it writes: what every method of the table shares.

Reads:  the model the method starts from (`paths.sft_model`, or `paths.base_model` for ORPO): a plain checkpoint
        or an SFT LoRA adapter, merged into a plain causal LM.
Writes: `<paths.aligned>/<method>/`: a plain causal-LM checkpoint (LoRA merged in) with the tokenizer and
        `alignflow_model.json`, so `AutoModelForCausalLM.from_pretrained` loads it; `<paths.metrics>/<method>.json`
        with the method's held-out numbers, a `headline` (label, before, after, change: intervals) the report shows, and the run's cost.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from alignflow.core.io import atomic_path, dump_json, read_jsonl
from alignflow.core.launch import is_main_process
from alignflow.core.models import load_for_inference
from alignflow.core.pairs import load_preference_splits
from alignflow.core.params import Params
from alignflow.core.stats import mean_interval, paired_difference
from alignflow.core.training import TrainingRun, chat_tokenizer


def start_path(params: Params, start_from: str) -> str:
    return params.paths.sft_model if start_from == "sft" else params.paths.base_model


def load_policy(run: TrainingRun, path: str):
    """The starting model as a plain causal LM on the run's device (an SFT LoRA adapter merged in), and its tokenizer."""
    tokenizer = chat_tokenizer(path)
    return load_for_inference(path, dtype=run.dtype).to(run.device), tokenizer


@contextlib.contextmanager
def reference(trainer):
    """The frozen reference: the policy with its adapter disabled (LoRA), or the trainer's copy (full)."""
    model = trainer.model
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield trainer.ref_model


def headline(label: str, before: list[float], after: list[float], seed: int) -> dict[str, Any]:
    """The number the report shows for a method: its held-out values item by item (eval pairs or prompts) before and
    after training, each mean with its 95% interval, and the paired change (after minus before, item by item)."""
    return {"label": label, "before": mean_interval(before, seed), "after": mean_interval(after, seed),
            "change": paired_difference(after, before, seed)}


def save(params: Params, run: TrainingRun, method: str, start: str, model, tokenizer, metrics: dict[str, Any]) -> None:
    """Write the trained policy (LoRA merged) and the metrics; then the run's checkpoints are deleted."""
    paths = params.paths
    if not is_main_process():
        return  # under accelerate launch rank 0 writes the outputs
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    metrics = {"method": method, **metrics, **run.metrics()}
    with (atomic_path(Path(paths.aligned) / method) as tmp, atomic_path(Path(paths.metrics) / f"{method}.json") as tmp_metrics):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        dump_json({"kind": "full", "method": method, "start": start}, tmp / "alignflow_model.json")
        dump_json(metrics, tmp_metrics)
    run.finish()


def train_and_eval_prompts(pairs_path: str) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """The distinct prompts of the train pairs and of the eval pairs (in first-seen order): what the online methods
    (PPO, GRPO) sample from and measure on."""

    def unique(prompts):
        return list({repr(p): p for p in prompts}.values())

    train, held_out = load_preference_splits(pairs_path)
    return unique(train.prompts), unique(held_out.prompts)


def harmful_flags(samples_path: str) -> dict[str, bool]:
    """The prompt (as JSON text) -> whether it is harmful, from the samples stage's records: what the rules judge's
    refusal check reads (GRPO's `reward: rules`, PPO's `rules_weight`)."""
    return {repr(r["prompt"]): r["harmful"] for _, r in read_jsonl(samples_path, {"prompt": list, "harmful": bool})}
