"""`alignflow <stage>`: parse, load the validated params, set up logging, run the stage.

    alignflow self_instruct                 # reads ./params.yaml
    alignflow filter --params other.yaml
    alignflow align dpo                     # one alignment method of alignment.methods
    alignflow evaluate dpo                  # the evaluate stage takes the model's name
    alignflow annotate rank                 # not a stage: a web page for people's rankings / A/B answers
    alignflow diff main my-experiment       # not a stage: which evaluation differences between two revisions hold
    alignflow import-preferences / import-prompts   # not stages: public data into the pipeline's schemas

Each stage logs to `<paths.logs>/<stage>.log` (declared in dvc.yaml, so DVC and Snakemake both know
it) and to stderr, shows its progress on stderr (tqdm: generation, training steps, scoring) and ends with one
line: what it wrote, its headline number and its wall time. The libraries' deprecation warnings go to the log
file only (set ALIGNFLOW_WARNINGS=1 to see them on the terminal too). Bad input (params, seed files, data contracts) ends with one clear message and
exit code 2; nothing is left half-written because every stage writes through `io.atomic_path`.
With `distributed.num_processes` above one, the stages that train with a Trainer (sft, reward_model, and the
TRL-backed alignment methods) re-run themselves under `accelerate launch` (alignflow.core.launch) and return its
exit status.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from alignflow.core import launch
from alignflow.core.contracts import ContractError
from alignflow.core.io import InputError
from alignflow.core.params import ParamsError, load_params

# stage -> (the module that runs it, help). Modules are imported by name, only the one asked for: a stage's code is
# its module's import closure (tests/test_deps.py checks dvc.yaml against it). Each has `run(params, *args)` and, if
# it trains with an HF / TRL Trainer that accelerate can spread over processes, `accelerate_section(*args)`.
STAGES = {
    "base_model": ("alignflow.data.base_model", "materialise the base model as a Hugging Face checkpoint"),
    "self_instruct": ("alignflow.data.self_instruct", "generate instructions, inputs and outputs from seed tasks (Self-Instruct)"),
    "filter": ("alignflow.data.filter", "drop short/long, blacklisted and ROUGE-L near-duplicate instructions"),
    "format": ("alignflow.data.format", "render Alpaca and chat-template text, split train / eval"),
    "sft": ("alignflow.sft.sft", "supervised fine-tuning: full, lora, qlora, prefix or adapter"),
    "samples": ("alignflow.feedback.samples", "sample K responses per held-out prompt from the SFT model"),
    "preferences": ("alignflow.feedback.preferences", "rank the samples with a judge (ai, rules, constitution, human) into pairs"),
    "reward_model": ("alignflow.reward.reward_model", "train a Bradley-Terry reward model on the pairs (TRL RewardTrainer)"),
    "align": ("alignflow.align.align", "train one alignment method of alignment.methods (ppo, dpo, orpo, ...)"),
    "evaluate": ("alignflow.evaluate.evaluate", "one model's responses to the held-out prompts: reward, refusals, perplexity, KL"),
    "compare": ("alignflow.evaluate.compare", "every evaluated model side by side; win rates against the reference model"),
    "report": ("alignflow.evaluate.report", "write reports/report.md: every model, every metric, lineage, examples"),
}
STAGE_ARGS = {"align": ("method", "a method of alignment.methods in params.yaml (ppo, dpo, orpo, ...)"),
              "evaluate": ("model", "a name in evaluate.models of params.yaml (base, sft, ppo, dpo, orpo, ...)")}


def _setup_logging(log_file: Path) -> None:
    """The stage's log file and stderr. Under accelerate launch (alignflow.core.launch) only rank 0 writes the file,
    appending to what the launching `alignflow` wrote (both append: lines interleave, never overwrite); every
    rank logs to stderr, each line tagged with its rank."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tag = f" [rank {launch.rank()}/{launch.world_size()}]" if launch.launched() else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if launch.is_main_process():
        if launch.LAUNCHED_BY_ALIGNFLOW not in os.environ:
            log_file.write_text("", encoding="utf-8")  # a fresh log for each run
        handlers.insert(0, logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    if not os.environ.get("ALIGNFLOW_WARNINGS"):
        handlers[-1].addFilter(_not_a_library_deprecation)
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn from the libraries: a log record (the file keeps it), not a bare print
    # transformers logs through a handler of its own (not the file, not this filter): route its records through ours
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()


DEPRECATIONS = ("DeprecationWarning", "FutureWarning", "deprecated", "will be removed")


def _not_a_library_deprecation(record: logging.LogRecord) -> bool:
    """The terminal's filter: drop the libraries' deprecation notices (they are in the log file)."""
    if record.name.startswith("alignflow") or record.levelno >= logging.ERROR:
        return True
    message = record.getMessage()
    return not any(marker in message for marker in DEPRECATIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignflow", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, (_, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text)
        if name in STAGE_ARGS:
            stage.add_argument(STAGE_ARGS[name][0], help=STAGE_ARGS[name][1])
    imp = sub.add_parser("import-preferences", help="read public preference data into alignflow's pair schema")
    imp.add_argument("input", help="JSONL: prompt/chosen/rejected strings, chosen/rejected message lists, or HH transcripts")
    imp.add_argument("output", help="where to write the pairs (JSONL)")
    imp.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts in the eval split")
    imp.add_argument("--skip-bad", action="store_true", help="write the good pairs and name every bad record in "
                     "OUTPUT.report.json (default: the first bad record stops the import, nothing written)")
    prompts = sub.add_parser("import-prompts", help="read a public prompt set (JSONL or CSV) into alignflow's prompt schema")
    prompts.add_argument("input", help="JSONL or CSV: one prompt (or instruction, question, text) per record")
    prompts.add_argument("output", help="where to write the prompts (JSONL): use it as paths.eval_prompts or paths.prompts")
    prompts.add_argument("--text-column", help="the column with the prompt (default: prompt, instruction, question or text)")
    prompts.add_argument("--id-column", default="id", help="the column with the id (default id; else FILE-LINE)")
    kinds = prompts.add_mutually_exclusive_group(required=True)
    kinds.add_argument("--category", choices=("benign", "benign_alarming", "harmful"), help="one category for every prompt")
    kinds.add_argument("--category-column", help="the column that says the category (or harmful or not)")
    prompts.add_argument("--harmful-values", default="true,1,yes,harmful,unsafe",
                         help="values of --category-column that mean harmful (comma-separated, any case)")
    prompts.add_argument("--otherwise", default="benign", choices=("benign", "benign_alarming"),
                         help="the category of a value that is not harmful (default benign)")
    prompts.add_argument("--skip-bad", action="store_true", help="as for import-preferences")
    diff = sub.add_parser("diff", help="which differences between two revisions' evaluations are beyond noise (95%%)")
    diff.add_argument("old", help="a git revision (branch, tag, commit; `dvc exp branch` makes one of an experiment)")
    diff.add_argument("new", help="another revision, or `workspace` for the files on disk")
    diff.add_argument("--json", dest="json_out", help="also write the differences to this JSON file")
    annotate = sub.add_parser("annotate", help="a local web page for people to rank samples or A/B-test two models")
    annotate.add_argument("mode", choices=("rank", "ab"), help="rank: the samples stage's responses; ab: two models' answers")
    annotate.add_argument("model", nargs="?", help="ab: the model to test (a name in evaluate.models)")
    annotate.add_argument("--against", help="ab: the model to test it against (default: the reference, the SFT model)")
    annotate.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; elsewhere a token is required)")
    annotate.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free one)")
    annotate.add_argument("--token", help="the token for a non-local bind (default: a random one, printed in the URL)")
    annotate.add_argument("--limit", type=int, help="annotate only the first N items of the seeded order")
    args = parser.parse_args(argv)
    if args.stage == "annotate" and (args.mode == "ab") != (args.model is not None):
        parser.error("annotate: ab takes the model to test (alignflow annotate ab dpo); rank takes none")
    if args.stage == "annotate" and ((args.limit is not None and args.limit < 1) or not 0 <= args.port <= 65535):
        parser.error("annotate: --limit must be at least 1 and --port within 0-65535")

    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(f"alignflow {args.stage}: {err}", file=sys.stderr)
        return 2
    stage_args = [getattr(args, STAGE_ARGS[args.stage][0])] if args.stage in STAGE_ARGS else []
    log_name = ("evaluate/" + stage_args[0] if args.stage == "evaluate" else stage_args[0] if args.stage == "align"
                else f"annotate-{args.mode}" if args.stage == "annotate" else args.stage)
    _setup_logging(Path(params.paths.logs) / f"{log_name}.log")
    log = logging.getLogger(f"alignflow.{args.stage}")
    started, summary = time.perf_counter(), None
    try:
        if args.stage == "import-preferences":
            from alignflow.core.pairs import import_file

            report = import_file(args.input, args.output, seed=params.seed, eval_fraction=args.eval_fraction, skip_bad=args.skip_bad)
            summary = f"wrote {args.output}: {report['written']} pairs of {report['records']} records, {report['skipped']} skipped"
        elif args.stage == "import-prompts":
            from alignflow.core.prompt_sets import import_prompts

            report = import_prompts(args.input, args.output, text_column=args.text_column, id_column=args.id_column,
                                    category=args.category, category_column=args.category_column,
                                    harmful_values=tuple(args.harmful_values.split(",")), otherwise=args.otherwise,
                                    skip_bad=args.skip_bad)
            summary = f"wrote {args.output}: {report['written']} prompts {report['categories']}, {report['skipped']} skipped"
        elif args.stage == "diff":
            from alignflow.evaluate.diff import run as diff_revisions

            summary = diff_revisions(params, args.old, args.new, args.json_out)
        elif args.stage == "annotate":
            from alignflow.feedback.annotate import serve

            serve(params, args.mode, args.model, args.against, args.host, args.port, args.token, args.limit)
        else:
            module = importlib.import_module(STAGES[args.stage][0])
            relaunched = None  # None: this process runs the stage; 0: the launched processes did
            if hasattr(module, "accelerate_section"):
                section = module.accelerate_section(*stage_args)
                relaunched = launch.relaunch(args.params, [args.stage, *stage_args], section, params)
            if relaunched:  # the launched processes ran the stage and failed
                log.error("accelerate launch exited %d; the ranks' messages are above", relaunched)
                return relaunched
            if relaunched is None:
                summary = module.run(params, *stage_args)
    except (InputError, ContractError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    log.info("%s%sdone in %.1f s", summary or "", "; " if summary else "", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
