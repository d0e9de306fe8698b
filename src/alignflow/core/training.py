"""The training core: what every training stage (sft, reward_model, the alignment methods, PPO) does alike, once.

    run = TrainingRun(params, "dpo", inputs=[paths.pairs, paths.sft_model])   # seeds torch, opens the checkpoints
    tokenizer = chat_tokenizer(paths.sft_model)
    trainer = DPOTrainer(..., args=DPOConfig(**run.arguments(params.dpo, beta=0.1)), peft_config=lora_config(params.dpo),
                         callbacks=run.callbacks())
    train_loss = run.train(trainer)                                   # timed, resumed from the newest checkpoint
    metrics = {..., **run.metrics()}                                   # wall time, peak memory, device, processes, resume
    run.finish()                                                       # after the outputs are written: checkpoints go

Reads:  a section's LoRA block (params LoraParams: method, lora_*) and Trainer block (TrainingParams: epochs,
        learning_rate, warmup_ratio, weight_decay, batch_size, gradient_accumulation_steps, max_length, save_steps).
Writes: nothing itself; the Trainer's checkpoints go to `<paths.checkpoints>/<section>/<run key>/`
        (alignflow.core.checkpoints) and the curves to `<paths.dvclive>/<section>/` (DVCLive).
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from alignflow.core.checkpoints import HF_MARKER, hf_callbacks, open_checkpoints, whole_run_train_loss
from alignflow.core.io import InputError
from alignflow.core.launch import per_device_batch, world_size
from alignflow.core.models import Source, load_tokenizer, pick_device_dtype, use_bf16
from alignflow.core.params import LoraParams, Params, TrainingParams


def chat_tokenizer(path: str):
    """The tokenizer of a model a stage trains on chat data: it must have a chat template; pads with EOS if unset."""
    tokenizer = load_tokenizer(Source(path))
    if tokenizer.chat_template is None:
        raise InputError(f"{path}: the tokenizer has no chat template; the training data are rendered with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(cfg: LoraParams, task_type: str = "CAUSAL_LM", **extra: Any):
    """peft's LoraConfig from a section's LoRA block; None when the section's method trains every weight."""
    if cfg.method not in ("lora", "qlora"):
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type=task_type, **extra)


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict[str, Any]:
    """The peak memory so far: CUDA's allocated bytes on a GPU, the process's maximum RSS on a CPU."""
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_memory_mb": peak / 2**20, "peak_memory_kind": "cuda_allocated" if device == "cuda" else "process_max_rss"}


class TrainingRun:
    """One training stage's run of params section `section`: device and dtype, the seed, the checkpoints to resume
    from (keyed by the section, the seed and `inputs`), the DVCLive curves, the timed training and its metrics."""

    def __init__(self, params: Params, section: str, inputs: Iterable[str | Path], marker: str = HF_MARKER,
                 mixed_precision: bool = True):
        """`mixed_precision=False`: this stage trains in full precision whatever distributed.mixed_precision says."""
        self.params, self.section = params, section
        self.device, self.dtype = pick_device_dtype()
        self.bf16 = mixed_precision and use_bf16(params.distributed.mixed_precision, self.device)
        self.wall = 0.0
        torch.manual_seed(params.seed)  # everything random from here on (new weights, LoRA init) follows the seed
        self.checkpoints = open_checkpoints(params, section, inputs, marker)
        self.live_dir = Path(params.paths.dvclive) / section

    @property
    def resume(self) -> Path | None:
        return self.checkpoints.resume

    def arguments(self, cfg: TrainingParams, **extra: Any) -> dict[str, Any]:
        """The TrainingArguments fields every Trainer-based stage shares, from the section's Trainer block: the global
        batch split across processes, evaluation each epoch, a log line per step, checkpoints every `save_steps` into
        this run's checkpoint directory, the seed, the device. `extra` adds the trainer's own (beta, max_length, ...)
        or overrides one of these."""
        arguments = dict(
            output_dir=str(self.checkpoints.run_dir), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
            warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
            per_device_train_batch_size=per_device_batch(self.section, cfg.batch_size),
            per_device_eval_batch_size=cfg.batch_size,  # evaluation: the same batches as one process, so the same eval loss
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, eval_strategy="epoch", logging_steps=1,
            save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, report_to="none",
            seed=self.params.seed, data_seed=self.params.seed, use_cpu=self.device == "cpu", bf16=self.bf16,
            dataloader_num_workers=0,
            activation_checkpointing=False,  # TRL turns it on by default; it drops the past key values prefix tuning feeds
        )
        return {**arguments, **extra}

    def callbacks(self) -> list:
        """DVCLive curves (continued from the checkpoint when resuming) and their copy in every checkpoint."""
        return hf_callbacks(self.live_dir, self.resume)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Time the training (the wall time in the metrics) and measure its peak memory."""
        reset_peak_memory(self.device)
        started = time.perf_counter()
        yield
        self.wall = time.perf_counter() - started

    def train(self, trainer) -> float:
        """trainer.train(), resumed from the newest checkpoint if there is one; the mean training loss of the whole run."""
        with self.timed():
            trainer.train(resume_from_checkpoint=str(self.resume) if self.resume else None)
        return whole_run_train_loss(trainer.state)

    def metrics(self) -> dict[str, Any]:
        """What every training stage reports about its run."""
        return {"wall_seconds": self.wall, **peak_memory(self.device), "device": self.device, "processes": world_size(),
                "precision": "bf16 autocast" if self.bf16 else str(self.dtype).removeprefix("torch."),
                "resumed_from_step": self.checkpoints.resumed_from_step}

    def finish(self) -> None:
        """The stage wrote its outputs: the checkpoints for resuming are not needed any more."""
        self.checkpoints.finish()
