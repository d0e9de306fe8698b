"""Train any TRL-backed preference method of the table (dpo, ipo, orpo, simpo) on the pairs.

    alignflow align dpo             # reads params.yaml: seed, <method>, paths

Reads:  `paths.pairs` (train pairs to learn from, eval pairs to measure on), the model the method starts from.
Writes: see alignflow.align.policy: `<paths.aligned>/<method>/`, `<paths.metrics>/<method>.json`; curves under
        `<paths.dvclive>/<method>/`; checkpoints while it trains (alignflow.core.training).

With `method: lora` the policy is a LoRA adapter on the starting model, and the reference (DPO, IPO) is the same
weights with the adapter disabled, so one copy is held. Held-out metrics, before and after training, use the
formulas of the method's entry in alignflow.align.methods on the eval pairs' log-probs; the headline the report
shows is also computed pair by pair, for its 95% intervals and the paired change (alignflow.core.stats).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from alignflow.align.logprobs import response_logps
from alignflow.align.methods import Method, load
from alignflow.align.policy import headline, load_policy, reference, save, start_path
from alignflow.core.pairs import load_preference_splits
from alignflow.core.params import Params
from alignflow.core.stats import fmt
from alignflow.core.training import TrainingRun, lora_config

log = logging.getLogger(__name__)


@dataclass
class HeldOutLogps:
    """Log-probs of the eval pairs' responses: sums and per-token means, under the policy and (if asked) the reference."""

    pi_chosen: torch.Tensor
    pi_rejected: torch.Tensor
    pi_chosen_mean: torch.Tensor
    pi_rejected_mean: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    ref_chosen_mean: torch.Tensor | None = None
    ref_rejected_mean: torch.Tensor | None = None


def held_out_logps(trainer, tokenizer, split, with_reference: bool) -> HeldOutLogps:
    pi_c, pi_c_mean = response_logps(trainer.model, tokenizer, split.prompts, split.chosen)
    pi_r, pi_r_mean = response_logps(trainer.model, tokenizer, split.prompts, split.rejected)
    logps = HeldOutLogps(pi_c, pi_r, pi_c_mean, pi_r_mean)
    if with_reference:
        with reference(trainer) as ref:
            logps.ref_chosen, logps.ref_chosen_mean = response_logps(ref, tokenizer, split.prompts, split.chosen)
            logps.ref_rejected, logps.ref_rejected_mean = response_logps(ref, tokenizer, split.prompts, split.rejected)
    return logps


def pair(logps: HeldOutLogps, i: int) -> HeldOutLogps:
    """The log-probs of eval pair i alone."""
    return HeldOutLogps(**{f.name: None if getattr(logps, f.name) is None else getattr(logps, f.name)[i : i + 1]
                           for f in fields(HeldOutLogps)})


def per_pair(method: Method, cfg, logps: HeldOutLogps) -> list[float]:
    """The method's headline metric (a mean over the eval pairs) of each eval pair alone."""
    key = method.headline[0]
    return [method.held_out(pair(logps, i), cfg)[key] for i in range(len(logps.pi_chosen))]


def run(params: Params, method: Method) -> str | None:
    cfg = getattr(params, method.name)
    start = start_path(params, method.start_from)
    run = TrainingRun(params, method.name, [params.paths.pairs, start])
    train, held_out = load_preference_splits(params.paths.pairs)
    model, tokenizer = load_policy(run, start)
    args = load(method.config)(**run.arguments(cfg, **method.options(cfg)))
    trainer = load(method.trainer)(model=model, args=args, train_dataset=train.dataset, eval_dataset=held_out.dataset,
                                   processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=run.callbacks())

    logps_before = held_out_logps(trainer, tokenizer, held_out, method.reference)
    train_loss = run.train(trainer)
    logps_after = held_out_logps(trainer, tokenizer, held_out, method.reference)
    before, after = method.held_out(logps_before, cfg), method.held_out(logps_after, cfg)
    head = headline(method.headline[1], per_pair(method, cfg, logps_before), per_pair(method, cfg, logps_after), params.seed)
    copies = 2 if method.reference and cfg.method != "lora" else 1  # a frozen reference copy only for full fine-tuning
    save(params, run, method.name, start, trainer.model, tokenizer, {
        **{f"eval_{k}": v for k, v in after.items()}, **{f"eval_{k}_before": v for k, v in before.items()},
        "headline": head,
        "train_loss": train_loss, **method.options(cfg), "train_pairs": len(train.prompts),
        "eval_pairs": len(held_out.prompts), "model_copies": copies,
    })
    return (f"wrote {Path(params.paths.aligned) / method.name}: {head['label']} {fmt(head['before'])} -> {fmt(head['after'])} "
            f"(paired change {fmt(head['change'])})")
