"""dvc.yaml's code deps cover what each stage runs, and editing a module reruns exactly the stages that read it.

A stage runs `alignflow <stage> [arg]`: alignflow.core.cli, which imports the stage's module by name
(cli.STAGES). A stage's code is the import closure, within the alignflow package, of those two modules, read from
their sources with `ast` (never by importing them): every `import` and `from ... import` in a file, the lazy ones
inside functions too; `from alignflow.x import y` imports the module alignflow.x.y when there is one; a module's
packages (their __init__.py) run before it. Each of those files must lie under one of the stage's deps.

Two imports are left out, in the documented allow-list COMMAND_IMPORTS: `alignflow annotate` (a web page for people)
and `alignflow diff` (two revisions' evaluations compared) are commands, not DVC stages, and cli imports their
modules inside main() only for them. (The other such commands, `alignflow import-preferences` and `import-prompts`,
import alignflow.core.pairs and alignflow.core.prompt_sets: core code, which every stage depends on.)
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import dvc.repo
import pytest
import yaml
from dvc.dependency.param import ParamsDependency

from alignflow.core.cli import STAGES
from conftest import ROOT, make_repo, openai_server, self_instruct_reply, sh, tiny_params

PACKAGE = "alignflow"
CLI = "alignflow.core.cli"
PHASES = ("data", "sft", "feedback", "reward", "align", "evaluate")
# (importer, imported): imports that run only for a command that is not a DVC stage. Each must stay lazy (inside a
# function): at module level every stage would run it. They are left out of the stages' closures, and are the only
# imports of a phase module that core may hold besides cli's by-name dispatch (importlib, the STAGES strings).
COMMAND_IMPORTS = {(CLI, "alignflow.feedback.annotate"): "alignflow annotate (a web page for people), not a stage",
                   (CLI, "alignflow.evaluate.diff"): "alignflow diff (two revisions' evaluations compared), not a stage"}


@dataclass(frozen=True)
class Import:
    module: str  # the absolute dotted name of a module of the alignflow package
    lazy: bool   # inside a function: runs only when the function is called


def module_file(src: Path, name: str) -> Path | None:
    """The file of module `name` under the source root `src` (a module or a package's __init__.py), if any."""
    base = src.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def imports(src: Path, name: str) -> list[Import]:
    """Every import of an alignflow module that module `name`'s source holds, at any depth of its syntax tree."""
    path = module_file(src, name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the module's package, one level up per extra dot
                    parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{parent}.{child.module}" if child.module else parent
                else:
                    base = child.module
                found.append(Import(base, lazy))
                found.extend(Import(f"{base}.{alias.name}", lazy) for alias in child.names
                             if module_file(src, f"{base}.{alias.name}"))
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return [i for i in found if in_package(i.module)]


def with_packages(name: str) -> list[str]:
    """alignflow.core.io -> alignflow, alignflow.core, alignflow.core.io: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def closure(src: Path, roots: list[str]) -> set[str]:
    """The modules that importing `roots` can run, COMMAND_IMPORTS left out (while lazy)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        for name in with_packages(todo.pop()):
            if name in seen:
                continue
            assert module_file(src, name), f"{name} is imported but there is no such module under {src}"
            seen.add(name)
            todo.extend(i.module for i in imports(src, name) if not (i.lazy and (name, i.module) in COMMAND_IMPORTS))
    return seen


def stage_module(cmd: str) -> str:
    """The module `alignflow <stage> [arg]` runs."""
    words = shlex.split(cmd)
    assert words[0] == "alignflow" and words[1] in STAGES, f"not an alignflow stage command: {cmd!r}"
    return STAGES[words[1]][0]


def stage_code(root: Path, cmd: str) -> list[str]:
    """The source files, relative to the repository `root`, that the stage command `cmd` runs."""
    src = root / "src"
    return sorted(str(module_file(src, m).relative_to(root)) for m in closure(src, [CLI, stage_module(cmd)]))


def code_deps(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Each resolved stage of the repository's dvc.yaml (foreach expanded): its command and its file deps."""
    with dvc.repo.Repo(str(root)) as repo:
        return {st.name: (st.cmd, [str(d.def_path) for d in st.deps if not isinstance(d, ParamsDependency)])
                for st in repo.index.stages}


def code_gaps(root: Path) -> dict[str, list[str]]:
    """stage -> the files it runs that none of its deps covers; empty when dvc.yaml is complete."""
    gaps = {}
    for name, (cmd, deps) in code_deps(root).items():
        missing = [f for f in stage_code(root, cmd) if not any(Path(f).is_relative_to(d) for d in deps)]
        if missing:
            gaps[name] = missing
    return gaps


def layer(name: str) -> str:
    """core, a phase, or the package itself (alignflow, alignflow.__main__)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in (*PHASES, "core") else PACKAGE


def layer_violations(src: Path) -> list[str]:
    """Imports that cross layers: a phase may import core and itself; core and the package only core."""
    bad = []
    for path in sorted((src / PACKAGE).rglob("*.py")):
        rel = path.relative_to(src).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        allowed = {"core", layer(name)} if layer(name) in PHASES else {"core"}
        for i in imports(src, name):
            if layer(i.module) not in allowed | {PACKAGE} and not (i.lazy and (name, i.module) in COMMAND_IMPORTS):
                bad.append(f"{name} imports {i.module}" + ("" if i.lazy else " (at module level)"))
    return sorted(set(bad))


def test_every_stage_deps_cover_the_code_it_runs():
    stages = code_deps(ROOT)
    assert {stage_module(cmd) for cmd, _ in stages.values()} == {module for module, _ in STAGES.values()}
    assert code_gaps(ROOT) == {}


def test_phases_import_only_core_and_themselves():
    src = ROOT / "src"
    assert layer_violations(src) == []
    # cli's dispatch by name: every STAGES entry is a module of a phase, and the allowed command imports are lazy
    for module, _ in STAGES.values():
        assert module_file(src, module) and layer(module) in PHASES, module
    for importer, imported in COMMAND_IMPORTS:
        assert Import(imported, lazy=True) in imports(src, importer), (importer, imported)


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """The project's pipeline files and sources in a throwaway repository (the project's own params)."""
    return make_repo(tmp_path / "repo", yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))


def drop_dep(repo: Path, stage: str, dep: str) -> None:
    dvc_yaml = repo / "dvc.yaml"
    doc = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    body = doc["stages"][stage].get("do", doc["stages"][stage])
    body["deps"].remove(dep)
    dvc_yaml.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def test_a_missing_code_dep_is_reported(project_copy):
    """The check fails, naming exactly the uncovered files, when dvc.yaml drops a code dep or code imports more."""
    drop_dep(project_copy, "filter", "src/alignflow/data")
    expected = [f for f in stage_code(project_copy, "alignflow filter") if f.startswith("src/alignflow/data/")]
    assert "src/alignflow/data/filter.py" in expected and "src/alignflow/data/records.py" in expected
    assert code_gaps(project_copy) == {"filter": expected}

    drop_dep(project_copy, "align", "src/alignflow/__init__.py")  # from the foreach template: every method
    methods = yaml.safe_load((project_copy / "params.yaml").read_text(encoding="utf-8"))["alignment"]["methods"]
    assert code_gaps(project_copy) == {"filter": expected, **{f"align@{m}": ["src/alignflow/__init__.py"] for m in methods}}


def test_a_lazy_import_of_another_phase_is_reported(project_copy):
    module = project_copy / "src" / "alignflow" / "data" / "filter.py"
    module.write_text(module.read_text(encoding="utf-8") + "\n\ndef _train():\n    from alignflow.sft import sft_trainer\n")
    gaps = code_gaps(project_copy)
    assert set(gaps) == {"filter"}
    assert gaps["filter"] == ["src/alignflow/sft/__init__.py", "src/alignflow/sft/sft_trainer.py"]
    assert layer_violations(project_copy / "src") == ["alignflow.data.filter imports alignflow.sft",
                                                      "alignflow.data.filter imports alignflow.sft.sft_trainer"]


def test_a_command_import_at_module_level_is_reported(project_copy):
    """COMMAND_IMPORTS holds only while lazy: hoisted to cli's module level, every stage would run the annotate page."""
    cli = project_copy / "src" / "alignflow" / "core" / "cli.py"
    text = cli.read_text(encoding="utf-8")
    cli.write_text(text.replace("\nfrom alignflow.core import launch\n",
                                "\nfrom alignflow.core import launch\nfrom alignflow.feedback.annotate import serve\n", 1),
                   encoding="utf-8")
    outside = [name for name, (_, deps) in code_deps(project_copy).items() if "src/alignflow/feedback" not in deps]
    assert code_gaps(project_copy) == {name: ["src/alignflow/feedback/__init__.py", "src/alignflow/feedback/annotate.py"]
                                       for name in outside}
    assert layer_violations(project_copy / "src") == ["alignflow.core.cli imports alignflow.feedback.annotate (at module level)"]


# --- end to end: an edited module makes DVC and Snakemake rerun exactly the stages that depend on it -------------

RAN = ("base_model", "self_instruct", "filter")  # cheap stages, made up to date with `dvc repro`
EDITS = {  # edited file -> the stages of RAN whose deps hold it (checked against dvc.yaml below)
    "src/alignflow/sft/sft.py": set(),  # first: nothing else changed since the run, so both drivers must find no work
    "src/alignflow/data/filter.py": set(RAN),
    "src/alignflow/core/io.py": set(RAN),
}
# Snakemake names one reason per job, and a job downstream of one that will run gets "input files updated by another
# job", which hides its own updated inputs. So each rule is dry-run alone (allowed_rules: only it may run, the files
# its upstream rules made are taken as they are): its reason is then its own, as `dvc status` judges each stage by
# its own deps. One process for all the dry runs (Snakemake's start-up is most of a dry run's time).
DRY_RUNS = """
import sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import DAGSettings, OutputSettings, ResourceSettings
for rule in sys.argv[1:]:
    print(f"@@ {rule}", file=sys.stderr, flush=True)
    with SnakemakeApi(OutputSettings(quiet={"progress", "host"})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=Path("Snakefile"), workdir=Path("."))
        workflow.dag(DAGSettings(targets={rule}, allowed_rules={rule})).execute_workflow(executor="dryrun")
"""


def snakemake_reasons(repo: Path, rules: tuple[str, ...]) -> dict[str, str]:
    """rule -> why a dry run of that rule alone would run it; rules with nothing to do are left out."""
    stderr = sh(["python", "-c", DRY_RUNS, *rules], repo).stderr
    reasons = {}
    for block in stderr.split("@@ ")[1:]:
        rule, _, log = block.partition("\n")
        found = re.findall(rf"^rule {re.escape(rule)}:\n(?:    .*\n)*?    reason: (.*)$", log, re.M)
        assert len(found) <= 1 and (found or "Nothing to be done" in log), log[-3000:]
        if found:
            reasons[rule] = found[0]
    return reasons


def dvc_changed(repo: Path, stages: tuple[str, ...]) -> dict[str, list]:
    return json.loads(sh(["dvc", "status", "--json", *stages], repo).stdout)


@pytest.mark.slow
def test_a_code_edit_reruns_exactly_the_stages_that_depend_on_it(tmp_path, tiny_model_dir):
    with openai_server(self_instruct_reply) as url:  # self_instruct's generator: a stand-in server, answering at once
        params = tiny_params(tiny_model_dir, self_instruct__num_instructions=8)
        params["self_instruct"].update(backend="openai", generator="served-model", api_base=url)
        repo = make_repo(tmp_path / "repo", params)
        sh(["dvc", "repro", *RAN], repo)
    # After the run each output is newer than its inputs, so Snakemake too finds the stages up to date (no --touch
    # needed), by mtimes alone: it has no records of a DVC run, so its params / code triggers cannot fire (untested).
    deps = code_deps(repo)
    for edited, expected in EDITS.items():
        assert expected == {s for s in RAN if any(Path(edited).is_relative_to(d) for d in deps[s][1])}, edited
        folder = str(Path(edited).parent)  # the code dep that holds it
        path = repo / edited
        text, stat = path.read_text(encoding="utf-8"), path.stat()
        path.write_text(text + "# edited\n", encoding="utf-8")
        try:
            assert dvc_changed(repo, RAN) == {s: [{"changed deps": {folder: "modified"}}] for s in expected}, edited
            assert snakemake_reasons(repo, RAN) == {s: f"Updated input files: {edited}" for s in expected}, edited
        finally:  # as it was, content and mtime (Snakemake, without records of a run, compares mtimes only)
            path.write_text(text, encoding="utf-8")
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
