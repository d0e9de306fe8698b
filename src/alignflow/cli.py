"""`alignflow <stage>`: parse, load the validated params, set up logging, run the stage.

    alignflow self_instruct                 # reads ./params.yaml
    alignflow filter --params other.yaml
    alignflow evaluate dpo                  # the evaluate stage takes the model's name
    alignflow annotate rank                 # not a stage: a web page for people's rankings / A/B answers

Each stage logs to `<paths.logs>/<stage>.log` (declared in dvc.yaml, so DVC and Snakemake both know
it) and to stderr. Bad input (params, seed files, data contracts) ends with one clear message and
exit code 2; nothing is left half-written because every stage writes through `io.atomic_path`.
With `distributed.num_processes` above one, sft, reward_model, dpo and orpo re-run themselves under
`accelerate launch` (alignflow.launch) and return its exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path

from alignflow import launch
from alignflow.contracts import ContractError
from alignflow.io import InputError
from alignflow.params import ParamsError, load_params

STAGES = {
    "base_model": "materialise the base model as a Hugging Face checkpoint",
    "self_instruct": "generate instructions, inputs and outputs from seed tasks (Self-Instruct)",
    "filter": "drop short/long, blacklisted and ROUGE-L near-duplicate instructions",
    "format": "render Alpaca and chat-template text, split train / eval",
    "sft": "supervised fine-tuning: full, lora, qlora, prefix or adapter",
    "samples": "sample K responses per held-out prompt from the SFT model",
    "preferences": "rank the samples with a judge (ai, rules, constitution, human) into preference pairs",
    "reward_model": "train a Bradley-Terry reward model on the pairs (TRL RewardTrainer)",
    "ppo": "RLHF: PPO against the reward model (our trainer)",
    "dpo": "Direct Preference Optimization from the SFT model (TRL DPOTrainer)",
    "orpo": "ORPO from the base model (trl.experimental.orpo)",
    "compare": "every evaluated model side by side; win rates against the reference model",
    "report": "write reports/report.md: every model, every metric, lineage, examples",
}


def _setup_logging(log_file: Path) -> None:
    """The stage's log file and stderr. Under accelerate launch (alignflow.launch) only rank 0 writes the file,
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
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignflow", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, help_text in STAGES.items():
        sub.add_parser(name, help=help_text)
    evaluate = sub.add_parser("evaluate", help="one model's responses to the held-out prompts: reward, refusals, perplexity, KL")
    evaluate.add_argument("model", help="a name in evaluate.models of params.yaml (base, sft, ppo, dpo, orpo, ...)")
    imp = sub.add_parser("import-preferences", help="read public preference data into alignflow's pair schema")
    imp.add_argument("input", help="JSONL: prompt/chosen/rejected strings, chosen/rejected message lists, or HH transcripts")
    imp.add_argument("output", help="where to write the pairs (JSONL)")
    imp.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts in the eval split")
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
    log_name = (f"evaluate/{args.model}" if args.stage == "evaluate" else f"annotate-{args.mode}" if args.stage == "annotate"
                else args.stage)
    _setup_logging(Path(params.paths.logs) / f"{log_name}.log")
    log = logging.getLogger(f"alignflow.{args.stage}")
    started = time.perf_counter()
    try:
        relaunched = launch.relaunch(args.params, args.stage, params)  # None: run the stage in this process
        if relaunched is not None:  # the launched processes ran the stage
            if relaunched:
                log.error("accelerate launch exited %d; the ranks' messages are above", relaunched)
                return relaunched
        elif args.stage == "import-preferences":
            from alignflow.pairs import import_file

            import_file(args.input, args.output, seed=params.seed, eval_fraction=args.eval_fraction)
        elif args.stage == "annotate":
            from alignflow.annotate import serve

            serve(params, args.mode, args.model, args.against, args.host, args.port, args.token, args.limit)
        elif args.stage == "evaluate":
            from alignflow.stages.evaluate import run

            run(params, args.model)
        else:
            importlib.import_module(f"alignflow.stages.{args.stage}").run(params)
    except (InputError, ContractError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    log.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
