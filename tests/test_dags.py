"""Snakemake's DAG and DVC's DAG must agree: same stages, commands, inputs, outputs and edges.

The Snakemake rules are built from DVC's index (workflow/rules/pipeline.smk), so comparing the two with each other
could never fail. Both are compared with expectations made without them: the edges written out below, and each
rule's command, inputs, outputs and logs derived from dvc.yaml read as plain YAML (${...} and foreach resolved here)
and from the files git tracks. The last tests change one side and check that the comparison fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from conftest import ROOT, TINY_METHODS, sh

METHODS = TINY_METHODS  # tiny_repo's alignment.methods
MODELS = ("base", "sft", *METHODS)
# Data edges only: a code dep (src/alignflow/..., the schema, the pinned versions, workflow/accelerate) is no stage's
# output, so it never makes an edge.
EDGES = {("base_model", "self_instruct"), ("base_model", "format"),
         ("self_instruct", "filter"), ("filter", "format"),
         ("base_model", "sft"), ("format", "sft"),
         ("base_model", "samples"), ("format", "samples"), ("sft", "samples"),
         ("base_model", "preferences"), ("samples", "preferences"),
         ("base_model", "reward_model"), ("sft", "reward_model"), ("preferences", "reward_model"),
         *{(up, f"align@{m}") for up in ("base_model", "sft", "samples", "preferences", "reward_model") for m in METHODS},
         *{(up, f"evaluate@{m}") for up in ("format", "sft", "reward_model") for m in MODELS},
         ("base_model", "evaluate@base"),
         *{(f"align@{m}", f"evaluate@{m}") for m in METHODS},
         ("base_model", "compare"), *{(f"evaluate@{m}", "compare") for m in MODELS},
         *{(up, "report") for up in ("self_instruct", "filter", "format", "sft", "samples", "preferences",
                                     "reward_model", "compare")},
         *{(f"align@{m}", "report") for m in METHODS},
         *{(f"evaluate@{m}", "report") for m in MODELS}}


def interpolate(text: str, scope: dict) -> str:
    def value(match: re.Match) -> str:
        found = scope
        for key in match.group(1).split("."):
            found = found[key]
        return str(found)
    return re.sub(r"\$\{([\w.]+)\}", value, text)


def declared_stages(repo: Path) -> dict[str, dict]:
    """dvc.yaml read as YAML: name -> cmd, deps, outs (outs, metrics and plots paths), with params.yaml's values."""
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    stages = {}
    for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"].items():
        if "foreach" in stage:
            items = params
            for key in stage["foreach"].strip("${}").split("."):
                items = items[key]
            pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
            instances = {f"{name}@{key}": (stage["do"], {**params, "key": key, "item": item}) for key, item in pairs}
        else:
            instances = {name: (stage, params)}
        for full_name, (body, scope) in instances.items():
            outs = [next(iter(o)) if isinstance(o, dict) else o
                    for section in ("outs", "metrics", "plots") for o in body.get(section, [])]
            stages[full_name] = {"cmd": interpolate(body["cmd"], scope),
                                 "deps": [interpolate(d, scope) for d in body.get("deps", [])],
                                 "outs": [interpolate(o, scope) for o in outs]}
    return stages


def expected_rules(repo: Path) -> dict[str, dict]:
    """What each Snakemake rule must be. Input: each dep, where a dep is a directory holding other stages' outputs
    those outputs (as for DVC), where it is a folder of the repository (code, seeds, annotations) the files git
    tracks in it, so that Snakemake sees an edited file by its mtime. Output: the outs but the logs; log: the logs."""
    stages = declared_stages(repo)
    logs = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))["paths"]["logs"]
    tracked = sh(["git", "ls-files"], repo).stdout.split()
    rules = {}
    for name, stage in stages.items():
        others = [o for other, s in stages.items() if other != name for o in s["outs"]]
        inputs = []
        for dep in stage["deps"]:
            inside = [o for o in others if Path(o).is_relative_to(dep) and o != dep]
            folder = [f for f in tracked if Path(f).is_relative_to(dep) and f != dep]
            inputs += inside or ([] if dep in others else folder) or [dep]
        rules[name] = {"cmd": stage["cmd"], "input": sorted(set(inputs)),
                       "output": sorted(o for o in stage["outs"] if not Path(o).is_relative_to(logs)),
                       "log": sorted(o for o in stage["outs"] if Path(o).is_relative_to(logs))}
    rules["all"] = {"cmd": None, "input": sorted({o for r in rules.values() for o in r["output"]}), "output": [], "log": []}
    return rules


def snakemake_rules(repo: Path) -> dict[str, dict]:
    return json.loads(sh(["python", str(ROOT / "tests" / "snakemake_rules.py")], repo).stdout)


