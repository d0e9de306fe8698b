"""What the three alignment stages (ppo, dpo, orpo) share: the pairs as TRL preference datasets, the policy
they start from, their training arguments, and how they time, measure and save a run.

Each stage writes `<paths.aligned>/<method>/`: a plain causal-LM checkpoint (LoRA merged in) with the
tokenizer and `alignflow_model.json`, so `AutoModelForCausalLM.from_pretrained` loads it; and
`<paths.metrics>/<method>.json` with wall time, peak memory and the number of model copies held. While it
trains, it keeps checkpoints under `<paths.checkpoints>/<method>/<run key>/` (alignflow.core.checkpoints), so a
killed run resumes; they are deleted once the stage has finished.
"""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Any

import torch

from alignflow.core.checkpoints import HF_MARKER, Checkpoints, hf_callbacks, open_checkpoints, whole_run_train_loss
from alignflow.core.io import InputError, atomic_path, dump_json
from alignflow.core.launch import is_main_process, per_device_batch, world_size
from alignflow.core.models import Source, load_for_inference, load_tokenizer, pick_device_dtype
from alignflow.core.params import Params


def peft_lora(cfg: Any):
    if cfg.method != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")


def training_args(params: Params, method: str, cfg: Any, device: str, run_dir: Path) -> dict[str, Any]:
    """The TrainingArguments the TRL-based stages share (batch, schedule, seed, device, logging, checkpoints
    every `cfg.save_steps` into `run_dir` for resuming)."""
    return dict(
        output_dir=str(run_dir), num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio, per_device_train_batch_size=per_device_batch(method, cfg.batch_size),
        per_device_eval_batch_size=cfg.batch_size,  # evaluation: the same batches as one process
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, eval_strategy="epoch", logging_steps=1,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        report_to="none", seed=params.seed, data_seed=params.seed, use_cpu=device == "cpu",
        bf16=device == "cuda", dataloader_num_workers=0, activation_checkpointing=False,
    )


class AlignmentRun:
    """One alignment stage's run: device, the starting model, curves, timing and the saved result."""

    def __init__(self, params: Params, method: str, start_from: str):
        self.params, self.method, self.start_from = params, method, start_from
        self.device, self.dtype = pick_device_dtype()
        self.wall = 0.0
        self.checkpoints: Checkpoints | None = None
        torch.manual_seed(params.seed)

    def open_checkpoints(self, *inputs: str, marker: str = HF_MARKER) -> Checkpoints:
        """This run's checkpoints, keyed by the stage's params, the seed, the pairs, the starting model and `inputs`."""
        inputs = [self.params.paths.pairs, self.start_from, *inputs]
        self.checkpoints = open_checkpoints(self.params, self.method, inputs, marker)
        return self.checkpoints

    def load_policy(self):
        """The starting model as a plain causal LM (an SFT LoRA adapter merged in), and its tokenizer."""
        tokenizer = load_tokenizer(Source(self.start_from))
        if tokenizer.chat_template is None:
            raise InputError(f"{self.start_from}: the tokenizer has no chat template; the pairs are rendered with it")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return load_for_inference(self.start_from, dtype=self.dtype).to(self.device), tokenizer

    def callbacks(self) -> list:
        """DVCLive curves (continued from the checkpoint when resuming) and their copy in every checkpoint."""
        return hf_callbacks(Path(self.params.paths.dvclive) / self.method, self.checkpoints.resume)

    @contextlib.contextmanager
    def reference(self, trainer):
        """The frozen reference: the policy with its adapter disabled (LoRA), or the trainer's copy (full)."""
        model = trainer.model
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield trainer.ref_model

    def train(self, trainer):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        resume = self.checkpoints.resume if self.checkpoints else None
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        self.wall = time.perf_counter() - started
        return result._replace(training_loss=whole_run_train_loss(trainer.state))

    def save(self, model, tokenizer, metrics: dict[str, Any]) -> None:
        paths = self.params.paths
        if not is_main_process():
            return  # under accelerate launch rank 0 writes the outputs
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        peak_mb = (torch.cuda.max_memory_allocated() if self.device == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        metrics = {"method": self.method, **metrics, "wall_seconds": self.wall, "peak_memory_mb": peak_mb,
                   "peak_memory_kind": "cuda_allocated" if self.device == "cuda" else "process_max_rss", "device": self.device,
                   "processes": world_size()}
        with (atomic_path(Path(paths.aligned) / self.method) as tmp,
              atomic_path(Path(paths.metrics) / f"{self.method}.json") as tmp_metrics):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            dump_json({"kind": "full", "method": self.method, "start": self.start_from}, tmp / "alignflow_model.json")
            dump_json(metrics, tmp_metrics)
        if self.checkpoints:
            self.checkpoints.finish()
