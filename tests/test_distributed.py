"""Multi-process training (alignflow.core.launch): with distributed.num_processes 2, `alignflow sft`, `dpo`, `reward_model`
and `orpo` re-run themselves under the real `accelerate launch` as two DDP processes (gloo on the CPU) and end where one
process ends: the same optimizer steps over the same examples, so the same losses up to float rounding.

Exact agreement needs what the stages and the data here give: batch_size is the global batch (each process
takes half), the train set is a whole number of global batches (else accelerate pads the last one with
examples from the start), and no dropout (each process draws its own masks)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import yaml

from alignflow.core import launch
from alignflow.core.io import InputError
from conftest import ROOT, alignflow, marker_pairs, tiny_params, write_params

CONFIGS = ROOT / "workflow" / "accelerate"
# fp32 on the CPU; what differs between one and two processes is the order of float reductions (the gloo
# all-reduce of the gradients, the padded length of each micro-batch). Measured: SFT (8 steps) train_loss
# 4e-8 relative, eval_loss equal; DPO (5 steps) train_loss 7e-8, reward margin 9e-6 relative (3e-7
# absolute on 0.033). RTOL / ABS leave a factor of 10 and more for other CPUs and BLAS builds.
RTOL, ABS = 1e-4, 1e-6


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo processes on the CPU, also on a machine with GPUs


def run(stage: str, directory, params: dict, processes) -> tuple[dict, str, str]:
    """`alignflow <stage>` with distributed.num_processes = processes: (metrics, stderr, the stage's log file)."""
    params = copy.deepcopy(params)
    params["distributed"]["num_processes"] = processes
    # fp32: the two-process run splits each batch, and bf16 autocast rounds the halves' sums differently from the
    # whole batch's, beyond the tolerances these equivalence checks hold (measured: the clean-clone CI run failed)
    params["distributed"]["mixed_precision"] = "no"
    write_params(directory, params)
    shutil.copytree(CONFIGS, directory / "workflow" / "accelerate", dirs_exist_ok=True)
    result = alignflow(stage, directory, own_process=processes == 2)  # the ranks print to the real stderr
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((directory / "metrics" / f"{stage}.json").read_text())
    return metrics, result.stderr, (directory / "logs" / f"{stage}.log").read_text()


def assert_two_processes(metrics: dict, stderr: str, log: str, stage: str) -> None:
    assert metrics["processes"] == 2
    assert "[rank 1/2]" in stderr  # rank 1 ran the stage (and logged to stderr) ...
    assert "[rank 0/2]" in log and "[rank 1/2]" not in log  # ... but only rank 0 writes the log file
    assert f"{stage} on 2 processes (ddp, CPU, gloo)" in log  # the launching process's line, kept


@pytest.mark.slow
def test_sft_on_two_processes_matches_one(sft_dir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    # 16 train examples = 4 global batches of 4 (2 per process), 2 epochs = 8 optimizer steps
    params["sft"].update(method="lora", epochs=2, batch_size=4, learning_rate=3e-2, lora_dropout=0.0, save_steps=4)
    one, _, _ = run("sft", sft_dir, params, "auto")  # auto: no CUDA here, so one process
    assert one["processes"] == 1
    two, stderr, log = run("sft", sft_dir, params, 2)
    assert_two_processes(two, stderr, log, "sft")
    assert two["steps"] == one["steps"] == 8
    assert two["eval_loss"] < two["eval_loss_before"] - 0.02  # it learned something, so the comparison means something
    for key in ("eval_loss_before", "train_loss", "eval_loss"):
        assert two[key] == pytest.approx(one[key], rel=RTOL), (key, one[key], two[key])
    assert (sft_dir / "models" / "sft" / "adapter_model.safetensors").is_file()
    assert not list(sft_dir.glob("models/.sft.*"))  # no temporary directory left by either rank


@pytest.fixture
def dpo_dir(workdir, tiny_model_dir):
    """The tiny model as the SFT model; marker pairs, the train split cut to a whole number of global batches."""
    shutil.copytree(tiny_model_dir, workdir / "models" / "sft")
    pairs = marker_pairs(12, 4, seed=5)
    train = [p for p in pairs if p["split"] == "train"]
    keep = train[: len(train) // 8 * 8] + [p for p in pairs if p["split"] == "eval"]
    path = workdir / "data" / "preferences" / "pairs.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in keep))
    return workdir


@pytest.mark.slow(seconds=80)
def test_dpo_on_two_processes_matches_one(dpo_dir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    # plain DPO (sft_weight 0): TRL's NLL term is a token mean per process, so two processes average two half-batch
    # means, not the batch's (1.5e-3 apart on eval_reward_margin here); DPO's own loss is a mean over pairs and splits exactly
    params["dpo"].update(method="lora", epochs=1, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, sft_weight=0.0)
    one, _, _ = run("dpo", dpo_dir, params, 1)
    two, stderr, log = run("dpo", dpo_dir, params, 2)
    assert_two_processes(two, stderr, log, "dpo")
    assert two["train_pairs"] % 8 == 0 and two["train_pairs"] >= 16
    assert two["eval_reward_margin"] != two["eval_reward_margin_before"]  # training moved the policy
    for key in ("train_loss", "eval_loss", "eval_reward_margin", "eval_chosen_reward", "eval_rejected_reward"):
        assert two[key] == pytest.approx(one[key], rel=RTOL, abs=ABS), (key, one[key], two[key])
    assert two["eval_reward_accuracy"] == one["eval_reward_accuracy"]


TIMING = {"wall_seconds", "peak_memory_mb", "processes"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward_model", "orpo"])
def test_reward_model_and_orpo_on_two_processes_match_one(stage, dpo_dir, tiny_model_dir):
    """The other two stages that relaunch themselves: every number in their metrics but time and memory agrees."""
    params = tiny_params(tiny_model_dir)
    params[stage].update(method="lora", epochs=1, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, lora_dropout=0.0)
    one, _, _ = run(stage, dpo_dir, params, 1)
    two, stderr, log = run(stage, dpo_dir, params, 2)
    assert_two_processes(two, stderr, log, stage)
    assert two["train_pairs"] % 8 == 0 and two["train_pairs"] >= 16
    compared = [k for k, v in one.items() if k not in TIMING and isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert "train_loss" in compared and len(compared) >= 6
    # training moved the model (so agreeing means something): the reward model's loss fell below log 2, ORPO's held-out loss
    assert two["train_loss"] < 0.69 if stage == "reward_model" else two["eval_loss"] < two["eval_loss_before"] - 0.01
    for key in compared:
        # ORPO's log odds ratio is the difference of two log odds of about -10 each: their float rounding (1e-7
        # relative) shows as ~2e-6 absolute on a ratio of 4e-4 (measured: -4.084e-4 vs -4.103e-4)
        tolerance = 2e-5 if "log_odds_ratio" in key else ABS
        assert two[key] == pytest.approx(one[key], rel=RTOL, abs=tolerance), (key, one[key], two[key])


@pytest.mark.parametrize("distributed,expected", [
    ({"num_processes": 3}, "sft.batch_size: 4 does not divide among 3 processes (distributed.num_processes)"),
    ({"num_processes": 2, "accelerate_config": "zero2"}, "distributed.accelerate_config: zero2 needs CUDA GPUs"),
])
def test_bad_distributed_settings_stop_before_launching(distributed, expected, sft_dir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["distributed"].update(distributed)
    write_params(sft_dir, params)
    shutil.copytree(CONFIGS, sft_dir / "workflow" / "accelerate")
    result = alignflow("sft", sft_dir)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "accelerate" not in result.stderr.split(expected)[0].split("\n")[-1]
    assert not (sft_dir / "models" / "sft").exists()


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_shipped_accelerate_configs_are_valid(name):
    """Each file loads as accelerate's own config class (unknown keys are an error there), its DeepSpeed / FSDP
    keys are options of `accelerate launch`, and its header gives the command that uses it."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    options = vars(launch_command_parser().parse_args(["train.py"]))
    for key in [*config.deepspeed_config, *config.fsdp_config]:
        assert key in options, key
    assert "num_processes" not in yaml.safe_load(path.read_text())  # it comes from the command line
    assert f"accelerate launch --config_file workflow/accelerate/{name}.yaml --num_processes" in path.read_text()
    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}[name]
    assert config.distributed_type.value == expected
    assert config.deepspeed_config.get("zero_stage") == {"zero2": 2, "zero3": 3}.get(name)


@pytest.mark.parametrize("setting,gpus,expected", [
    ("auto", 0, 1), ("auto", 4, 4), (2, 0, 2), (2, 4, 2), (8, 4, "sees 4 CUDA GPU(s)"),
])
def test_num_processes_auto_is_the_visible_gpus(setting, gpus, expected, monkeypatch):
    monkeypatch.setattr(launch, "cuda_devices", lambda: gpus)  # what CUDA_VISIBLE_DEVICES (Slurm) lets the job see
    distributed = SimpleNamespace(accelerate_config="ddp", num_processes=setting)
    if isinstance(expected, str):
        with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            launch.resolve_processes(distributed)
    else:
        assert launch.resolve_processes(distributed) == expected


def test_ppo_stays_one_process_and_says_so(monkeypatch, caplog):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    params = SimpleNamespace(distributed=SimpleNamespace(accelerate_config="ddp", num_processes=2))
    from alignflow.align.align import accelerate_section

    with caplog.at_level(logging.WARNING):
        assert launch.relaunch("params.yaml", ["align", "ppo"], accelerate_section("ppo"), params) is None
    assert "align ppo runs as one process" in caplog.text


def test_the_global_batch_is_split_across_the_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch.per_device_batch("dpo", 8) == 2
    with pytest.raises(InputError, match=r"dpo.batch_size: 6 does not divide among 4 processes"):
        launch.per_device_batch("dpo", 6)
