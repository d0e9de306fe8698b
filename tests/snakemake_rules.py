"""Print the rules Snakemake builds from this repository's Snakefile, as JSON (run in the repo root).

    python tests/snakemake_rules.py > rules.json

Used by tests/test_dags.py to compare Snakemake's view of the pipeline with DVC's.
"""

import json
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings

with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=Path("Snakefile"), workdir=Path("."))._workflow
    rules = {
        rule.name: {
            "cmd": rule.params.get("cmd") if "cmd" in rule.params.keys() else None,
            "input": sorted(map(str, rule.input)),
            "output": sorted(map(str, rule.output)),
            "log": sorted(map(str, rule.log)),
        }
        for rule in workflow.rules
    }
print(json.dumps(rules, indent=1, sort_keys=True))
