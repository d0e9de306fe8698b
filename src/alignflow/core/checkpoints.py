"""Resumable training checkpoints, kept outside every DVC output, so that a killed training stage (a preempted,
requeued Slurm job; a Ctrl-C) continues where it stopped instead of starting over.

Reads:  the stage's params section, the seed and the inputs it trains from (to key the run); the newest
        complete `<paths.checkpoints>/<stage>/<run key>/checkpoint-<step>/`.
Writes: PPO's own checkpoints there (`write_checkpoint`: a temporary directory renamed into place, so a kill
        during a save never leaves a half-written newest one; the HF Trainer writes the other stages'); a copy
        of the stage's DVCLive directory inside every checkpoint, put back on resume so the curves continue.
Deletes: the run's checkpoint directory once the stage has finished (`Checkpoints.finish`).

The run key hashes the params section, the seed and each input: a file by its content; a model directory by
the content of its small files (config, tokenizer, alignflow_model.json) and the size and modification time
of its large ones (weights), which is cheap on a multi-GB model and safe: a weights file rewritten by DVC or
by a training stage gets a new mtime, so the worst a touched file causes is a fresh start, never a resume on
other weights. A directory whose alignflow_model.json names a base model (a LoRA SFT adapter, a reward model
trained from the SFT model) pulls that base in too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HF_MARKER = "trainer_state.json"   # the HF Trainer writes it last into a checkpoint
LARGE_FILE = 16 * 2**20            # files above this are fingerprinted by size and mtime, not content
CURVES = "dvclive"                 # a checkpoint's copy of the stage's DVCLive directory


# --- the run key ---


def _fingerprint(path: Path, digest, seen: set[Path]) -> None:
    path = path.resolve()
    if path in seen:
        return
    seen.add(path)
    if path.is_file():
        digest.update(path.read_bytes())
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory (an input of this stage)")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(str(file.relative_to(path)).encode())
        if stat.st_size > LARGE_FILE:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(file.read_bytes())
    info = path / "alignflow_model.json"
    if info.is_file():
        base = json.loads(info.read_text(encoding="utf-8")).get("base")
        if base and Path(base).is_dir():
            _fingerprint(Path(base), digest, seen)


def run_key(section: Any, seed: int, inputs: Iterable[str | Path]) -> str:
    """12 hex digits naming one exact run: the params section (a dataclass), the seed and the inputs."""
    digest = hashlib.sha256(json.dumps([asdict(section), seed], sort_keys=True, default=str).encode())
    seen: set[Path] = set()
    for path in inputs:
        _fingerprint(Path(path), digest, seen)
    return digest.hexdigest()[:12]


# --- finding and writing checkpoints ---


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _complete(path: Path, marker: str) -> bool:
    try:
        if marker.endswith(".json"):
            json.loads((path / marker).read_text(encoding="utf-8"))  # a kill mid-write leaves it unparsable
        return (path / marker).is_file()
    except (OSError, ValueError):
        return False


def newest_checkpoint(run_dir: Path, marker: str = HF_MARKER) -> Path | None:
    """The complete `checkpoint-<step>` with the highest step, if any (`marker` is written last into one)."""
    steps = [(checkpoint_step(p), p) for p in Path(run_dir).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and _complete(p, marker)]
    return max(steps)[1] if steps else None


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """`write(tmp)` fills a temporary directory, which is then renamed to `checkpoint-<step>` (a rename is
    atomic: a SIGKILL leaves either the whole checkpoint or a stray `.tmp-*` that nothing reads). Keeps the
    newest `keep` checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted((checkpoint_step(p), p) for p in run_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- RNG states, for trainers of our own (the HF Trainer saves its own) ---


def rng_states() -> dict[str, Any]:
    """torch (CPU and every CUDA device), Python's `random` and NumPy's global generators, in a form
    `torch.load(weights_only=True)` reads back."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def restore_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- DVCLive curves that continue across a resume ---


def snapshot_curves(live_dir: Path, checkpoint: Path) -> None:
    """Copy the stage's DVCLive directory into a checkpoint: the curves up to its step (copied, then renamed
    into place, so a copy that is there is whole)."""
    if Path(live_dir).is_dir():
        tmp = Path(checkpoint) / f".{CURVES}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(live_dir, tmp)
        shutil.rmtree(Path(checkpoint) / CURVES, ignore_errors=True)
        os.replace(tmp, Path(checkpoint) / CURVES)


def open_live(live_dir: Path, resume: Path | None):
    """A DVCLive `Live` for the stage. Resuming, the curves come back from the checkpoint's copy (DVC deletes
    the stage's outputs, the live directory among them, before it reruns a stage) and continue at the next
    step; fresh, the directory starts empty."""
    from dvclive import Live

    restored = resume is not None and (resume / CURVES).is_dir()
    if restored:
        shutil.rmtree(live_dir, ignore_errors=True)
        shutil.copytree(resume / CURVES, live_dir)
    elif resume is not None:
        log.warning("%s has no copy of the curves; they start over", resume)
    live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=restored)
    if restored and Path(live.metrics_file).is_file():
        live.step = live.read_step() + 1  # dvclive's own resume stays at 0 when only step 0 was logged
    return live


def hf_callbacks(live_dir: Path, resume: Path | None) -> list:
    """For an HF Trainer: HF's DVCLiveCallback on `open_live`, and a callback that copies the curves into
    every checkpoint the Trainer saves. None on ranks other than 0 under accelerate launch: one writer of the curves."""
    from transformers import TrainerCallback
    from transformers.integrations import DVCLiveCallback

    from alignflow.core.launch import is_main_process

    if not is_main_process():
        return []

    class SnapshotCurves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                snapshot_curves(live_dir, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return [DVCLiveCallback(live=open_live(live_dir, resume)), SnapshotCurves()]


def whole_run_train_loss(state) -> float:
    """The mean training loss over every step of the run, also after a resume: the Trainer's own
    `training_loss` covers only the steps of the last `train()` call. From the logged losses, each weighted by
    the steps it covers (every step with logging_steps=1, as the stages set it: then it equals the Trainer's
    value for an uninterrupted run exactly)."""
    total, last = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else float("nan")


# --- one stage's run ---


@dataclass
class Checkpoints:
    """One run's checkpoint directory and the newest complete checkpoint in it (`resume`; None: start fresh)."""

    run_dir: Path
    resume: Path | None

    @property
    def resumed_from_step(self) -> int:
        return checkpoint_step(self.resume) if self.resume else 0

    def finish(self) -> None:
        """The stage finished and wrote its outputs: its checkpoints are no longer needed."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.run_dir.parent.rmdir()  # the stage's directory, when no other run of it keeps checkpoints


def open_checkpoints(params, stage: str, inputs: Iterable[str | Path], marker: str = HF_MARKER) -> Checkpoints:
    """The checkpoints of this run of `stage` (keyed by `params.<stage>`, the seed and `inputs`); logs whether
    it resumes."""
    run_dir = Path(params.paths.checkpoints) / stage / run_key(getattr(params, stage), params.seed, inputs)
    resume = newest_checkpoint(run_dir, marker)
    if resume:
        log.info("resuming from %s", resume)
    else:
        log.info("starting fresh; checkpoints go to %s", run_dir)
    return Checkpoints(run_dir, resume)
