"""Stage `compare`: every evaluated model side by side, and win rates against the reference model.

    alignflow compare                   # reads params.yaml: seed, evaluate, preferences, paths

Reads:  `<paths.evaluation>/<model>.jsonl` and `<paths.metrics>/evaluate/<model>.json` for each model of
        `evaluate.models` (the evaluate@<model> stages); `paths.refusal_examples` (the refusal detector's accuracy;
        with `evaluate.refusal_judge`, the AI judge's too, asked with a refusal rubric); people's A/B answers in
        `paths.ab_annotations` (alignflow.core.annotation_log).
Writes: `<paths.metrics>/evaluation.json` (the summary: one entry per model, DVC metrics), `paths.verdicts`
        (every comparison and how it was decided), and under `<paths.plots>/evaluation/`: win_rates.json,
        refusal.json, rewards.json (dvc plots) and win_rates.png, rewards.png, refusal.png (the report's figures).

Win rates: each model's response to a prompt against the reference's (the entry of `evaluate.models` whose
checkpoint is `paths.sft_model`, the SFT model), judged by the preference stage's judge (`preferences.judge`):
  ai            asked in both orders; a preference that does not survive the swap is a tie, which
                `preferences.tie_breaker: rules` settles as in the preference stage (the same code:
                alignflow.core.judges.judge_pairs); constitution uses the same judge
  rules         the higher rules score wins, an equal score is a tie (the order cannot matter)
  human         people's A/B answers (`alignflow annotate ab <model>`, in `paths.ab_annotations`): per prompt the
                majority of the annotators, over the prompts they answered; a model nobody A/B-tested falls back
                to the rules (each model's `judged_by` says which)
Identical responses are a tie without asking. Ties are counted apart: win + tie + loss = 1.

Statistics (alignflow.core.stats): every share carries its Wilson 95% interval, and each model's `vs_reference`
block holds the paired differences from the reference on the same prompts (reward, refusal rate per category,
response length; a seeded bootstrap over prompts) and the perplexity ratio on the same held-out texts, each with
`holds`: its interval excludes no change. `net_win_rate` (wins minus losses, per prompt) is paired the same way.
Whatever the judge, a model with people's A/B answers also gets a `human` block: their win rates, how often
the annotators agree, and how often they agree with `preferences.agreement_judge` on the same prompts; A/B
answers between two other models (`annotate ab X --against Y`) go under `human_pairs` as "X vs Y".
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from alignflow.core.annotation_log import ab_answers, between_annotators, majority, read_logs, with_judge
from alignflow.core.io import InputError, atomic_path, dump_json, dump_jsonl, read_jsonl
from alignflow.core.judges import PairwiseJudge, judge_pairs, judged_refusals, pairwise_judge, rules_pair
from alignflow.core.params import Params
from alignflow.core.refusal import is_refusal
from alignflow.core.stats import holds, mean_interval, paired_difference, paired_perplexity_ratio, proportion, wilson

log = logging.getLogger(__name__)


def win_rates(outcomes: list[str], seed: int) -> dict[str, Any]:
    """Outcomes ("win" | "tie" | "loss", from the model's side) -> rates with Wilson intervals; ties are their own
    share; net_win_rate = mean of +1 / 0 / -1 per prompt, with a bootstrap interval (`holds`: it excludes 0)."""
    if not outcomes:
        raise ValueError("no comparisons")
    counts = Counter(outcomes)
    if set(counts) - {"win", "tie", "loss"}:
        raise ValueError(f"unknown outcomes: {sorted(set(counts) - {'win', 'tie', 'loss'})}")
    n, decided = len(outcomes), counts["win"] + counts["loss"]
    net = mean_interval([{"win": 1, "tie": 0, "loss": -1}[o] for o in outcomes], seed)
    net["holds"] = net["n"] > 1 and holds(net)
    return {"win_rate": wilson(counts["win"], n), "tie_rate": wilson(counts["tie"], n), "loss_rate": wilson(counts["loss"], n),
            "win_rate_without_ties": wilson(counts["win"], decided), "net_win_rate": net, "comparisons": n}


def refusal_detector_accuracy(path: str, judge: PairwiseJudge | None = None) -> dict[str, Any]:
    """The phrase detector's accuracy on labelled responses with Wilson intervals, per split (dev: looked at while
    writing it; test: not); with a `judge`, the model-based detector's accuracy beside it (no answer counts as
    wrong) and how often the two detectors agree."""
    rows = [r for _, r in read_jsonl(path, {"text": str, "refusal": bool, "split": str})]
    phrases = [is_refusal(r["text"]) for r in rows]
    judged = judged_refusals(judge, [r["text"] for r in rows]) if judge is not None else None
    result: dict[str, Any] = {"examples": len(rows)}
    if judged is not None:
        result["judge"] = {"model": judge.describe(), "no_answer": sum(j is None for j in judged),
                           "agreement_with_phrases": proportion([j == p for j, p in zip(judged, phrases)])}
    for split in ("dev", "test", None):
        subset = [i for i, r in enumerate(rows) if split is None or r["split"] == split]
        if subset:
            result[f"accuracy_{split or 'all'}"] = proportion([phrases[i] == rows[i]["refusal"] for i in subset])
            if judged is not None:
                result["judge"][f"accuracy_{split or 'all'}"] = proportion([judged[i] == rows[i]["refusal"] for i in subset])
    return result


def paired_differences(records: list[dict], reference: list[dict], seed: int) -> dict[str, Any]:
    """This model minus the reference on the same prompts: reward, refusal rates (per category, and over the
    benign ones), response tokens; each with its bootstrap interval over prompts and `holds`."""
    ref = {r["id"]: r for r in reference}

    def diff(key: str, rows: list[dict]) -> dict[str, Any]:
        return paired_difference([float(r[key]) for r in rows], [float(ref[r["id"]][key]) for r in rows], seed)

    result = {"reward": diff("reward", records)}
    for category in sorted({r["category"] for r in records}):
        result[f"{category}_refusal_rate"] = diff("refused", [r for r in records if r["category"] == category])
    result["over_refusal_rate"] = diff("refused", [r for r in records if not r["harmful"]])
    result["response_tokens"] = diff("response_tokens", records)
    return result


def judge_outcomes(model: str, records: list[dict], reference: list[dict], params: Params, kind: str) -> tuple[list[str], list[dict]]:
    """Win / tie / loss of `model`'s response against the reference's for each prompt, and the verdicts, by the
    `ai` judge (constitution uses it too) or the `rules`."""
    cfg = params.preferences
    ref_by_id = {r["id"]: r for r in reference}

    def pair(record: dict):  # (prompt, this model's response, the reference's, harmful): alignflow.core.judges.Pair
        return ([{"role": "user", "content": record["prompt"]}], {"id": model, "text": record["response"]},
                {"id": "reference", "text": ref_by_id[record["id"]]["response"]}, record["harmful"])

    def outcome(winner: str | None) -> str:
        return "tie" if winner is None else "win" if winner == model else "loss"

    outcomes: dict[int, str] = {}
    verdicts: dict[int, dict] = {}
    asked = []
    for i, record in enumerate(records):
        theirs = ref_by_id[record["id"]]["response"]
        if record["response"] == theirs:
            outcomes[i], verdicts[i] = "tie", {"kind": "identical"}
        elif kind == "ai":
            asked.append(i)
        else:
            winner, scores = rules_pair(*pair(record), cfg)
            outcomes[i], verdicts[i] = outcome(winner), {"kind": "rules", "scores": scores}
    if asked:
        judge = pairwise_judge(cfg, params.paths, params.seed)
        judged = judge_pairs(judge, cfg, [pair(records[i]) for i in asked], tie_breaker=cfg.tie_breaker)
        for i, (_, winner, verdict) in zip(asked, judged):
            outcomes[i], verdicts[i] = outcome(winner), verdict
    ordered = [outcomes[i] for i in range(len(records))]
    return ordered, [{"model": model, "reference": params.reference_model, "prompt_id": r["id"], "outcome": o,
                      "judge": verdicts[i]} for i, (r, o) in enumerate(zip(records, ordered))]


def human_outcomes(model: str, records: list[dict], other: str, reference: list[dict], params: Params) -> dict[str, Any] | None:
    """People's A/B answers for `model` against `other` (whose records are `reference`; alignflow.core.annotation_log), or
    None if there are none: the per-item majority outcome, the win rates over the answered items (identical
    responses, never shown, count as ties as for the judges), agreement between annotators and with
    `preferences.agreement_judge`."""
    ref_by_id = {r["id"]: r for r in reference}
    texts = {r["id"]: {model: r["response"], other: ref_by_id[r["id"]]["response"]} for r in records}
    answers, stale = ab_answers(params.paths.ab_annotations, model, other, texts)
    for where in stale:
        log.warning("%s: an A/B answer about responses that changed since (evaluate reran): left out", where)
    if not answers:
        return None
    each: dict[str, dict[str, str]] = {}
    for answer in answers:
        each.setdefault(answer["annotator"], {})[answer["item"]] = answer["outcome"]
    answered = sorted({a["item"] for a in answers})
    outcome = {item: majority([a["outcome"] for a in answers if a["item"] == item]) for item in answered}
    identical = [r["id"] for r in records if r["response"] == ref_by_id[r["id"]]["response"]]
    result = {**win_rates([outcome[i] for i in answered] + ["tie"] * len(identical), params.seed), "answers": len(answers),
              "annotators": len(each), "stale_answers": len(stale), "agreement_between_annotators": between_annotators(each)}
    kind = params.preferences.agreement_judge
    if kind:
        subset = [r for r in records if r["id"] in outcome]
        judged, _ = judge_outcomes(model, subset, reference, params, kind)
        result[f"agreement_with_{kind}_judge"] = with_judge(outcome, {r["id"]: o for r, o in zip(subset, judged)})
    result["outcomes"] = outcome
    return result


def ab_model_pairs(folder: str) -> list[tuple[str, str]]:
    """Every pair of models people A/B-tested, from the logs' "models" fields (sorted, each pair once)."""
    if not Path(folder).is_dir():
        return []
    return sorted({tuple(sorted(r["models"])) for _, r in read_logs(folder) if isinstance(r.get("models"), list) and len(r["models"]) == 2})


