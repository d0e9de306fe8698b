# Helpers for pipeline.smk: read the resolved stages of dvc.yaml, and record a run in DVC.
import json
import os
import subprocess
from pathlib import Path

import dvc.repo
from dvc.dependency.param import ParamsDependency


def dvc_stages():
    """The stages of dvc.yaml, with ${...} interpolated from params.yaml and foreach/matrix expanded."""
    with dvc.repo.Repo(".") as repo:
        return list(repo.index.stages)


def is_log(path):
    return Path(path).parts[0] == Path(config["paths"]["logs"]).parts[0]


def is_directory(path):
    # dvc.yaml's convention: an out without a file suffix is a directory
    return Path(path).suffix == ""


IGNORED = ("__pycache__", ".snakemake_timestamp")  # as in .dvcignore: not part of a directory's content


def files_in(directory):
    """Every file under a directory that DVC hashes as its content (.dvcignore's patterns left out)."""
    return sorted(str(f) for f in Path(directory).rglob("*")
                  if f.is_file() and not any(part in IGNORED for part in f.parts) and f.suffix != ".pyc")


def file_deps(stage, stages):
    """The stage's file deps. A dep that is a directory holding other stages' outputs stands for those
    outputs, as it does for DVC (compare reads data/evaluation/, where each evaluate@<model> writes). A directory
    no stage writes (the code folders src/alignflow/<phase>, data/annotations) stands for the files in it: DVC hashes
    their content, and Snakemake sees an edited file by its mtime, which a directory's own mtime does not show."""
    outs = [str(o.def_path) for other in stages if other is not stage for o in other.outs]
    deps = []
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):
            continue
        path = str(dep.def_path)
        inside = [o for o in outs if Path(o).is_relative_to(path)]
        if inside:
            deps.extend([o for o in inside if o != path] or [path])
        elif Path(path).is_dir():
            deps.extend(files_in(path) or [path])
        else:
            deps.append(path)
    return list(dict.fromkeys(deps))


def param_values(stage):
    """The values of the stage's params, as JSON: Snakemake reruns the rule when they change."""
    values = {}
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):
            for key in dep.params:
                value = config
                for part in key.split("."):
                    value = value[part]
                values[key] = value
    return json.dumps(values, sort_keys=True)


def all_outputs():
    return [str(o.def_path) for stage in dvc_stages() for o in stage.outs if not is_log(o.def_path)]


def record_in_dvc(workflow):
    """`dvc commit` the stages of this run's DAG: after a successful run they are all up to date.

    When an output's content is already in the DVC cache (a rerun that produced the same bytes), the
    commit links the file to that older cache copy and its mtime goes back in time, older than outputs
    made from it, and Snakemake would then call them outdated. So the outputs' mtimes are put back."""
    jobs = list(workflow.dag.jobs)
    ran = sorted({job.rule.name for job in jobs} & {s.name for s in dvc_stages()})
    if not ran:
        return
    files = {Path(f) for job in jobs for f in job.output if Path(f).is_file()}
    mtimes = {path: path.stat().st_mtime_ns for path in files}
    subprocess.run(["dvc", "commit", "--force", "--quiet", *ran], check=True)
    for path, mtime in mtimes.items():
        os.utime(path, ns=(mtime, mtime))
