"""Run a training stage on several processes: `alignflow <stage>` re-executes itself under `accelerate launch`.

params.yaml says how:

    distributed:
      accelerate_config: ddp      # workflow/accelerate/<name>.yaml: ddp | zero2 | zero3 | fsdp
      num_processes: auto         # auto = the CUDA GPUs visible to the job (1 without CUDA) | N

For the stages that train with HF / TRL Trainers (each stage module's `accelerate_section`), `relaunch(...)` resolves the number of
processes; when it is more than one and this process is not already one of a launched group, it runs

    python -m accelerate.commands.launch --config_file workflow/accelerate/ddp.yaml --num_processes N \\
        --num_machines 1 --main_process_port P -m alignflow --params params.yaml sft

and returns its exit status (cli.py returns it). Under Slurm a rule given 4 GPUs sees them in
CUDA_VISIBLE_DEVICES, so `auto` starts 4 processes, one per GPU. Without CUDA the same command starts N CPU
processes that talk over gloo (accelerate's `--cpu` flag is not used: it selects the single-process
launcher); that is how tests/test_distributed.py runs 2 processes on a CPU machine.

Inside a launched process (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE):
- `per_device_batch` splits a stage's batch_size, which stays the global batch: each of N processes takes
  batch_size / N examples per micro-step, so N processes take the same optimizer steps over the same
  examples as one (the Trainer's seeded sampler is shared; accelerate hands rank r batches r, r+N, ...).
  Evaluation keeps batch_size per process: rank r evaluates whole batches r, r+N, ..., so the eval loss
  averages the same batches as one process does. A last, partial global batch is filled up with examples
  from the start (accelerate's even_batches), and dropout draws differ per process: only then do the
  losses of N processes and of one differ by more than float rounding (tests/test_distributed.py).
- `is_main_process()`: only rank 0 writes the stage's outputs (model, metrics, DVCLive curves, the log
  file); the other ranks log to stderr only.
- `world_size()` goes into each stage's metrics as `processes`.

Bad settings (a batch_size that does not divide, a config that needs GPUs or DeepSpeed) stop before
anything starts, with exit code 2; an error inside the launched processes comes back as accelerate's exit
status (1), the ranks' messages above it.

ppo (alignflow.align.ppo, our own loop) stays one process and says so when num_processes is more than 1.
zero3 and fsdp shard the weights across processes; the stages measure and save the trained model in
one process after training, which needs the full weights there, so they are refused until that gathering
(deepspeed.zero.GatheredParameters / accelerator.get_state_dict) is wired into the stages.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from alignflow.core.io import InputError

log = logging.getLogger(__name__)

CONFIG_DIR = Path("workflow/accelerate")
NEEDS_GPUS = {"zero2", "zero3", "fsdp"}
SHARDED = {"zero3", "fsdp"}
LAUNCHED_BY_ALIGNFLOW = "ALIGNFLOW_LAUNCHED"  # set for the launched ranks: the launcher already truncated the log


def launched() -> bool:
    """Whether this process is one of a group started by accelerate launch / torchrun."""
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


def split_batch(section: str, batch_size: int, processes: int) -> int:
    """A stage's global batch_size per process; InputError when it does not divide."""
    if batch_size % processes:
        raise InputError(f"params.yaml: {section}.batch_size: {batch_size} does not divide among {processes} processes "
                         f"(distributed.num_processes); it is the global batch, each process takes batch_size / {processes}")
    return batch_size // processes


def per_device_batch(section: str, batch_size: int) -> int:
    """The per-device train batch of this process: the section's global batch_size / world size."""
    return split_batch(section, batch_size, world_size())


def cuda_devices() -> int:
    """CUDA GPUs this job may use (CUDA_VISIBLE_DEVICES, as Slurm sets it for a rule's GPUs)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_processes(distributed: Any) -> int:
    """distributed.num_processes as a count: auto = the visible CUDA GPUs, at least 1."""
    gpus = cuda_devices()
    if distributed.num_processes == "auto":
        return max(1, gpus)
    n = int(distributed.num_processes)
    if gpus and n > gpus:
        raise InputError(f"params.yaml: distributed.num_processes: {n}, but this job sees {gpus} CUDA GPU(s); "
                         "use auto, or give the rule more GPUs")
    return n


def config_file(params_file: str | Path, name: str) -> Path:
    """workflow/accelerate/<name>.yaml beside params.yaml (the stages run from the repository root)."""
    path = Path(params_file).resolve().parent / CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"params.yaml: distributed.accelerate_config: {name}: {path} not found")
    return path


def check_config(name: str, gpus: int) -> None:
    if name in NEEDS_GPUS and not gpus:
        raise InputError(f"params.yaml: distributed.accelerate_config: {name} needs CUDA GPUs; without them use ddp (gloo)")
    if name in SHARDED:
        raise InputError(f"params.yaml: distributed.accelerate_config: {name} shards the weights across processes, but the "
                         "stages measure and save the trained model in one process after training, which is not wired "
                         "for sharded weights yet; use ddp or zero2")
    if name.startswith("zero"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise InputError(f"params.yaml: distributed.accelerate_config: {name} needs DeepSpeed: pip install deepspeed")


def free_port() -> int:
    """A free TCP port for the rendezvous, so concurrent launches on one machine do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(params_file: str | Path, argv: list[str], config: Path, processes: int, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(port),
            "-m", "alignflow", "--params", str(params_file), *argv]


def relaunch(params_file: str | Path, argv: list[str], section: str | None, params: Any) -> int | None:
    """Run the stage `argv` (e.g. ["align", "dpo"]) under accelerate launch when it should take more than one
    process; its exit status, or None when this process should run the stage itself (one process, already a
    launched rank, or `section` None: a stage that runs as one process, such as our PPO). `section` names the
    params section whose batch_size is split across the processes."""
    if launched():
        init_process()
        return None
    processes = resolve_processes(params.distributed)
    if section is None:
        if processes > 1:
            log.warning("%s runs as one process; distributed.num_processes (%d) is ignored", " ".join(argv), processes)
        return None
    if processes == 1:
        return None
    split_batch(section, getattr(params, section).batch_size, processes)  # fail here, before any process starts
    gpus = cuda_devices()
    name = params.distributed.accelerate_config
    check_config(name, gpus)
    cmd = command(params_file, argv, config_file(params_file, name), processes, free_port())
    log.info("%s on %d processes (%s, %s): %s", " ".join(argv), processes, name,
             f"{gpus} CUDA GPUs" if gpus else "CPU, gloo", " ".join(cmd))
    for handler in logging.getLogger().handlers:
        handler.flush()
    return subprocess.run(cmd, env={**os.environ, LAUNCHED_BY_ALIGNFLOW: "1"}).returncode


def init_process() -> None:
    """In a launched rank with CUDA: make `cuda` mean this rank's GPU (LOCAL_RANK) before any model loads."""
    if not launched():
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def undo_eval_only_prepare(trainer) -> None:
    """Call between a `trainer.evaluate()` and the `trainer.train()` after it (the sft stage measures the
    loss before training). Evaluating first, transformers prepares the model for evaluation only (no
    DistributedDataParallel wrapper) and accelerate marks it prepared, so `train()` then skips the wrapper
    and the processes never average their gradients: each trains on its own half of every batch (seen with
    transformers 5.24 / accelerate 1.15). Unmarking the model lets `train()` wrap it."""
    if trainer.accelerator.num_processes > 1 and trainer.model_wrapped is trainer.model:
        trainer.model._is_accelerate_prepared = False
        trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not trainer.model]
