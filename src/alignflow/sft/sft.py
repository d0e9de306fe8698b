"""Stage `sft`: supervised fine-tuning of the base model on the train split, with TRL's SFTTrainer.

    alignflow sft                   # reads params.yaml: seed, sft, paths
    dvc exp run -S sft.method=qlora # one method as an experiment

Reads:  `paths.train`, `paths.eval` (the chat `messages` of each example), `paths.base_model`.
Writes: `paths.sft_model/` - a plain checkpoint (full, or LoRA with `lora_merge`), a peft adapter
        (lora, qlora, prefix) or our bottleneck adapter (adapter), always with the tokenizer and chat
        template and `alignflow_model.json` saying which (load any of them with
        `alignflow.core.models.load_trained`); `<paths.metrics>/sft.json`; training curves under
        `<paths.dvclive>/sft/` (DVCLive, drawn by `dvc plots show`).
Keeps:  trainer checkpoints every `sft.save_steps` under `<paths.checkpoints>/sft/<run key>/` (not a DVC
        output, so a killed run resumes from its last checkpoint; the key changes with params, seed, data and
        base model: alignflow.core.checkpoints), deleted once the stage has finished.

The loss is on the response tokens only: each example is a conversational prompt / completion pair,
which TRL renders with the chat template and masks. Methods (`sft.method`):
  full     every weight; `l2_to_pretrained` > 0 adds alpha * sum((theta - theta_0)^2) to the loss
  lora     peft LoRA on `lora_target_modules`; `lora_merge` saves base + adapter merged
  qlora    the base in 4-bit NF4 with double quantisation (bitsandbytes), LoRA on top
  prefix   peft prefix tuning with `prefix_virtual_tokens`
  adapter  bottleneck adapters after every block's MLP (alignflow.core.adapters), base frozen
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from alignflow.core.io import InputError, atomic_path, dump_json, read_jsonl
from alignflow.core.launch import is_main_process, undo_eval_only_prepare
from alignflow.core.params import Params, SftParams
from alignflow.core.training import TrainingRun, chat_tokenizer, lora_config
from alignflow.core.stats import fmt, paired_difference

log = logging.getLogger(__name__)


# --- setup: data, model, method ---


def load_split(path: str) -> list[dict[str, Any]]:
    """Conversational prompt / completion pairs from a formatted split (the last message is the answer)."""
    rows = []
    for line, record in read_jsonl(path, {"messages": list}):
        messages = record["messages"]
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise InputError(f"{path}:{line}: field 'messages': must end with an assistant message")
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def check_target_modules(model: torch.nn.Module, targets: tuple[str, ...], where: str) -> None:
    """Every LoRA target must name at least one linear layer of the model (peft matches name suffixes)."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    unmatched = [t for t in targets if t not in linear]
    if unmatched:
        raise InputError(f"params.yaml: sft.lora_target_modules: {unmatched} match no layer of {where}; "
                         f"its linear layers are: {', '.join(linear)}")


