"""Stage `orpo`: Odds Ratio Preference Optimization from the base model (trl.experimental.orpo).

    alignflow orpo                    # reads params.yaml: seed, orpo, paths
    dvc exp run -S orpo.lam=0.5

Reads:  `paths.pairs`, the base model `paths.base_model`: ORPO folds SFT into its loss (NLL on the chosen
        response plus lambda times the odds-ratio term), so it does not start from the SFT model.
Writes: `<paths.aligned>/orpo/` (a plain checkpoint, LoRA merged in), `<paths.metrics>/orpo.json`,
        curves under `<paths.dvclive>/orpo/`.

One model and no reference. Held-out metrics use alignflow.align.losses: the chosen NLL, the log odds
ratio of chosen over rejected, the share of pairs where it is positive, the ORPO loss, before and after.
"""

from __future__ import annotations

import logging

from alignflow.core.pairs import load_preference_splits
from alignflow.core.training import AlignmentRun, peft_lora, training_args
from alignflow.core.params import Params

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from alignflow.align.losses import orpo_metrics, response_logps

    cfg = params.orpo
    align = AlignmentRun(params, "orpo", start_from=params.paths.base_model)
    train, held_out = load_preference_splits(params.paths.pairs)
    model, tokenizer = align.load_policy()
    checkpoints = align.open_checkpoints()
    args = ORPOConfig(**training_args(params, "orpo", cfg, align.device, checkpoints.run_dir), beta=cfg.lam,
                        max_length=cfg.max_length)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=train.dataset, eval_dataset=held_out.dataset,
                          processing_class=tokenizer, peft_config=peft_lora(cfg), callbacks=align.callbacks())

    def measure() -> dict[str, float]:
        _, chosen = response_logps(trainer.model, tokenizer, held_out.prompts, held_out.chosen)
        _, rejected = response_logps(trainer.model, tokenizer, held_out.prompts, held_out.rejected)
        return orpo_metrics(chosen, rejected, cfg.lam)

    before = measure()
    result = align.train(trainer)
    after = measure()
    align.save(trainer.model, tokenizer, {
        **{f"eval_{k}": v for k, v in after.items()}, **{f"eval_{k}_before": v for k, v in before.items()},
        "train_loss": result.training_loss, "lam": cfg.lam, "train_pairs": len(train.prompts),
        "eval_pairs": len(held_out.prompts), "resumed_from_step": checkpoints.resumed_from_step, "model_copies": 1,
    })
    log.info("orpo: held-out log odds ratio %.3f -> %.3f, preference accuracy %.3f -> %.3f", before["log_odds_ratio"],
             after["log_odds_ratio"], before["preference_accuracy"], after["preference_accuracy"])
