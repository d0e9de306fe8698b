"""Snakemake's DAG and DVC's DAG must agree: same stages, commands, inputs, outputs and edges."""

from __future__ import annotations

import json
import re

import dvc.repo
from dvc.dependency.param import ParamsDependency

from conftest import ROOT, sh


def dvc_inputs(stage, stages):
    """A stage's file deps as DVC links them: a directory holding other stages' outputs stands for them."""
    outs = [str(o.def_path) for other in stages if other is not stage for o in other.outs]
    inputs = set()
    for dep in stage.deps:
        if not isinstance(dep, ParamsDependency):
            path = str(dep.def_path)
            inputs.update([o for o in outs if o.startswith(path + "/")] or [path])
    return sorted(inputs)


def dvc_view(repo_dir):
    with dvc.repo.Repo(str(repo_dir)) as repo:
        stages = {}
        all_stages = list(repo.index.stages)
        for st in all_stages:
            outs = sorted(str(o.def_path) for o in st.outs)
            stages[st.name] = {
                "cmd": st.cmd,
                "input": dvc_inputs(st, all_stages),
                "output": [o for o in outs if not o.startswith("logs/")],
                "log": [o for o in outs if o.startswith("logs/")],
            }
        return stages


def snakemake_view(repo_dir):
    rules = json.loads(sh(["python", str(ROOT / "tests" / "snakemake_rules.py")], repo_dir).stdout)
    rules.pop("all")
    return rules


def test_stages_commands_inputs_outputs_agree(tiny_repo):
    assert snakemake_view(tiny_repo) == dvc_view(tiny_repo)


METHODS = ("ppo", "dpo", "orpo")
MODELS = ("base", "sft", *METHODS)


def test_dag_edges_agree(tiny_repo):
    dot = sh(["dvc", "dag", "--dot"], tiny_repo).stdout
    dvc_edges = set(re.findall(r'"([\w@]+)" -> "([\w@]+)"', dot))

    graph = sh(["snakemake", "--rulegraph"], tiny_repo).stdout
    names = dict(re.findall(r'(\d+)\[label = "([\w@]+)"', graph))
    snake_edges = {(names[a], names[b]) for a, b in re.findall(r"(\d+) -> (\d+)", graph)}
    snake_edges = {e for e in snake_edges if "all" not in e}
    assert dvc_edges == snake_edges == {("base_model", "self_instruct"), ("base_model", "format"),
                                        ("self_instruct", "filter"), ("filter", "format"),
                                        ("base_model", "sft"), ("format", "sft"),
                                        ("base_model", "samples"), ("format", "samples"), ("sft", "samples"),
                                        ("base_model", "preferences"), ("samples", "preferences"),
                                        ("base_model", "reward_model"), ("sft", "reward_model"), ("preferences", "reward_model"),
                                        *{(up, f"align@{m}") for up in ("base_model", "sft", "preferences", "reward_model")
                                          for m in METHODS},
                                        *{(up, f"evaluate@{m}") for up in ("format", "sft", "reward_model") for m in MODELS},
                                        ("base_model", "evaluate@base"),
                                        *{(f"align@{m}", f"evaluate@{m}") for m in METHODS},
                                        ("base_model", "compare"), *{(f"evaluate@{m}", "compare") for m in MODELS},
                                        *{(up, "report") for up in ("self_instruct", "filter", "format", "sft", "samples",
                                                                    "preferences", "reward_model", "compare")},
                                        *{(f"align@{m}", "report") for m in METHODS},
                                        *{(f"evaluate@{m}", "report") for m in MODELS}}


def test_a_drifted_snakemake_rule_is_caught(tiny_repo):
    """The comparison itself must fail when one side changes: edit a command behind DVC's back."""
    rules = tiny_repo / "workflow" / "rules" / "pipeline.smk"
    rules.write_text(rules.read_text().replace("cmd=stage.cmd", "cmd=stage.cmd + ' --params other.yaml'"))
    assert snakemake_view(tiny_repo) != dvc_view(tiny_repo)
