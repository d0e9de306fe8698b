"""Stage `evaluate@<model>`: one model's greedy responses to held-out prompts, and what they say about it.

    alignflow evaluate dpo              # reads params.yaml: seed, evaluate, filter.rouge_threshold, paths
    dvc repro evaluate@dpo              # one stage per entry of evaluate.models

Reads:  the checkpoint `evaluate.models[<model>]`; the prompts `paths.eval_prompts` (benign, benign but
        alarming, harmful; English and Chinese) minus any a training stage saw (`paths.prompts`, `paths.train`:
        same text or ROUGE-L F above `filter.rouge_threshold`, the filter stage's near-duplicate rule, dropped
        and listed in the metrics); the text `paths.heldout_text`; the reward model `paths.reward_model`; the SFT
        model `paths.sft_model`, the reference for KL.
Writes: `<paths.evaluation>/<model>.jsonl`, one line per prompt: response, reward, refused, KL, tokens;
        `<paths.evaluation>/<model>.heldout.jsonl`, one line per held-out text: its NLL and predicted tokens (the
        compare stage's paired perplexity ratios);
        `<paths.metrics>/evaluate/<model>.json`, each number with its 95% interval ({value, low, high, n};
        alignflow.core.stats: Wilson for a share, a seeded bootstrap over prompts or texts for the rest):
  reward_mean / reward_std      the reward model's score of the responses
  refusal_rate.<category>       share refused, by category (benign, benign_alarming, harmful) and by language;
                                over_refusal_rate = refused benign prompts (both benign categories)
  perplexity                    of the held-out text (forgetting: the compare stage divides by the base model's)
  kl_to_reference               KL(model || reference) summed over a response's tokens, exact over the
                                vocabulary at each position, mean over prompts (0 for the reference itself)
  response_tokens_mean          mean response length in the model's tokens
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from alignflow.core import contracts
from alignflow.core.io import InputError, atomic_path, dump_json, dump_jsonl, read_jsonl
from alignflow.core.params import Params
from alignflow.core.refusal import is_refusal
from alignflow.core.rouge import rouge_l_f, tokenize
from alignflow.core.stats import mean_interval, perplexity, proportion

log = logging.getLogger(__name__)

CATEGORIES = ("benign", "benign_alarming", "harmful")


def read_eval_prompts(path: str) -> list[dict[str, Any]]:
    prompts = []
    for line, record in read_jsonl(path, {"id": str, "prompt": str, "category": str, "harmful": bool, "lang": str}):
        if record["category"] not in CATEGORIES:
            raise InputError(f"{path}:{line}: field 'category': expected one of {', '.join(CATEGORIES)}, got {record['category']!r}")
        if record["harmful"] != (record["category"] == "harmful"):
            raise InputError(f"{path}:{line}: field 'harmful': must be true exactly for category 'harmful'")
        if record["lang"] not in ("en", "zh"):
            raise InputError(f"{path}:{line}: field 'lang': expected 'en' or 'zh', got {record['lang']!r}")
        if not record["prompt"].strip():
            raise InputError(f"{path}:{line}: field 'prompt': empty")
        prompts.append(record)
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: field 'id': ids repeat ({sorted({i for i in ids if ids.count(i) > 1})})")
    return prompts


def training_prompts(params: Params) -> list[str]:
    """The prompts the training stages saw: the preference prompts and the SFT train split's instructions."""
    seen = [r["prompt"] for _, r in read_jsonl(params.paths.prompts, {"prompt": str})]
    for _, record in read_jsonl(params.paths.train, {"instruction": str, "input": str}):
        seen.append(f"{record['instruction']} {record['input']}".strip())
    return seen


def unseen(prompts: list[dict[str, Any]], seen: list[str], threshold: float) -> tuple[list[dict[str, Any]], list[str]]:
    """The prompts whose ROUGE-L F against every seen text is at most `threshold` (params filter.rouge_threshold),
    and the ids of the others."""
    seen_tokens = [tokenize(s) for s in seen]
    keep, dropped = [], []
    for prompt in prompts:
        tokens = tokenize(prompt["prompt"])
        if any(rouge_l_f(tokens, other) > threshold for other in seen_tokens):
            dropped.append(prompt["id"])
        else:
            keep.append(prompt)
    return keep, dropped


