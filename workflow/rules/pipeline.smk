# One rule per DVC stage. Values are bound through directives (params:, output:, ...), never read
# from the loop variable inside shell:, which Snakemake would evaluate late (the last stage's cmd).
STAGES = dvc_stages()
for stage in STAGES:
    outs = [str(o.def_path) for o in stage.outs]

    rule:
        name: stage.name
        input: file_deps(stage, STAGES)
        output: [directory(p) if is_directory(p) else p for p in outs if not is_log(p)]
        log: [p for p in outs if is_log(p)]
        params:
            cmd=stage.cmd,
            values=param_values(stage),
        shell: "{params.cmd}"
