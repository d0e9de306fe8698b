"""The whole DAG on the tiny model, through both drivers, in throwaway git + DVC repositories.

- `dvc repro` and `snakemake --profile slurm` on a real single-node Slurm (tests/slurm/cluster.sh, the
  repository's own slurm/ profile with the test overrides of tests/slurm/profile layered on top) give
  byte-identical outputs (so the same params give the same data twice) and the same dvc.lock;
- every stage ran as its own Slurm job, with the GPU, CPUs, memory and time the profile asks for;
- after either, the other driver has nothing to do (`dvc status` clean, `snakemake -n` empty);
- `dvc push` to a remote after the cluster run, `dvc pull` in a fresh clone: the same checkpoints and data;
- changing one stage's param reruns that stage and its dependants only;
- the report's numbers are the metrics' numbers, and the README's experiment commands work as written
  (`dvc exp run -S`, `dvc exp show`, `dvc exp branch`, `dvc metrics diff`, `dvc plots diff`).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import pytest
import yaml

from conftest import ROOT, TINY_METHODS, env, make_repo, sh, tiny_params

pytestmark = pytest.mark.slow(seconds=950)  # one worker runs the whole module (--dist loadfile in pyproject.toml)

OUTPUTS = [
    "data/generated/machine_instructions.jsonl", "data/filtered/instructions.jsonl",
    "data/formatted/train.jsonl", "data/formatted/eval.jsonl",
    "metrics/self_instruct.json", "metrics/filter.json", "metrics/format.json",
    "data/preferences/samples.jsonl", "data/preferences/pairs.jsonl", "data/preferences/judgements.jsonl",
    "metrics/samples.json", "metrics/preferences.json",
]


DATA_STAGES = ("base_model", "self_instruct", "filter", "format", "samples", "preferences")
METHODS = TINY_METHODS  # one of each kind in the table (tiny_params)
TRAINING_STAGES = ("sft", "reward_model", *METHODS)
MODELS = ("base", "sft", *METHODS)


def digests(repo):
    files = [repo / p for p in OUTPUTS] + sorted(f for f in (repo / "models/base").iterdir() if f.name != ".snakemake_timestamp")
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def snakemake_jobs(repo) -> dict[str, int]:
    """Jobs a dry run would execute, from Snakemake's job-stats table."""
    out = sh(["snakemake", "-c", "2", "-n"], repo)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    return {name: int(n) for name, n in re.findall(r"^([\w@]+)\s+(\d+)$", table, re.M) if name not in ("total", "all")}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, tiny_model_dir, slurm_cluster):
    """The same params run once through `dvc repro` and once through `snakemake --profile slurm`, at the same time
    (the Slurm run mostly waits between its status checks). The tests below run in file order: later ones change
    params and rerun."""
    params = tiny_params(tiny_model_dir, engine=None)  # the default engine, as a user gets it
    via_dvc = make_repo(tmp_path_factory.mktemp("via_dvc"), params)
    via_snakemake = make_repo(tmp_path_factory.mktemp("via_snakemake"), params)
    # exactly what a user types, plus the test cluster's overrides; a hung plugin must not hang CI
    cluster = subprocess.Popen(["timeout", "1800", "snakemake", "--profile", "slurm", "--workflow-profile",
                                str(ROOT / "tests/slurm/profile")], cwd=via_snakemake, env=env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        sh(["dvc", "repro"], via_dvc)
    finally:
        log = cluster.communicate()[0]
    assert cluster.returncode == 0, f"snakemake --profile slurm exited {cluster.returncode}:\n{log[-6000:]}"
    return via_dvc, via_snakemake


GPU_RULES = ("self_instruct", "sft", "samples", "reward_model", *(f"align@{m}" for m in METHODS),
             *(f"evaluate@{m}" for m in MODELS))  # generation, training, evaluation


def slurm_jobs(repo) -> dict[str, list[dict[str, str]]]:
    """The test cluster's records of the jobs run from `repo` (kept MinJobAge=7200 s), by rule name."""
    jobs: dict[str, list[dict[str, str]]] = {}
    for line in sh(["scontrol", "show", "job", "--oneliner"], repo).stdout.splitlines():
        record = dict(re.findall(r"(\w+)=(\S*)", line))
        if record.get("WorkDir") == str(repo):
            jobs.setdefault(record["Comment"].removeprefix("rule_"), []).append(record)
    return jobs


def test_slurm_ran_each_stage_as_a_job_with_its_resources(pipelines):
    via_slurm = pipelines[1]
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    stages = yaml.safe_load((via_slurm / "dvc.lock").read_text())["stages"]
    jobs = slurm_jobs(via_slurm)
    assert set(jobs) == set(stages), "every DVC stage is one Slurm job (and `all` none)"
    # the profile gives a GPU to every generation, training and evaluation rule: the default params' models and
    # every method of the table (a user who names one in alignment.methods finds its resources there)
    from alignflow.align.methods import METHODS as TABLE

    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    gpu_rules = {"self_instruct", "sft", "samples", "reward_model", *(f"align@{m}" for m in TABLE),
                 *(f"evaluate@{m}" for m in [*default["evaluate"]["models"], *TABLE])}
    assert {rule for rule, res in profile["set-resources"].items() if res.get("gpu")} == gpu_rules
    assert set(GPU_RULES) <= gpu_rules
    for rule, records in jobs.items():
        assert [r["JobState"] for r in records] == ["COMPLETED"], (rule, records)
        job = records[0]
        wanted = {**profile["default-resources"], **profile["set-resources"].get(rule, {})}
        tres = dict(item.split("=", 1) for item in job["TRES"].split(","))
        assert tres["mem"] == f"{wanted['mem_mb']}M", rule
        assert job["TimeLimit"] == f"{wanted['runtime'] // 60:02d}:{wanted['runtime'] % 60:02d}:00", rule
        assert job["Requeue"] == "1", rule  # preempted jobs come back (and resume from their checkpoints)
        if rule in GPU_RULES:
            assert job.get("TresPerJob") == "gres:gpu:1" and tres["cpu"] == str(wanted["cpus_per_gpu"]), (rule, job)
        else:
            assert "gpu" not in job.get("TresPerJob", "") and tres["cpu"] == str(wanted["cpus_per_task"]), (rule, job)


def test_both_drivers_same_outputs_and_recorded_in_dvc(pipelines):
    via_dvc, via_snakemake = pipelines

    assert digests(via_dvc) == digests(via_snakemake)
    for repo in (via_dvc, via_snakemake):
        assert "up to date" in sh(["dvc", "status"], repo).stdout
        assert snakemake_jobs(repo) == {}
        assert "didn't change, skipping" in sh(["dvc", "repro"], repo).stdout
        for stage in (*DATA_STAGES, *TRAINING_STAGES, *(f"evaluate/{m}" for m in MODELS), "compare", "report"):
            assert (repo / "logs" / f"{stage}.log").stat().st_size > 0
    # the same lock: Snakemake's onsuccess recorded exactly what dvc repro recorded
    def lock(repo):  # the data stages' outs must be recorded identically (logs carry timestamps)
        stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        return {name: [o for o in stages[name]["outs"] if not o["path"].startswith("logs/")] for name in DATA_STAGES}

    assert lock(via_dvc) == lock(via_snakemake)
    filtered = json.loads((via_dvc / "metrics/filter.json").read_text())
    assert filtered["in"] == 24 and filtered["kept"] > 0
    preferences = json.loads((via_dvc / "metrics/preferences.json").read_text())
    assert preferences["train_pairs"] > 0 and preferences["eval_pairs"] > 0
    rm = json.loads((via_dvc / "metrics/reward_model.json").read_text())
    assert {"eval_accuracy", "eval_baseline_longer_accuracy", "eval_baseline_random_accuracy"} <= rm.keys()
    assert (via_dvc / "models/reward/model.safetensors").is_file()
    for method in METHODS:
        aligned = json.loads((via_dvc / f"metrics/{method}.json").read_text())
        assert aligned["wall_seconds"] > 0 and aligned["peak_memory_mb"] > 0 and aligned["model_copies"] >= 1
        assert (via_dvc / f"models/aligned/{method}/model.safetensors").is_file()
        change = aligned["headline"]["change"]  # the report's cost table: before, after and the paired change, with intervals
        assert change["n"] == aligned["headline"]["after"]["n"] and change["low"] <= change["value"] <= change["high"]
    summary = json.loads((via_dvc / "metrics/evaluation.json").read_text())
    assert set(summary["models"]) == set(MODELS) and summary["reference"] == "sft"
    report = (via_dvc / "reports/report.md").read_text()
    for name, m in summary["models"].items():  # every model's row carries the summary's numbers
        reward = m["reward_mean"]
        assert f"| {name} | {reward['value']:.3f} [{reward['low']:.3f}, {reward['high']:.3f}] |" in report
    for stage in ("sft", "reward_model", *(f"align@{m}" for m in METHODS)):
        assert f"stage `{stage}`" in report
    assert "not in dvc.lock yet" not in report  # dvc repro recorded every upstream stage before the report ran
    for method in METHODS:
        change = json.loads((via_dvc / f"metrics/{method}.json").read_text())["headline"]["change"]
        row = next(line for line in report.split("## What training cost")[1].splitlines() if line.startswith(f"| {method} |"))
        assert f"paired change {change['value']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}]" in row


def tree_digests(root) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != ".snakemake_timestamp"}