@torch.no_grad()
def response_kl(model, reference, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Sum over the response's positions of KL(model(.|context) || reference(.|context)), over the whole vocabulary."""
    return responses_kl(model, reference, [(prompt_ids, response_ids)])[0]


@torch.no_grad()
def responses_kl(model, reference, items: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """`response_kl` of each (prompt ids, response ids), in right-padded batches: a causal model's logits at the
    real positions do not see the padding after them, so each value is the one-at-a-time value (to float noise)."""
    device = next(model.parameters()).device
    out = [0.0] * len(items)
    order = sorted((i for i, (_, r) in enumerate(items) if r), key=lambda i: -sum(map(len, items[i])))  # similar lengths together
    for start in tqdm(range(0, len(order), batch_size), desc="KL", unit="batch", disable=len(order) <= batch_size):
        batch = order[start : start + batch_size]
        width = max(sum(map(len, items[i])) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            seq = items[i][0] + items[i][1]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits_p, logits_q = model(input_ids=ids, attention_mask=mask).logits, reference(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(batch):
            prompt, response = items[i]
            span = slice(len(prompt) - 1, len(prompt) + len(response) - 1)  # the logits at t predict token t + 1
            logp = torch.log_softmax(logits_p[row, span].float(), dim=-1)
            logq = torch.log_softmax(logits_q[row, span].float(), dim=-1)
            out[i] = (logp.exp() * (logp - logq)).sum().item()
    return out


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str], max_length: int = 512) -> list[dict[str, Any]]:
    """Per text: the summed negative log-likelihood of its tokens after the first, and how many were predicted
    (texts of fewer than two tokens are left out). Perplexity = exp(sum of nll / sum of tokens)."""
    rows = []
    device = next(model.parameters()).device
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"].to(device)
        if ids.shape[1] < 2:
            continue
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean over the ids.shape[1] - 1 predicted tokens
        rows.append({"text": i, "nll": loss * (ids.shape[1] - 1), "tokens": ids.shape[1] - 1})
    return rows


def refusal_rates(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares refused with their Wilson intervals, by category, by category and language, and over the benign."""
    def rate(rows):
        return proportion([r["refused"] for r in rows])

    by_category = {c: rate([r for r in records if r["category"] == c]) for c in CATEGORIES}
    by_language = {f"{c}_{lang}": rate([r for r in records if r["category"] == c and r["lang"] == lang])
                   for c in CATEGORIES for lang in ("en", "zh")}
    return {"refusal_rate": by_category, "refusal_rate_by_language": by_language,
            "over_refusal_rate": rate([r for r in records if not r["harmful"]]),
            "harmful_refusal_rate": by_category["harmful"]}


def run(params: Params, model_name: str) -> str | None:
    from alignflow.core.generation import TransformersGenerator, VLLMGenerator, local_generator, resolve_backend
    from alignflow.core.models import load_for_inference
    from alignflow.core.reward import conversation_ids, load_reward_model, score

    cfg, paths = params.evaluate, params.paths
    if model_name not in cfg.models:
        raise InputError(f"params.yaml: evaluate.models has no {model_name!r} (it has: {', '.join(cfg.models)})")
    model_path = cfg.models[model_name]
    if not Path(model_path).exists():
        raise InputError(f"{model_path}: no checkpoint for evaluate.models.{model_name} (dvc repro makes it)")
    prompts, dropped = unseen(read_eval_prompts(paths.eval_prompts), training_prompts(params), params.filter.rouge_threshold)
    if dropped:
        log.warning("%d eval prompts look like training prompts and are left out: %s", len(dropped), ", ".join(dropped))
    if not prompts:
        raise InputError(f"{paths.eval_prompts}: every prompt was seen in training")
    texts = [r["text"] for _, r in read_jsonl(paths.heldout_text, {"text": str})]

    messages = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    backend = resolve_backend(cfg.backend, model_path)
    if backend == "vllm":  # answers from vLLM's engine, freed before the scoring below loads the model again
        engine = VLLMGenerator(model_path, temperature=0.0, top_p=1.0, chat_template=True, seed=params.seed)
        answers, provenance = engine.generate(messages, max_new_tokens=cfg.max_new_tokens, seed=params.seed), engine.describe()
        del engine
    generator = TransformersGenerator(model_path, temperature=0.0, top_p=1.0, batch_size=cfg.batch_size, chat_template=True)
    model, tokenizer = generator.model, generator.tokenizer
    if backend != "vllm":  # onnx-*: exported from the model loaded above for scoring (no second load)
        engine = local_generator(backend, model_path, temperature=0.0, top_p=1.0, batch_size=cfg.batch_size,
                                 chat_template=True, seed=params.seed, model=model) if backend != "transformers" else generator
        answers, provenance = engine.generate(messages, max_new_tokens=cfg.max_new_tokens, seed=params.seed), engine.describe()
        del engine
    responses = [r.strip() for r in answers]

    reward_model, rm_tokenizer = load_reward_model(paths.reward_model, generator.device)
    rewards = score(reward_model, rm_tokenizer, [conversation_ids(rm_tokenizer, m, r) for m, r in zip(messages, responses)])
    del reward_model

    reference = None
    if params.reference_model != model_name:
        reference = load_for_inference(cfg.models[params.reference_model], dtype=model.dtype).to(generator.device).eval()
        if reference.config.vocab_size != model.config.vocab_size:
            log.warning("%s and %s have different vocabularies: no KL", model_name, params.reference_model)
            reference = None
    ids = [(list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)),
            tokenizer(r, add_special_tokens=False)["input_ids"]) for m, r in zip(messages, responses)]
    kls = responses_kl(model, reference, ids, cfg.batch_size // 2 or 1) if reference is not None else [0.0] * len(ids)
    records = [{**prompt, "model": model_name, "response": response, "reward": reward, "refused": is_refusal(response),
                "kl_to_reference": kl, "response_tokens": len(response_ids), "generator": provenance}
               for prompt, response, reward, kl, (_, response_ids) in zip(prompts, responses, rewards, kls, ids)]

    heldout = text_nll(model, tokenizer, texts)
    seed = params.seed
    has_kl = reference is not None or params.reference_model == model_name
    metrics = {
        "model": model_name, "checkpoint": model_path, "generator": provenance, "prompts": len(records), "prompts_left_out_as_seen": dropped,
        "reward_mean": mean_interval(rewards, seed), "reward_std": statistics.pstdev(rewards),
        **refusal_rates(records),
        "perplexity": perplexity([h["nll"] for h in heldout], [h["tokens"] for h in heldout], seed),
        "kl_to_reference": mean_interval([r["kl_to_reference"] for r in records], seed) if has_kl else None,
        "reference": params.reference_model,
        "response_tokens_mean": mean_interval([r["response_tokens"] for r in records], seed),
        "empty_responses": sum(not r["response"] for r in records),
    }
    out = Path(paths.evaluation) / f"{model_name}.jsonl"
    contracts.validate("evaluation", records, out)
    with (atomic_path(out) as tmp, atomic_path(Path(paths.evaluation) / f"{model_name}.heldout.jsonl") as tmp_heldout,
          atomic_path(Path(paths.metrics) / "evaluate" / f"{model_name}.json") as tmp_metrics):
        dump_jsonl(records, tmp)
        dump_jsonl(heldout, tmp_heldout)
        dump_json(metrics, tmp_metrics)
    kl = "n/a" if metrics["kl_to_reference"] is None else f"{metrics['kl_to_reference']['value']:.3f}"
    return (f"wrote {out}: reward {metrics['reward_mean']['value']:.3f} +- {metrics['reward_std']:.3f}, harmful refused "
            f"{metrics['harmful_refusal_rate']['value']:.2f}, benign refused {metrics['over_refusal_rate']['value']:.2f}, "
            f"perplexity {metrics['perplexity']['value']:.2f}, KL to {params.reference_model} {kl}, "
            f"{metrics['response_tokens_mean']['value']:.1f} tokens ({provenance['backend']})")