def rule_mismatches(repo: Path) -> list[str]:
    """Where Snakemake's rules differ from expected_rules: 'stage field: missing [...], extra [...]' (or the values)."""
    expected, actual = expected_rules(repo), snakemake_rules(repo)
    found = [f"{name}: missing rule" for name in expected.keys() - actual.keys()]
    found += [f"{name}: unexpected rule" for name in actual.keys() - expected.keys()]
    for name in sorted(expected.keys() & actual.keys()):
        for field, want in expected[name].items():
            got = actual[name][field]
            if isinstance(want, list) and got != want:
                found.append(f"{name} {field}: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}")
            elif got != want:
                found.append(f"{name} {field}: {got!r}, expected {want!r}")
    return found


def dag_edges(repo: Path) -> dict[str, set[tuple[str, str]]]:
    dot = sh(["dvc", "dag", "--dot"], repo).stdout
    graph = sh(["snakemake", "--rulegraph"], repo).stdout
    names = dict(re.findall(r'(\d+)\[label = "([\w@]+)"', graph))
    snake = {(names[a], names[b]) for a, b in re.findall(r"(\d+) -> (\d+)", graph)}
    return {"dvc": set(re.findall(r'"([\w@]+)" -> "([\w@]+)"', dot)), "snakemake": {e for e in snake if "all" not in e}}


def edge_mismatches(repo: Path) -> dict[str, dict[str, set]]:
    """driver -> the expected edges it lacks and the edges it has that EDGES lacks; empty when both match."""
    return {driver: {"missing": EDGES - edges, "extra": edges - EDGES}
            for driver, edges in dag_edges(repo).items() if edges != EDGES}


def test_stages_commands_inputs_outputs_agree(tiny_repo):
    assert set(expected_rules(tiny_repo)) == {n for e in EDGES for n in e} | {"all"}  # every stage is in the edge list
    assert rule_mismatches(tiny_repo) == []
    rule = snakemake_rules(tiny_repo)["filter"]  # what a folder dep stands for: the files of the folder, caches left out
    assert "data/seeds/seed_tasks.jsonl" in rule["input"] and "src/alignflow/core/io.py" in rule["input"]
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in rule["input"])


def test_dag_edges_agree(tiny_repo):
    assert edge_mismatches(tiny_repo) == {}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_a_drifted_snakemake_rule_is_caught(tiny_repo):
    """The comparison itself must fail when one side changes: edit a command behind DVC's back."""
    edit(tiny_repo / "workflow" / "rules" / "pipeline.smk", "cmd=stage.cmd", "cmd=stage.cmd + ' --params other.yaml'")
    found = rule_mismatches(tiny_repo)
    assert found == sorted(f"{n} cmd: {r['cmd'] + ' --params other.yaml'!r}, expected {r['cmd']!r}"
                           for n, r in expected_rules(tiny_repo).items() if n != "all"), found


def test_a_dropped_dep_is_caught(tiny_repo):
    """A data dep dropped from dvc.yaml changes both drivers alike: the edge list is what catches it. A folder dep
    (seeds, annotations, accelerate configs) Snakemake no longer expands into its files (a directory's mtime misses
    edits) fails the rule comparison."""
    edit(tiny_repo / "dvc.yaml", "      - ${paths.filtered}\n      - ${paths.demonstrations}\n", "      - ${paths.demonstrations}\n")
    edit(tiny_repo / "workflow" / "rules" / "common.smk", "deps.extend(files_in(path) or [path])", "deps.append(path)")
    assert edge_mismatches(tiny_repo) == {driver: {"missing": {("filter", "format")}, "extra": set()}
                                          for driver in ("dvc", "snakemake")}
    found = rule_mismatches(tiny_repo)  # the input of every stage with a folder dep no stage writes: the folder
    folders = "'(data/seeds|data/annotations|data/ab_annotations|workflow/accelerate)'"
    assert all(re.fullmatch(rf"[\w@]+ input: missing \[.+\], extra \[{folders}\]", m) for m in found), found
    trainers = {"sft", "reward_model"} | {n for n in expected_rules(tiny_repo) if n.startswith("align@")}
    assert {m.split()[0] for m in found} == {"self_instruct", "filter", "preferences", "compare"} | trainers, found


def test_a_wrong_edge_is_caught(tiny_repo):
    """A rule that reads another stage's output that dvc.yaml does not declare: an edge only Snakemake has."""
    edit(tiny_repo / "workflow" / "rules" / "pipeline.smk", "input: file_deps(stage, STAGES)",
         "input: file_deps(stage, STAGES) + (['data/formatted/train.jsonl'] if stage.name == 'preferences' else [])")
    assert edge_mismatches(tiny_repo) == {"snakemake": {"missing": set(), "extra": {("format", "preferences")}}}
    assert rule_mismatches(tiny_repo) == ["preferences input: missing [], extra ['data/formatted/train.jsonl']"]
