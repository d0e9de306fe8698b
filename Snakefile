# alignflow, driven by Snakemake. The stages are declared once, in dvc.yaml; this file only
# validates params.yaml and turns each DVC stage into a rule (workflow/rules/pipeline.smk).
#
#   snakemake -c 2                      # the whole pipeline on this machine
#   snakemake -c 2 filter               # one stage and what it needs
#   snakemake --profile slurm           # each rule as a Slurm job
#
# After a successful run the results are recorded in dvc.lock and the DVC cache, so `dvc status`
# is clean and `dvc push` can share them.
from snakemake.utils import min_version, validate

min_version("9.0")

configfile: "params.yaml"
validate(config, "workflow/schemas/params.schema.yaml")

include: "workflow/rules/common.smk"
include: "workflow/rules/pipeline.smk"


rule all:
    default_target: True
    input: all_outputs()


onsuccess:
    record_in_dvc(workflow)