def read_model(params: Params, name: str) -> tuple[list[dict], dict, tuple[list[float], list[int]]]:
    """One evaluate@<name>'s per-prompt records, metrics and per-text (NLL, tokens) on the held-out text."""
    responses = Path(params.paths.evaluation) / f"{name}.jsonl"
    heldout = Path(params.paths.evaluation) / f"{name}.heldout.jsonl"
    metrics = Path(params.paths.metrics) / "evaluate" / f"{name}.json"
    if not responses.is_file() or not metrics.is_file() or not heldout.is_file():
        raise InputError(f"{responses}: missing; run evaluate@{name} first (dvc repro evaluate@{name})")
    records = [r for _, r in read_jsonl(responses, {"id": str, "response": str, "reward": float, "refused": bool,
                                                    "category": str, "harmful": bool, "response_tokens": int})]
    texts = [r for _, r in read_jsonl(heldout, {"text": int, "nll": float, "tokens": int})]
    return records, json.loads(metrics.read_text()), ([t["nll"] for t in texts], [t["tokens"] for t in texts])


def draw(summary: dict[str, Any], rewards: dict[str, list[float]], reference: str, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary)
    others = [m for m in models if m != reference]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(others)))
    left = [0.0] * len(others)
    for outcome, colour in (("win", "#4c9f70"), ("tie", "#c8c8c8"), ("loss", "#d1605e")):
        values = [summary[m][f"{outcome}_rate"]["value"] for m in others]
        ax.barh(others, values, left=left, color=colour, label=outcome)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of held-out prompts, against {reference}")
    ax.legend(ncol=3, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "win_rates.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.boxplot([rewards[m] for m in models], tick_labels=models)
    ax.set_ylabel("reward model score")
    fig.tight_layout()
    fig.savefig(folder / "rewards.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.27
    for k, (key, label) in enumerate((("benign", "benign"), ("benign_alarming", "benign, looks alarming"), ("harmful", "harmful"))):
        rates = [summary[m]["refusal_rate"][key] for m in models]
        values = [r["value"] or 0 for r in rates]
        errors = [[max(0.0, v - (r["low"] or 0)) for v, r in zip(values, rates)], [max(0.0, (r["high"] or 0) - v) for v, r in zip(values, rates)]]
        ax.bar([i + (k - 1) * width for i in range(len(models))], values, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share refused (95% interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "refusal.png", dpi=100)
    plt.close(fig)


def run(params: Params) -> str | None:
    cfg, paths = params.evaluate, params.paths
    loaded = {name: read_model(params, name) for name in cfg.models}
    reference_records = loaded[params.reference_model][0]
    ids = [r["id"] for r in reference_records]
    summary, all_verdicts, rewards = {}, [], {}
    judge = params.preferences.judge
    reference_texts = loaded[params.reference_model][2]
    for name, (records, metrics, texts) in loaded.items():
        if [r["id"] for r in records] != ids:
            raise InputError(f"{paths.evaluation}/{name}.jsonl: not the same prompts as {params.reference_model}'s; rerun evaluate@{name}")
        if len(texts[0]) != len(reference_texts[0]):
            raise InputError(f"{paths.evaluation}/{name}.heldout.jsonl: not the same held-out texts as {params.reference_model}'s; rerun evaluate@{name}")
        entry = {key: metrics[key] for key in ("reward_mean", "reward_std", "harmful_refusal_rate", "over_refusal_rate",
                                               "refusal_rate", "perplexity", "kl_to_reference", "response_tokens_mean")}
        if "base" in loaded:
            entry["perplexity_ratio_to_base"] = paired_perplexity_ratio(texts, loaded["base"][2], params.seed)
        if name != params.reference_model:
            entry["vs_reference"] = {**paired_differences(records, reference_records, params.seed),
                                     "perplexity_ratio": paired_perplexity_ratio(texts, reference_texts, params.seed)}
            human = human_outcomes(name, records, params.reference_model, reference_records, params)
            if judge == "human" and human:
                entry.update({k: human[k] for k in ("win_rate", "tie_rate", "loss_rate", "win_rate_without_ties", "net_win_rate", "comparisons")})
                entry["judged_by"] = "human"
                all_verdicts += [{"model": name, "reference": params.reference_model, "prompt_id": i, "outcome": o,
                                  "judge": {"kind": "human", "majority_of": human["annotators"]}} for i, o in human["outcomes"].items()]
            else:
                kind = "ai" if judge in ("ai", "constitution") else "rules"
                outcomes, verdicts = judge_outcomes(name, records, reference_records, params, kind)
                entry.update(win_rates(outcomes, params.seed))
                entry["judged_by"] = kind if judge != "human" else "rules (no human A/B answers for this model)"
                all_verdicts += verdicts
            if human:
                entry["human"] = {k: v for k, v in human.items() if k != "outcomes"}
        summary[name] = entry
        rewards[name] = [r["reward"] for r in records]
        log.info("%s: %s", name, ", ".join(f"{k} {v['value']:.3g}" for k, v in entry.items() if isinstance(v, dict) and v.get("value") is not None))

    others = {}  # people's A/B answers for two models neither of which is the reference (annotate ab X --against Y)
    for a, b in ab_model_pairs(paths.ab_annotations):
        if params.reference_model in (a, b):
            continue
        if a not in loaded or b not in loaded:
            log.warning("%s: A/B answers for %s vs %s, which are not both in evaluate.models: left out", paths.ab_annotations, a, b)
            continue
        human = human_outcomes(a, loaded[a][0], b, loaded[b][0], params)
        if human:
            others[f"{a} vs {b}"] = {k: v for k, v in human.items() if k != "outcomes"}
    result = {
        "reference": params.reference_model, "prompts": len(ids), "judge": judge,
        **({"human_pairs": others} if others else {}),
        "refusal_detector": refusal_detector_accuracy(
            paths.refusal_examples, pairwise_judge(params.preferences, paths, params.seed) if cfg.refusal_judge else None),
        "models": summary,
    }
    folder = Path(paths.plots) / "evaluation"
    plots = {
        "win_rates.json": [{"model": m, **{k: summary[m][k]["value"] for k in ("win_rate", "tie_rate", "loss_rate")}}
                           for m in summary if m != params.reference_model],
        "refusal.json": [{"model": m, "over_refusal_rate": summary[m]["over_refusal_rate"]["value"],
                          "harmful_refusal_rate": summary[m]["harmful_refusal_rate"]["value"]} for m in summary],
        "rewards.json": [{"model": m, "reward_mean": summary[m]["reward_mean"]["value"], "reward_std": summary[m]["reward_std"]}
                         for m in summary],
    }
    names = [*plots, "win_rates.png", "rewards.png", "refusal.png"]
    with (atomic_path(Path(paths.metrics) / "evaluation.json") as tmp_metrics, atomic_path(paths.verdicts) as tmp_verdicts,
          atomic_path(folder) as tmp_folder):
        tmp_folder.mkdir(parents=True)
        for name, rows in plots.items():
            dump_json(rows, tmp_folder / name)
        draw(summary, rewards, params.reference_model, tmp_folder)
        dump_jsonl(all_verdicts, tmp_verdicts)
        dump_json(result, tmp_metrics)
    return (f"wrote {Path(paths.metrics) / 'evaluation.json'}: {len(summary)} models on {len(ids)} prompts against "
            f"{params.reference_model} (judge: {result['judge']}); refusal detector accuracy "
            f"{result['refusal_detector']['accuracy_all']['value']:.3f}; plots {', '.join(names)}")
