"""Stage `preferences`: rank the sampled responses with a judge and write preference pairs.

    alignflow preferences                         # reads params.yaml: seed, preferences, paths
    dvc exp run -S preferences.judge=rules        # another judge; the samples are not redrawn

Reads:  `paths.samples` (the samples stage); for `judge: human` the rankings in `paths.annotations/*.jsonl`;
        the judge model (`preferences.judge_model`, default `paths.base_model`) for `ai` and `constitution`.
Writes: `paths.pairs`: {"id", "prompt_id", "prompt", "chosen", "rejected", "judge", "split"} (alignflow.core.pairs),
        split by prompt so no prompt is on both sides; `paths.judgements`: every decision the judge made,
        ties included (the audit trail); `<paths.metrics>/preferences.json`: pair counts, whether the samples
        can teach refusal (the refused share of the harmful and other prompts' samples, prompts with both a refusal
        and an answer, pairs that choose a refusal) and, for the AI judge, how often the two orders agreed.

Judges (`preferences.judge`; see alignflow.core.judges):
  ai            every pair of a prompt's K responses, asked in both orders; agreeing answers make a pair,
                disagreeing ones a tie (no pair). The judge's prompt, model and both verdicts go with the pair.
                `tie_breaker: rules` lets the rules score settle the ties (for a weak local judge, such as the
                bundled 135M model, which answers "A" whatever the order); `null` leaves them ties.
  rules         checks that need no model (non-empty, no degenerate repetition, language of the prompt, length
                band, refuses harmful / answers benign prompts); the score ranks the K responses, equal scores tie.
  constitution  critique each response by a principle (drawn with the seed), revise it; revision > original.
  human         people's rankings in `paths.annotations` (`alignflow annotate rank` writes them; the format is in
                alignflow.core.annotation_log). Several annotators: each pair goes the majority's way, an even split is a
                tie. Agreement between annotators and with `agreement_judge` (on the same pairs) is reported.
A ranking of K responses gives all K*(K-1)/2 pairs (InstructGPT); ties give none. `max_pairs_per_prompt` then keeps
the widest-gap pairs of each prompt, so prompts weigh alike whatever their number of responses, and `balance_refusals`
adds the next pairs of the prompts on the scarcer side until as many pairs choose a refusal as reject one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

from alignflow.core import contracts
from alignflow.core.annotation_log import between_annotators, preference_sets, rank_answers, with_judge
from alignflow.core.io import InputError, atomic_path, dump_json, dump_jsonl, read_jsonl
from alignflow.core.judges import (critique_prompt, judge_model, judge_pairs, pairwise_judge, request_text, revision_prompt,
                                   rule_checks, rule_score, rules_pair)
from alignflow.core.pairs import assign_splits, make_pair, ranking_to_pairs
from alignflow.core.params import Params, PathParams, PreferencesParams
from alignflow.core.refusal import is_refusal
from alignflow.core.stats import proportion

log = logging.getLogger(__name__)


def read_samples(path: str) -> list[dict[str, Any]]:
    return [record for _, record in read_jsonl(path, {"prompt_id": str, "prompt": list, "harmful": bool, "responses": list})]


# --- the four judges: samples -> (pairs, judgements, metrics) ---


def ai_pairs(samples, judge, cfg: PreferencesParams):
    """Every pair of a prompt's responses, judged in both orders; with `tie_breaker: rules` the rules score
    settles the comparisons the AI judge left tied (the pair then records both; alignflow.core.judges.judge_pairs)."""
    comparisons, owners = [], []
    for sample in samples:
        for x, y in combinations(sample["responses"], 2):
            comparisons.append((sample["prompt"], x, y, sample["harmful"]))
            owners.append(sample)
    judged = judge_pairs(judge, cfg, comparisons, tie_breaker=cfg.tie_breaker, with_prompt=True)
    results = [result for result, _, _ in judged]
    pairs, judgements, settled = [], [], 0
    for sample, (result, winner, verdict) in zip(owners, judged):
        judgements.append({"prompt_id": sample["prompt_id"], "judge": "ai", **result})
        if winner is None:
            continue
        settled += verdict["kind"] == "rules"
        text = {r["id"]: r["text"] for r in sample["responses"]}
        loser = result["second"] if winner == result["first"] else result["first"]
        pairs.append(make_pair(sample["prompt"], text[winner], text[loser], verdict))
    answers = [v["answer"] for r in results for v in r["verdicts"]]
    metrics = {
        "comparisons": len(results),
        "agreement_across_orders": sum(r["winner"] is not None for r in results) / max(1, len(results)),
        "first_position_rate": answers.count("A") / max(1, sum(a is not None for a in answers)),
        "unanswered": answers.count(None), "ai_ties": sum(r["winner"] is None for r in results),
        "pairs_from_ai": len(pairs) - settled, "pairs_from_tie_breaker": settled,
    }
    return pairs, judgements, metrics


def by_ai(samples, cfg: PreferencesParams, paths: PathParams, seed: int):
    return ai_pairs(samples, pairwise_judge(cfg, paths, seed), cfg)


def by_rules(samples, cfg: PreferencesParams, paths: PathParams, seed: int):
    pairs, judgements, passed = [], [], Counter()
    for sample in samples:
        request = request_text(sample["prompt"])
        scored = []
        for response in sample["responses"]:
            checks = rule_checks(request, response["text"], sample["harmful"], cfg.rules_min_tokens, cfg.rules_max_tokens)
            passed.update(k for k, ok in checks.items() if ok)
            scored.append((rule_score(checks), response))
            judgements.append({"prompt_id": sample["prompt_id"], "judge": "rules", "response": response["id"],
                               "checks": checks, "score": rule_score(checks)})
        tiers = [[r["text"] for s, r in scored if s == score] for score in sorted({s for s, _ in scored}, reverse=True)]
        score_of = {r["text"]: s for s, r in scored}
        for chosen, rejected in ranking_to_pairs(tiers):
            pairs.append(make_pair(sample["prompt"], chosen, rejected, {
                "kind": "rules", "scores": {"chosen": score_of[chosen], "rejected": score_of[rejected]}}))
    n = sum(len(s["responses"]) for s in samples)
    return pairs, judgements, {f"pass_rate_{k}": passed[k] / n for k in
                               ("non_empty", "no_repetition", "language_match", "length_in_band", "refusal_correct")}


def constitution_pairs(samples, generator, principles: tuple[str, ...], max_new_tokens: int, seed: int):
    """Critique every non-empty response by a principle drawn with the seed, then revise it; each usable
    revision (non-empty, not the original) is preferred over its original."""
    rng = random.Random(seed)
    items = [(s, r, rng.choice(principles)) for s in samples for r in s["responses"] if r["text"].strip()]
    critiques = generator.generate([critique_prompt(request_text(s["prompt"]), r["text"], p) for s, r, p in items],
                                   max_new_tokens=max_new_tokens, seed=seed)
    revisions = generator.generate([revision_prompt(request_text(s["prompt"]), r["text"], c.strip(), p)
                                    for (s, r, p), c in zip(items, critiques)], max_new_tokens=max_new_tokens, seed=seed + 1)
    pairs, judgements = [], []
    for (sample, response, principle), critique, revision in zip(items, critiques, revisions):
        revision, critique = revision.strip(), critique.strip()
        judgements.append({"prompt_id": sample["prompt_id"], "judge": "constitution", "response": response["id"],
                           "principle": principle, "critique": critique, "revision": revision})
        if revision and revision != response["text"].strip():
            pairs.append(make_pair(sample["prompt"], revision, response["text"], {
                "kind": "constitution", "model": generator.describe(), "principle": principle, "critique": critique}))
    return pairs, judgements, {"responses_revised": len(items), "revisions_unusable": len(items) - len(pairs)}


def by_constitution(samples, cfg: PreferencesParams, paths: PathParams, seed: int):
    from alignflow.core.generation import OpenAIGenerator, TransformersGenerator

    model = judge_model(cfg, paths)
    generator = (OpenAIGenerator(model, api_base=cfg.api_base, api_key_env=cfg.api_key_env, temperature=0.0, top_p=1.0,
                                 concurrency=cfg.judge_batch_size) if cfg.judge_backend == "openai"
                 else TransformersGenerator(model, temperature=0.0, top_p=1.0, batch_size=cfg.judge_batch_size, chat_template=True))
    return constitution_pairs(samples, generator, cfg.principles, cfg.revision_max_new_tokens, seed)


def by_human(samples, cfg: PreferencesParams, paths: PathParams, seed: int):
    """People's rankings (alignflow.core.annotation_log: the logs `alignflow annotate rank` writes, or short hand-written
    lines). Each ranking gives all its (better, worse) pairs; with several annotators each pair goes the
    majority's way and an even split is a tie (no pair). Agreement between annotators, and with
    `agreement_judge` on the same response pairs, goes into the metrics."""
    if not Path(paths.annotations).is_dir() or not any(Path(paths.annotations).glob("*.jsonl")):
        raise InputError(f"{paths.annotations}: no *.jsonl rankings (preferences.judge: human reads them; "
                         "`alignflow annotate rank` writes them)")
    by_pid = {s["prompt_id"]: s for s in samples}
    answers, stale = rank_answers(paths.annotations, by_pid)
    for where in stale:
        log.warning("%s: a ranking of responses no longer in %s (resampled?): left out", where, paths.samples)
    if not answers:
        raise InputError(f"{paths.annotations}: no ranking of the current samples ({len(stale)} stale ones left out)")
    judgements = [{"prompt_id": a["item"], "judge": "human", "annotator": a["annotator"], "ranking": a["tiers"], "source": a["where"]}
                  for a in answers]
    each = preference_sets(answers)  # annotator -> {(prompt_id, a, b): +1 | -1}
    votes: dict[tuple[str, str, str], int] = {}
    for prefs in each.values():
        for key, sign in prefs.items():
            votes[key] = votes.get(key, 0) + sign
    pairs, people = [], {}
    for (pid, a, b), total in sorted(votes.items()):
        if total == 0:
            continue  # annotators split evenly: a tie
        people[(pid, a, b)] = 1 if total > 0 else -1
        winner, loser = (a, b) if total > 0 else (b, a)
        text = {r["id"]: r["text"] for r in by_pid[pid]["responses"]}
        ballots = [p[(pid, a, b)] for p in each.values() if (pid, a, b) in p]
        pairs.append(make_pair(by_pid[pid]["prompt"], text[winner], text[loser], {
            "kind": "human", "votes_for": ballots.count(people[(pid, a, b)]), "votes_against": ballots.count(-people[(pid, a, b)])}))
    metrics = {"rankings": len(answers), "annotators": len(each), "stale_rankings": len(stale),
               "agreement_between_annotators": between_annotators(each)}
    if cfg.agreement_judge:
        metrics[f"agreement_with_{cfg.agreement_judge}_judge"] = with_judge(people, judge_preferences(
            sorted(people), by_pid, cfg, paths, seed))
    return pairs, judgements, metrics


def judge_preferences(keys, by_pid, cfg: PreferencesParams, paths: PathParams, seed: int) -> dict[tuple[str, str, str], int]:
    """`cfg.agreement_judge`'s preference on each (prompt_id, a, b): +1 for a, -1 for b; its ties are left out."""
    response = {pid: {r["id"]: r for r in s["responses"]} for pid, s in by_pid.items()}
    pairs = [(by_pid[pid]["prompt"], response[pid][a], response[pid][b], by_pid[pid]["harmful"]) for pid, a, b in keys]
    if cfg.agreement_judge == "rules":
        winners = [rules_pair(*pair, cfg)[0] for pair in pairs]
    else:  # the AI judge alone: its ties are left out, not settled by the rules
        winners = [winner for _, winner, _ in judge_pairs(pairwise_judge(cfg, paths, seed), cfg, pairs, tie_breaker=None)]
    return {key: 1 if winner == key[1] else -1 for key, winner in zip(keys, winners) if winner is not None}


