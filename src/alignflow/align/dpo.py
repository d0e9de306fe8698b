"""Stage `dpo`: Direct Preference Optimization of the SFT model on the preference pairs (TRL DPOTrainer).

    alignflow dpo                   # reads params.yaml: seed, dpo, paths
    dvc exp run -S dpo.beta=0.3     # reruns dpo and what depends on it, nothing else

Reads:  `paths.pairs` (train pairs to learn from, eval pairs to measure on), the SFT model `paths.sft_model`
        (on `paths.base_model`).
Writes: `<paths.aligned>/dpo/` (a peft LoRA adapter on the merged SFT weights, or a full checkpoint; load with
        `alignflow.core.models.load_trained`), `<paths.metrics>/dpo.json`, curves under `<paths.dvclive>/dpo/`.

Two models: the policy and the reference (the SFT model). With `method: lora` the reference is the same
weights with the adapter disabled, so one copy is held. Held-out metrics use alignflow.align.losses:
implicit rewards beta * (log pi - log ref), their accuracy and margin, the DPO loss, before and after.
"""

from __future__ import annotations

import logging

from alignflow.core.params import Params
from alignflow.core.pairs import load_preference_splits
from alignflow.core.training import AlignmentRun, peft_lora, training_args

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from trl import DPOConfig, DPOTrainer

    from alignflow.align.losses import dpo_metrics, response_logps

    cfg = params.dpo
    align = AlignmentRun(params, "dpo", start_from=params.paths.sft_model)
    train, held_out = load_preference_splits(params.paths.pairs)
    model, tokenizer = align.load_policy()
    checkpoints = align.open_checkpoints()
    args = DPOConfig(**training_args(params, "dpo", cfg, align.device, checkpoints.run_dir), beta=cfg.beta,
                       max_length=cfg.max_length)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train.dataset, eval_dataset=held_out.dataset,
                         processing_class=tokenizer, peft_config=peft_lora(cfg), callbacks=align.callbacks())
    policy = trainer.model

    def measure() -> dict[str, float]:
        pi_c, _ = response_logps(policy, tokenizer, held_out.prompts, held_out.chosen)
        pi_r, _ = response_logps(policy, tokenizer, held_out.prompts, held_out.rejected)
        with align.reference(trainer) as ref:
            ref_c, _ = response_logps(ref, tokenizer, held_out.prompts, held_out.chosen)
            ref_r, _ = response_logps(ref, tokenizer, held_out.prompts, held_out.rejected)
        return dpo_metrics(pi_c, pi_r, ref_c, ref_r, cfg.beta)

    before = measure()
    result = align.train(trainer)
    after = measure()
    align.save(trainer.model, tokenizer, {
        **{f"eval_{k}": v for k, v in after.items()}, **{f"eval_{k}_before": v for k, v in before.items()},
        "train_loss": result.training_loss, "beta": cfg.beta, "train_pairs": len(train.prompts),
        "eval_pairs": len(held_out.prompts), "model_copies": 1 if cfg.method == "lora" else 2,
        "resumed_from_step": checkpoints.resumed_from_step,
    })
    log.info("dpo: held-out reward accuracy %.3f -> %.3f, margin %.4f -> %.4f", before["reward_accuracy"],
             after["reward_accuracy"], before["reward_margin"], after["reward_margin"])
