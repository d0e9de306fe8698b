"""dvc.yaml's code deps are exactly what each stage runs, and editing a module reruns exactly the stages that run it.

A stage runs `alignflow <stage> [arg]`: alignflow.core.cli, which imports the stage's module by name
(cli.STAGES). A stage's code is the import closure, within the alignflow package, of those two modules, read from
their sources with `ast` (never by importing them): every `import` and `from ... import` in a file, the lazy ones
inside functions too; `from alignflow.x import y` imports the module alignflow.x.y when there is one; a string
"alignflow.x.y:Name" (a class loaded by importlib, as align/methods.py names our PPO trainer) imports alignflow.x.y;
a module's packages (their __init__.py) run before it; a data file of the package (DATA_FILES) comes with the module
that reads it. The stage's deps under src/alignflow must be exactly those files: one missing is a stale cache, one
extra (or a folder) a needless rerun.

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


# Files of the package that are not Python, each with the module that reads it: a stage that runs the module
# depends on the file too. A new one must be added here (test_every_package_file_is_code_or_known_data).
DATA_FILES = {"src/alignflow/feedback/annotate.html": "alignflow.feedback.annotate"}


@dataclass(frozen=True)
class Import:
    module: str  # the absolute dotted name of a module of the alignflow package
    lazy: bool   # inside a function: runs only when the function is called


MODULE_REF = re.compile(r"(alignflow(?:\.\w+)+)(?::\w+)?")  # a module named in a string: align/methods.py's trainers


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
            elif (isinstance(child, ast.Constant) and isinstance(child.value, str) and name != CLI
                  and (ref := MODULE_REF.fullmatch(child.value)) and module_file(src, ref[1])):
                found.append(Import(ref[1], lazy=True))  # "alignflow.x.y:Name", loaded by importlib when called
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
    """The source files, relative to the repository `root`, that the stage command `cmd` runs (and the data files
    its modules read)."""
    src = root / "src"
    modules = closure(src, [CLI, stage_module(cmd)])
    return sorted([str(module_file(src, m).relative_to(root)) for m in modules]
                  + [f for f, reader in DATA_FILES.items() if reader in modules])


def code_deps(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Each resolved stage of the repository's dvc.yaml (foreach expanded): its command and its file deps."""
    with dvc.repo.Repo(str(root)) as repo:
        return {st.name: (st.cmd, [str(d.def_path) for d in st.deps if not isinstance(d, ParamsDependency)])
                for st in repo.index.stages}


def code_gaps(root: Path) -> dict[str, dict[str, list[str]]]:
    """stage -> the files it runs that are not among its deps ("missing": a stale cache) and its deps under
    src/alignflow that it does not run ("extra": a needless rerun; a folder is one); empty when dvc.yaml is exact."""
    gaps = {}
    for name, (cmd, deps) in code_deps(root).items():
        code = stage_code(root, cmd)
        found = {"missing": [f for f in code if f not in deps],
                 "extra": [d for d in deps if Path(d).is_relative_to(f"src/{PACKAGE}") and d not in code]}
        if found["missing"] or found["extra"]:
            gaps[name] = found
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


def test_every_stage_deps_are_exactly_the_code_it_runs():
    stages = code_deps(ROOT)
    assert {stage_module(cmd) for cmd, _ in stages.values()} == {module for module, _ in STAGES.values()}
    assert code_gaps(ROOT) == {}


def test_every_package_file_is_code_or_known_data():
    """A file of the package that is not Python is read by some module: DATA_FILES must say which, or no stage
    would depend on it."""
    files = {str(f.relative_to(ROOT)) for f in (ROOT / "src" / PACKAGE).rglob("*")
             if f.is_file() and f.suffix not in (".py", ".pyc")}
    assert files == set(DATA_FILES)
    src = ROOT / "src"
    assert all(module_file(src, reader) for reader in DATA_FILES.values())


def test_a_module_named_in_a_string_is_imported():
    """align/methods.py names our PPO trainer as "alignflow.align.ppo.ppo_trainer:PPOTrainer", loaded by importlib."""
    found = imports(ROOT / "src", "alignflow.align.methods")
    assert Import("alignflow.align.ppo.ppo_trainer", lazy=True) in found
    assert Import("alignflow.align.ppo.ppo_config", lazy=True) in found


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