JUDGES = {"ai": by_ai, "rules": by_rules, "constitution": by_constitution, "human": by_human}


def seeded_key(seed: int, key: str) -> bytes:
    """A sort key that orders ids the same way for the same seed and differently for another."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def pair_order(pair: dict[str, Any], seed: int) -> tuple:
    """Widest judge score gap first (the rules judge's scores; a judge without scores counts 0), then a seeded order."""
    scores = pair["judge"].get("scores") or {}
    return scores.get("rejected", 0) - scores.get("chosen", 0), seeded_key(seed, pair["id"])


def widest_pairs(pairs: list[dict[str, Any]], cap: int, seed: int) -> list[dict[str, Any]]:
    """At most `cap` pairs of each prompt, in `pair_order`. The file keeps its order."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair["prompt_id"], []).append(pair)
    kept = {p["id"] for group in by_prompt.values() for p in sorted(group, key=lambda p: pair_order(p, seed))[:cap]}
    return [p for p in pairs if p["id"] in kept]


def refusal_side(pair: dict[str, Any]) -> int:
    """+1: the pair chooses a refusal over an answer; -1: an answer over a refusal; 0: both or neither refuse."""
    return is_refusal(pair["chosen"]) - is_refusal(pair["rejected"])


def balance_refusals(kept: list[dict[str, Any]], judged: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Add judged pairs of the scarcer side until as many kept pairs choose a refusal as reject one.

    One pair per prompt weighs the prompts alike, not the lessons: with a harmful third of the prompts, two pairs in
    three say "the answer beats the refusal", and a reward model learns that refusing is bad. The added pairs come one
    per prompt per round (prompts in a seeded order), each prompt's next pair in `pair_order`, so they spread over as
    many prompts as they can. Stops short when the scarcer side has no judged pairs left. The file keeps its order."""
    sides = [refusal_side(p) for p in kept]
    short = sides.count(-1) - sides.count(1)  # > 0: refusal-chosen pairs are scarce; < 0: answer-chosen ones
    scarce, need = (1 if short > 0 else -1), abs(short)
    have = {p["id"] for p in kept}
    spare: dict[str, list[dict[str, Any]]] = {}
    for pair in sorted(judged, key=lambda p: pair_order(p, seed)):
        if pair["id"] not in have and refusal_side(pair) == scarce:
            spare.setdefault(pair["prompt_id"], []).append(pair)
    queue = [spare[pid] for pid in sorted(spare, key=lambda pid: seeded_key(seed, pid))]
    while need and any(queue):
        for group in queue:
            if need and group:
                have.add(group.pop(0)["id"])
                need -= 1
    return [p for p in judged if p["id"] in have]


def sample_mix(samples: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the samples can teach refusal: the share of the samples the refusal detector calls refusals, for
    harmful and for other prompts (Wilson intervals), how many prompts got both a refusal and an answer among their
    samples, and the pairs whose chosen response is a refusal, by the prompt's kind."""
    harmful = {s["prompt_id"]: s["harmful"] for s in samples}
    by_prompt = {json.dumps(s["prompt"], ensure_ascii=False): s["harmful"] for s in samples}  # pairs carry the messages
    refused = {s["prompt_id"]: [is_refusal(r["text"]) for r in s["responses"]] for s in samples}
    result: dict[str, Any] = {}
    for kind, flag in (("harmful", True), ("other", False)):
        flags = [f for pid, fs in refused.items() if harmful[pid] == flag for f in fs]
        chosen = [p for p in pairs if by_prompt[json.dumps(p["prompt"], ensure_ascii=False)] == flag]
        result[f"samples_refused_{kind}"] = proportion(flags)
        result[f"prompts_with_refusal_and_answer_{kind}"] = sum(
            1 for pid, fs in refused.items() if harmful[pid] == flag and any(fs) and not all(fs))
        result[f"pairs_{kind}"] = len(chosen)
        result[f"pairs_chosen_refusal_{kind}"] = sum(is_refusal(p["chosen"]) for p in chosen)
    return result


def run(params: Params) -> str | None:
    cfg, paths = params.preferences, params.paths
    samples = read_samples(paths.samples)
    empty = sum(not r["text"].strip() for s in samples for r in s["responses"])
    samples = [{**s, "responses": [r for r in s["responses"] if r["text"].strip()]} for s in samples]  # a pair needs two texts
    pairs, judgements, judge_metrics = JUDGES[cfg.judge](samples, cfg, paths, params.seed)
    judged = list({p["id"]: p for p in pairs}.values())  # the same two texts twice (e.g. a repeated revision) once
    unique = judged if cfg.max_pairs_per_prompt is None else widest_pairs(judged, cfg.max_pairs_per_prompt, params.seed)
    capped = len(unique)
    if cfg.balance_refusals:
        unique = balance_refusals(unique, judged, params.seed)
    if not unique:
        raise InputError(f"{paths.samples}: the {cfg.judge} judge preferred no response over another "
                         f"({judge_metrics}); use a stronger judge (README: plugging in a judge server) or more samples")
    assign_splits(unique, params.seed, cfg.eval_fraction)
    contracts.validate("pairs", unique, paths.pairs)

    split_counts = Counter(p["split"] for p in unique)
    prompts_by_split = {s: len({p["prompt_id"] for p in unique if p["split"] == s}) for s in ("train", "eval")}
    metrics = {
        "judge": cfg.judge, "prompts": len(samples), "responses": sum(len(s["responses"]) for s in samples),
        "empty_responses_skipped": empty, "pairs_judged": len(judged), "pairs": len(unique),
        "pairs_added_to_balance_refusals": len(unique) - capped,
        "pairs_choosing_refusal": sum(refusal_side(p) == 1 for p in unique), "pairs_rejecting_refusal": sum(refusal_side(p) == -1 for p in unique), "train_pairs": split_counts["train"], "eval_pairs": split_counts["eval"],
        "train_prompts": prompts_by_split["train"], "eval_prompts": prompts_by_split["eval"],
        "prompts_without_pairs": len(samples) - len({p["prompt_id"] for p in unique}),
        "mean_chosen_chars": sum(len(p["chosen"]) for p in unique) / len(unique),
        "mean_rejected_chars": sum(len(p["rejected"]) for p in unique) / len(unique),
        **sample_mix(samples, unique),
        **judge_metrics,
    }
    with (atomic_path(paths.pairs) as tmp_pairs, atomic_path(paths.judgements) as tmp_judgements,
          atomic_path(Path(paths.metrics) / "preferences.json") as tmp_metrics):
        dump_jsonl(unique, tmp_pairs)
        dump_jsonl(judgements, tmp_judgements)
        dump_json(metrics, tmp_metrics)
    return (f"wrote {paths.pairs}: {cfg.judge} judge, {len(unique)} pairs ({split_counts['train']} train / "
            f"{split_counts['eval']} eval) from {len(samples)} prompts; "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in judge_metrics.items()))