def build_model(sft: SftParams, base_path: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model to train, with exactly the parameters of the method trainable."""
    from peft import PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if sft.method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=dtype, device_map=device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)

    if sft.method in ("lora", "qlora"):
        check_target_modules(model, sft.lora_target_modules, base_path)
        return get_peft_model(model, lora_config(sft))
    if sft.method == "prefix":
        return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=sft.prefix_virtual_tokens, task_type="CAUSAL_LM"))
    if sft.method == "adapter":
        from alignflow.core.adapters import add_bottleneck_adapters

        return add_bottleneck_adapters(model, sft.adapter_bottleneck, sft.adapter_activation)
    return model  # full


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the parameters they stand for, as peft reports them."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


# --- train ---


def make_trainer(params: Params, run: TrainingRun, model, tokenizer, train_rows, eval_rows):
    from datasets import Dataset
    from trl import SFTConfig

    from alignflow.sft.sft_trainer import AlignflowSFTTrainer

    sft = params.sft
    # padding-free (TRL): a batch is one row of its examples back to back; TRL calls the model without a cache, so
    # transformers reads the examples' boundaries from the restarting position ids and masks across them (also with
    # sdpa on a CPU). TRL leaves truncation to us then (max_length must be None): longer examples are dropped before
    padding_free = padding_free_for(sft)
    length = {"max_length": None} if padding_free else {"max_length": sft.max_length}
    config = SFTConfig(**run.arguments(sft, completion_only_loss=True, padding_free=padding_free, **length))
    return AlignflowSFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(train_rows), eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer, callbacks=run.callbacks(),
        l2_to_pretrained=sft.l2_to_pretrained if sft.method == "full" else 0.0,
        plain_forward=sft.method == "prefix",
    )


def example_losses(trainer) -> list[float]:
    """Each held-out example's loss (mean over its completion tokens), computed as the trainer computes eval_loss
    (its collator, masks and loss), one example per batch: the items of the paired before / after comparison."""
    from torch.utils.data import DataLoader

    loader = DataLoader(trainer.eval_dataset, batch_size=1, collate_fn=trainer.data_collator)
    losses = []
    for batch in loader:
        loss, _, _ = trainer.prediction_step(trainer.model, trainer._prepare_inputs(batch), prediction_loss_only=True)
        losses.append(loss.item())
    return losses


def padding_free_for(sft: SftParams) -> bool:
    """Padding-free batches, unless the method is prefix tuning (its virtual tokens are prepended per row)."""
    return sft.padding_free and sft.method != "prefix"


def drop_too_long(rows: list[dict[str, Any]], tokenizer, max_length: int, split: str) -> list[dict[str, Any]]:
    """The examples whose chat rendering fits in max_length tokens (padding-free batches are not truncated)."""
    kept = [r for r in rows
            if len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)) <= max_length]
    if len(kept) < len(rows):
        log.warning("%s: %d of %d examples are longer than sft.max_length=%d tokens and are left out",
                    split, len(rows) - len(kept), len(rows), max_length)
    return kept


# --- save_checkpoint ---


def sort_target_modules(config_file: Path) -> None:
    """peft keeps `target_modules` as a set and writes it in the set's order, which changes with Python's string
    hashing from one process to the next: sorted, the same adapter is the same bytes (and DVC hash) every run."""
    import json

    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(sft: SftParams, model, tokenizer, out: Path, base_path: str) -> str:
    """Write the trained model so plain transformers / peft code (or our adapter loader) loads it."""
    if sft.method == "adapter":
        from alignflow.core.adapters import save_bottleneck_adapters

        save_bottleneck_adapters(model, out)
        kind = "bottleneck_adapter"
    elif sft.method == "full":
        model.save_pretrained(out, safe_serialization=True)
        kind = "full"
    elif sft.method == "lora" and sft.lora_merge:
        model.merge_and_unload().save_pretrained(out, safe_serialization=True)
        kind = "full"
    else:
        model.save_pretrained(out)  # peft: adapter_config.json + adapter_model.safetensors
        sort_target_modules(out / "adapter_config.json")
        kind = "peft"
    tokenizer.save_pretrained(out)
    dump_json({"kind": kind, "method": sft.method, "base": base_path}, out / "alignflow_model.json")
    return kind


def run(params: Params) -> str | None:
    sft, paths = params.sft, params.paths
    if sft.lora_merge and sft.method != "lora":
        raise InputError(f"params.yaml: sft.lora_merge: only for method 'lora' (method is {sft.method!r})")
    tokenizer = chat_tokenizer(paths.base_model)
    train_rows, eval_rows = load_split(paths.train), load_split(paths.eval)
    examples = len(train_rows), len(eval_rows)
    if padding_free_for(sft):
        train_rows = drop_too_long(train_rows, tokenizer, sft.max_length, paths.train)
        eval_rows = drop_too_long(eval_rows, tokenizer, sft.max_length, paths.eval)
        if not train_rows or not eval_rows:
            raise InputError(f"every example of a split is longer than sft.max_length={sft.max_length} tokens")

    run = TrainingRun(params, "sft", [paths.train, paths.eval, paths.base_model])
    model = build_model(sft, paths.base_model, run.device, run.dtype)
    trainable, total = count_parameters(model)
    log.info("sft %s on %s (%s): %s of %s parameters trainable (%.3f%%), %d train / %d eval examples",
             sft.method, run.device, run.dtype, f"{trainable:,}", f"{total:,}", 100 * trainable / total, len(train_rows), len(eval_rows))

    trainer = make_trainer(params, run, model, tokenizer, train_rows, eval_rows)
    if run.resume:  # the curves from the checkpoint already start with this evaluation: do not log it again
        from transformers.integrations import DVCLiveCallback

        live_callback = trainer.pop_callback(DVCLiveCallback)
        eval_before = trainer.evaluate()["eval_loss"]
        if live_callback:  # only rank 0 has one under accelerate launch
            trainer.add_callback(live_callback)
    else:
        eval_before = trainer.evaluate()["eval_loss"]
    losses_before = example_losses(trainer)
    undo_eval_only_prepare(trainer)  # else, on several processes, train() would not sync their gradients
    train_loss = run.train(trainer)
    evaluation = trainer.evaluate()
    loss_change = paired_difference(example_losses(trainer), losses_before, params.seed)

    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * sft.epochs
    tokens *= 1 - run.checkpoints.resumed_from_step / max(trainer.state.global_step, 1)  # those trained in this call
    metrics = {
        "method": sft.method, "padding_free": padding_free_for(sft), "train_loss": train_loss,
        "examples_too_long": (examples[0] - len(train_rows), examples[1] - len(eval_rows)),
        "eval_loss_before": eval_before, "eval_loss": evaluation["eval_loss"],
        "eval_loss_change": loss_change,  # per held-out example, after minus before, with its paired 95% interval
        "eval_perplexity": math.exp(min(evaluation["eval_loss"], 50)),
        "trainable_parameters": trainable, "total_parameters": total, "trainable_percent": 100 * trainable / total,
        "model_memory_mb": trainer.model.get_memory_footprint() / 2**20,
        "tokens_per_second": tokens / run.wall, "steps": trainer.state.global_step, **run.metrics(),
    }
    if not is_main_process():
        return  # under accelerate launch rank 0 writes the outputs
    with atomic_path(paths.sft_model) as tmp, atomic_path(Path(paths.metrics) / "sft.json") as tmp_metrics:
        kind = save_checkpoint(sft, trainer.model, tokenizer, tmp, paths.base_model)
        dump_json(metrics, tmp_metrics)
    run.finish()
    return (f"wrote {paths.sft_model} ({kind}): held-out loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f} "
            f"(per example {fmt(loss_change)}), "
            f"perplexity {metrics['eval_perplexity']:.2f}, {metrics['tokens_per_second']:.0f} tokens/s")


def accelerate_section() -> str:
    return "sft"  # sft.batch_size is the global batch under accelerate launch