def test_results_shared_through_a_dvc_remote(pipelines, tmp_path):
    """README "Sharing results": push after a cluster run, pull in a fresh clone, get the same checkpoints."""
    via_slurm = pipelines[1]
    sh(["dvc", "remote", "add", "--default", "shared", str(tmp_path / "remote")], via_slurm)  # S3 / SSH on a real team
    sh(["git", "add", "-A"], via_slurm)
    sh(["git", "commit", "-qm", "cluster run"], via_slurm)
    sh(["dvc", "push"], via_slurm)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(via_slurm), str(clone)], tmp_path)
    assert not (clone / "models" / "sft").exists()  # git has only the .gitignore DVC wrote there
    sh(["dvc", "pull"], clone)
    assert tree_digests(clone / "models") == tree_digests(via_slurm / "models")
    for data in ("data/preferences/pairs.jsonl", "data/formatted/train.jsonl"):
        assert (clone / data).read_bytes() == (via_slurm / data).read_bytes()
    assert "up to date" in sh(["dvc", "status"], clone).stdout


DOWNSTREAM_OF_FORMAT = ("sft", "samples", "preferences", "reward_model", *(f"align@{m}" for m in METHODS),
                        *(f"evaluate@{m}" for m in MODELS), "compare", "report")


def change_param(repo, section, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def test_dpo_beta_reruns_dpo_only(pipelines):
    via_dvc, via_snakemake = pipelines
    before = yaml.safe_load((via_dvc / "params.yaml").read_text())["dpo"]["beta"]
    for repo in pipelines:
        change_param(repo, "dpo", "beta", 0.3)
    ran = set(re.findall(r"Running stage '([\w@]+)'", sh(["dvc", "repro"], via_dvc).stdout))
    assert {"align@dpo", "evaluate@dpo"} <= ran <= {"align@dpo", "evaluate@dpo", "compare", "report"}
    jobs = snakemake_jobs(via_snakemake)
    assert jobs == {"align@dpo": 1, "evaluate@dpo": 1, "compare": 1, "report": 1}, sh(["snakemake", "-c", "2", "-n"], via_snakemake).stdout[-6000:]
    assert json.loads((via_dvc / "metrics/dpo.json").read_text())["beta"] == 0.3
    # Snakemake compares the value with its records of the run, not the file's time: put back, nothing to do
    change_param(via_snakemake, "dpo", "beta", before)
    assert snakemake_jobs(via_snakemake) == {}


def test_experiments_as_the_readme_runs_them(pipelines):
    """README "Experiments": two values of dpo.beta as DVC experiments, compared, one promoted to a branch."""
    repo = pipelines[0]
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline"], repo)
    baseline = sh(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo).stdout.strip()
    baseline_beta = yaml.safe_load((repo / "params.yaml").read_text())["dpo"]["beta"]
    for beta, name in ((0.05, "dpo-beta-low"), (0.5, "dpo-beta-high")):
        out = sh(["dvc", "exp", "run", "-S", f"dpo.beta={beta}", "-n", name], repo).stdout
        # run, or restored from DVC's run cache when these exact deps and params ran before
        touched = {a or b for a, b in re.findall(r"Running stage '([\w@]+)'|Stage '([\w@]+)' is cached", out)}
        assert {"align@dpo", "evaluate@dpo"} <= touched <= {"align@dpo", "evaluate@dpo", "compare", "report"}, out[-3000:]
    shown = sh(["dvc", "exp", "show", "--csv"], repo).stdout
    rows = {line.split(",")[0]: line for line in shown.splitlines()}
    assert "dpo-beta-low" in rows and "dpo-beta-high" in rows, shown[:2000]

    sh(["dvc", "exp", "branch", "dpo-beta-high", "dpo-beta-high"], repo)
    diff = json.loads(sh(["dvc", "metrics", "diff", baseline, "dpo-beta-high", "--json"], repo).stdout)
    assert diff["metrics/dpo.json"]["beta"] == {"old": baseline_beta, "new": 0.5, "diff": pytest.approx(0.5 - baseline_beta)}
    assert any(key.startswith("models.dpo.") for key in diff["metrics/evaluation.json"])  # the evaluation moved too
    assert not any(key.startswith("models.ppo.") for key in diff["metrics/evaluation.json"])  # and only DPO's
    # which differences hold: paired by prompt across the two revisions; PPO did not rerun, so nothing of it moves
    out = sh(["alignflow", "diff", baseline, "dpo-beta-high", "--json", "diff.json"], repo)
    found = json.loads((repo / "diff.json").read_text())
    assert set(found["models"]) == set(MODELS) and all(d["paired"] for d in found["models"].values())
    ppo = found["models"]["ppo"]
    assert ppo["reward"] == {**ppo["reward"], "value": 0.0, "low": 0.0, "high": 0.0, "holds": False}
    assert not any(v.get("holds") for v in ppo.values() if isinstance(v, dict))
    dpo_reward = found["models"]["dpo"]["reward"]
    new_rows, old_rows = ([json.loads(line) for line in sh(["git", "show", f"{rev}:data/evaluation/dpo.jsonl"], repo).stdout.splitlines()]
                          for rev in ("dpo-beta-high", baseline))
    assert dpo_reward["value"] == pytest.approx(sum(a["reward"] - b["reward"] for a, b in zip(new_rows, old_rows)) / len(new_rows))
    assert "| dpo | yes |" in out.stdout and "differences beyond noise" in out.stderr
    html = repo / "plots_diff"
    sh(["dvc", "plots", "diff", baseline, "dpo-beta-high", "-o", str(html)], repo)
    page = (html / "index.html").read_text()
    assert "dvclive/dpo/plots/metrics" in page and "dpo-beta-high" in page and baseline in page


FORMAT_OUTPUTS = [o for o in OUTPUTS if o.startswith(("data/filtered", "data/formatted", "metrics/filter", "metrics/format"))]


def test_param_change_reruns_only_dependants(pipelines):
    """A filter param: DVC reruns filter and what depends on it, nothing upstream; Snakemake's params trigger plans
    exactly that set, and its rerun of filter and format writes the bytes DVC's rerun wrote. (The rest of Snakemake's
    plan is the first test's claim again, the same params giving the same outputs: it is not run a second time.)"""
    via_dvc, via_snakemake = pipelines
    for repo in pipelines:
        change_param(repo, "filter", "rouge_threshold", 0.5)

    ran = set(re.findall(r"Running stage '([\w@]+)'", sh(["dvc", "repro"], via_dvc).stdout))
    # DVC reruns format only if filter's output changed; nothing upstream of filter reruns
    assert "filter" in ran and ran <= {"filter", "format", *DOWNSTREAM_OF_FORMAT}
    assert "up to date" in sh(["dvc", "status"], via_dvc).stdout
    # Snakemake's params trigger works from its own records of the run that made the outputs
    assert snakemake_jobs(via_snakemake) == {"filter": 1, "format": 1, **{s: 1 for s in DOWNSTREAM_OF_FORMAT}}
    sh(["snakemake", "-c", "2", "data/formatted/train.jsonl", "data/formatted/eval.jsonl"], via_snakemake)
    changed = {path: digest for path, digest in digests(via_dvc).items() if path in FORMAT_OUTPUTS}
    assert len(changed) == len(FORMAT_OUTPUTS) and changed == {p: d for p, d in digests(via_snakemake).items() if p in FORMAT_OUTPUTS}
    locked = [yaml.safe_load((repo / "dvc.lock").read_text())["stages"] for repo in pipelines]
    data_outs = [[o for o in lock["format"]["outs"] if not o["path"].startswith("logs/")] for lock in locked]
    assert data_outs[0] == data_outs[1]  # and Snakemake recorded them as DVC did (the logs hold timings: they differ)
