"""Preemption-safe resume: every training stage, killed with SIGKILL once its first checkpoint is on disk and run
again, continues from that checkpoint and ends with the metrics and the DVCLive curves of an uninterrupted run
with the same seed; its checkpoints are gone afterwards."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import alignflow, env, stage_command, tiny_params, write_params

# Each stage trains long enough (small batches, a checkpoint every 2 steps / iterations) that it is still running
# when its first checkpoint appears, and no longer, as three runs of every stage start up (most of their time);
# the learning rates are large enough that a resume which lost some state (the optimizer's moments, the data
# position, an RNG) ends measurably elsewhere. The sft run crosses an epoch boundary after its resume.
STAGES = {  # stage: (the fixture that sets up its inputs, its params)
    "sft": ("sft_dir", {"epochs": 2, "batch_size": 4, "save_steps": 2, "learning_rate": 3e-2}),  # 16 examples: 8 steps
    "reward_model": ("aligned_workdir", {"epochs": 1, "batch_size": 2, "save_steps": 2, "learning_rate": 3e-3}),
    "dpo": ("aligned_workdir", {"epochs": 1, "batch_size": 2, "save_steps": 2, "learning_rate": 3e-3}),  # 10 pairs: 5
    "orpo": ("aligned_workdir", {"epochs": 1, "batch_size": 2, "save_steps": 2, "learning_rate": 3e-3}),
    "ppo": ("aligned_workdir", {"iterations": 5, "save_every": 2, "learning_rate": 3e-3}),
}
# what training does not determine: time, memory, and where the run resumed
NOT_COMPARED = {"wall_seconds", "peak_memory_mb", "tokens_per_second", "resumed_from_step", "resumed_from_iteration"}
# curves of the HF Trainer's timings; its end-of-training summary train/*, whose loss covers the last train() call
# only (metrics/<stage>.json has the whole run's); TRL's count of training tokens, which restarts from 0 on resume
NOT_COMPARED_CURVES = re.compile(r"^train/|time|per_second|flos|num_tokens")
# On the CPU a resumed run is bitwise equal to the uninterrupted one (measured, every stage); 1e-6 leaves room for
# a BLAS that splits sums differently from run to run, and is still far below what lost state does (>= 1e-3).
TOLERANCE = {"rel": 1e-6, "abs": 1e-9}


def run_until_first_checkpoint_then_kill(stage: str, directory: Path) -> None:
    process = subprocess.Popen(["alignflow", "--params", "params.yaml", *stage_command(stage)], cwd=directory, env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # a checkpoint directory is whole once its last part is there: PPO renames its into place, the HF Trainer
    # writes trainer_state.json after the weights, optimizer and RNG states, and then we add the curves
    last_part = "checkpoint-*" if stage == "ppo" else "checkpoint-*/dvclive"
    deadline = time.time() + 300
    while not list((directory / "checkpoints" / stage).glob(f"*/{last_part}")):
        assert process.poll() is None, f"{stage} ended (exit {process.returncode}) before its first checkpoint"
        assert time.time() < deadline, f"{stage}: no checkpoint after 300 s"
        time.sleep(0.02)
    assert process.poll() is None, f"{stage} finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()


def curves(directory: Path, stage: str) -> dict[str, list[dict[str, str]]]:
    root = directory / "dvclive" / stage / "plots" / "metrics"
    tables = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.tsv"))}
    return {name: list(csv.DictReader(p.open(), delimiter="\t")) for name, p in tables.items()
            if not NOT_COMPARED_CURVES.search(name)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_stage_resumes_and_ends_as_an_uninterrupted_run(stage, request, tmp_path_factory, tiny_model_dir):
    fixture, overrides = STAGES[stage]
    uninterrupted = request.getfixturevalue(fixture)
    params = tiny_params(tiny_model_dir)
    params[stage].update(overrides)
    write_params(uninterrupted, params)
    killed = tmp_path_factory.mktemp(f"killed-{stage}")
    shutil.copytree(uninterrupted, killed, dirs_exist_ok=True)

    result = alignflow(stage, uninterrupted)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting fresh" in (uninterrupted / "logs" / f"{stage}.log").read_text()

    run_until_first_checkpoint_then_kill(stage, killed)
    assert not (killed / "metrics" / f"{stage}.json").exists()  # written with the model, at the very end
    result = alignflow(stage, killed)
    assert result.returncode == 0, result.stderr[-3000:]

    # (a) it resumed, from a checkpoint past step 0
    log = (killed / "logs" / f"{stage}.log").read_text()
    resumed = re.search(rf"resuming from checkpoints/{stage}/\w+/checkpoint-(\d+)", log)
    assert resumed and int(resumed.group(1)) > 0, log[-2000:]
    expected = json.loads((uninterrupted / "metrics" / f"{stage}.json").read_text())
    got = json.loads((killed / "metrics" / f"{stage}.json").read_text())
    resumed_key = "resumed_from_iteration" if stage == "ppo" else "resumed_from_step"
    assert got[resumed_key] == int(resumed.group(1)) and expected[resumed_key] == 0

    # (b) what training determines is what the uninterrupted run got
    assert got.keys() == expected.keys()
    numbers = {k: v for k, v in expected.items() if k not in NOT_COMPARED and isinstance(v, (int, float))}
    assert {k: got[k] for k in numbers} == pytest.approx(numbers, **TOLERANCE)
    assert {k: got[k] for k in expected.keys() - numbers.keys() - NOT_COMPARED} == \
        {k: expected[k] for k in expected.keys() - numbers.keys() - NOT_COMPARED}
    # ... and so are the curves: the resumed run continued them from the checkpoint's copy, step for step
    expected_curves, got_curves = curves(uninterrupted, stage), curves(killed, stage)
    assert expected_curves and got_curves.keys() == expected_curves.keys()
    for name, rows in expected_curves.items():
        assert [r["step"] for r in got_curves[name]] == [r["step"] for r in rows], name
        column = Path(name).stem
        assert [float(r[column]) for r in got_curves[name]] == pytest.approx([float(r[column]) for r in rows], **TOLERANCE), name

    # (c) a finished stage leaves no checkpoints behind
    for directory in (uninterrupted, killed):
        assert not (directory / "checkpoints" / stage).exists()


# --- alignflow.core.checkpoints on its own: the run key, and which checkpoint counts ---


def test_run_key_changes_with_params_seed_data_and_models(tmp_path, tiny_model_dir, monkeypatch):
    from alignflow.core import checkpoints
    from alignflow.core.params import load_params

    params = load_params(write_params(tmp_path, tiny_params(tiny_model_dir)))
    pairs, base, sft = tmp_path / "pairs.jsonl", tmp_path / "base", tmp_path / "sft"
    pairs.write_text('{"prompt": 1}\n')
    shutil.copytree(tiny_model_dir, base)
    sft.mkdir()
    (sft / "adapter_model.safetensors").write_bytes(b"adapter")
    (sft / "alignflow_model.json").write_text(json.dumps({"kind": "peft", "base": str(base)}))  # a LoRA SFT model

    def key(section=params.dpo, seed=params.seed):
        return checkpoints.run_key(section, seed, [pairs, sft])

    first = key()
    assert key() == first and len(first) == 12
    assert key(dataclasses.replace(params.dpo, beta=0.3)) != first
    assert key(seed=params.seed + 1) != first
    pairs.write_text('{"prompt": 2}\n')
    assert key() != first
    pairs.write_text('{"prompt": 1}\n')
    assert key() == first
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # the base under the adapter
    assert key() != first
    monkeypatch.setattr(checkpoints, "LARGE_FILE", 0)  # every file counts as large (weights): by size and mtime
    weights = base / "model.safetensors"
    by_mtime = key()
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert key() != by_mtime


def test_only_a_whole_checkpoint_is_resumed_from(tmp_path):
    from alignflow.core.checkpoints import newest_checkpoint, write_checkpoint

    run = tmp_path / "run"
    for step in (2, 4, 6):
        write_checkpoint(run, step, lambda tmp: (tmp / "trainer_state.json").write_text("{}"), keep=2)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # the newest two kept
    (run / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    (run / "checkpoint-8").mkdir()  # killed before writing it
    assert newest_checkpoint(run) == run / "checkpoint-4"

    def killed_midway(tmp):
        (tmp / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt  # (SIGKILL cannot be caught; what stays on disk is the same)

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(run, 10, killed_midway)
    assert not (run / "checkpoint-10").exists() and newest_checkpoint(run) == run / "checkpoint-4"