def add_dep(repo: Path, stage: str, dep: str) -> None:
    dvc_yaml = repo / "dvc.yaml"
    doc = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    doc["stages"][stage].get("do", doc["stages"][stage])["deps"].append(dep)
    dvc_yaml.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def test_a_missing_or_extra_code_dep_is_reported(project_copy):
    """The check fails, naming exactly the files, when dvc.yaml drops a module the stage runs, lists one it does not
    run, lists a folder, or the code imports more."""
    drop_dep(project_copy, "filter", "src/alignflow/data/records.py")
    add_dep(project_copy, "filter", "src/alignflow/data/format.py")
    assert code_gaps(project_copy) == {"filter": {"missing": ["src/alignflow/data/records.py"],
                                                  "extra": ["src/alignflow/data/format.py"]}}

    drop_dep(project_copy, "align", "src/alignflow/__init__.py")  # from the foreach template: every method
    add_dep(project_copy, "align", "src/alignflow/align")
    methods = yaml.safe_load((project_copy / "params.yaml").read_text(encoding="utf-8"))["alignment"]["methods"]
    assert code_gaps(project_copy) == {
        "filter": {"missing": ["src/alignflow/data/records.py"], "extra": ["src/alignflow/data/format.py"]},
        **{f"align@{m}": {"missing": ["src/alignflow/__init__.py"], "extra": ["src/alignflow/align"]} for m in methods}}


def test_a_lazy_import_of_another_phase_is_reported(project_copy):
    module = project_copy / "src" / "alignflow" / "data" / "filter.py"
    module.write_text(module.read_text(encoding="utf-8") + "\n\ndef _train():\n    from alignflow.sft import sft_trainer\n")
    gaps = code_gaps(project_copy)
    assert gaps == {"filter": {"missing": ["src/alignflow/sft/__init__.py", "src/alignflow/sft/sft_trainer.py"],
                               "extra": []}}
    assert layer_violations(project_copy / "src") == ["alignflow.data.filter imports alignflow.sft",
                                                      "alignflow.data.filter imports alignflow.sft.sft_trainer"]


def test_a_command_import_at_module_level_is_reported(project_copy):
    """COMMAND_IMPORTS holds only while lazy: hoisted to cli's module level, every stage would run the annotate page."""
    cli = project_copy / "src" / "alignflow" / "core" / "cli.py"
    text = cli.read_text(encoding="utf-8")
    cli.write_text(text.replace("\nfrom alignflow.core import launch\n",
                                "\nfrom alignflow.core import launch\nfrom alignflow.feedback.annotate import serve\n", 1),
                   encoding="utf-8")
    src = project_copy / "src"
    page = {str(module_file(src, m).relative_to(project_copy)) for m in closure(src, ["alignflow.feedback.annotate"])}
    assert {"src/alignflow/feedback/annotate.py", "src/alignflow/core/annotation_log.py"} <= page
    page.add("src/alignflow/feedback/annotate.html")
    assert code_gaps(project_copy) == {name: {"missing": sorted(f for f in page if f not in deps), "extra": []}
                                       for name, (_, deps) in code_deps(project_copy).items()}
    assert layer_violations(project_copy / "src") == ["alignflow.core.cli imports alignflow.feedback.annotate (at module level)"]


# --- end to end: an edited module makes DVC and Snakemake rerun exactly the stages that depend on it -------------

RAN = ("base_model", "self_instruct", "filter")  # cheap stages, made up to date with `dvc repro`
EDITS = {  # edited file -> the stages of RAN whose deps hold it (checked against dvc.yaml below)
    "src/alignflow/sft/sft.py": set(),  # first: nothing else changed since the run, so both drivers must find no work
    "src/alignflow/data/filter.py": {"filter"},  # a module of the data phase: only the stage that runs it
    "src/alignflow/core/generation.py": {"self_instruct"},  # core, but only self_instruct of these three generates
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
        assert expected == {s for s in RAN if edited in deps[s][1]}, edited
        path = repo / edited
        text, stat = path.read_text(encoding="utf-8"), path.stat()
        path.write_text(text + "# edited\n", encoding="utf-8")
        try:
            assert dvc_changed(repo, RAN) == {s: [{"changed deps": {edited: "modified"}}] for s in expected}, edited
            assert snakemake_reasons(repo, RAN) == {s: f"Updated input files: {edited}" for s in expected}, edited
        finally:  # as it was, content and mtime (Snakemake, without records of a run, compares mtimes only)
            path.write_text(text, encoding="utf-8")
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
