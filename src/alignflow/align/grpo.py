"""Method `grpo` of align@<method>: Group Relative Policy Optimization (Shao et al., 2024) with TRL's GRPOTrainer.

    alignflow align grpo                # reads params.yaml: seed, grpo, preferences.rules_*, paths
    dvc exp run -S grpo.reward=rules    # the rules judge's checks as a verifiable reward instead of the reward model

Reads:  the train prompts of `paths.pairs` (the same prompts PPO samples from) and their eval prompts (measured
        before and after), the SFT model `paths.sft_model`, the reward model `paths.reward_model`; for
        `reward: rules` whether each prompt is harmful (`paths.samples`).
Writes: `<paths.aligned>/grpo/`, `<paths.metrics>/grpo.json`, curves under `<paths.dvclive>/grpo/` (alignflow.align.policy).

For each prompt GRPO samples `num_generations` responses, scores them, and uses each response's reward minus the
group's mean (over the group's standard deviation) as its advantage: no value model, unlike PPO. `beta` > 0 adds
the KL to the SFT model (with LoRA: the adapter disabled, no second copy). The held-out number is the mean reward
of greedy responses to the eval prompts, the same reward the method maximises.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignflow.align.methods import load, method
from alignflow.align.policy import harmful_flags, headline, load_policy, save, start_path, train_and_eval_prompts
from alignflow.core.io import InputError
from alignflow.core.judges import rules_score
from alignflow.core.models import Source, load_tokenizer
from alignflow.core.params import Params
from alignflow.core.reward import conversation_ids, score
from alignflow.core.stats import fmt
from alignflow.core.training import TrainingRun, lora_config

log = logging.getLogger(__name__)


def reward_function(params: Params, device: str):
    """f(prompts, completions, harmful) -> rewards, as TRL calls it: the reward model's score of the conversation
    (the same tokens as PPO and the evaluation: core.reward.conversation_ids), or the rules judge's score."""
    if params.grpo.reward == "rules":
        def rules(prompts, completions, harmful, **_):
            return [float(rules_score(p, c[-1]["content"], h, params.preferences)) for p, c, h in zip(prompts, completions, harmful)]

        return rules
    from transformers import AutoModelForSequenceClassification

    paths = params.paths
    if not (Path(paths.reward_model) / "config.json").is_file():
        raise InputError(f"{paths.reward_model}: no reward model; GRPO with reward: reward_model needs one (dvc repro reward_model)")
    model = AutoModelForSequenceClassification.from_pretrained(paths.reward_model).to(device).requires_grad_(False).eval()
    tokenizer = load_tokenizer(Source(paths.reward_model))

    def reward_model(prompts, completions, **_):
        ids = [conversation_ids(tokenizer, p, c[-1]["content"].strip()) for p, c in zip(prompts, completions)]
        return score(model, tokenizer, ids)

    return reward_model


@torch.no_grad()
def greedy(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only batches are padded on the left
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.extend(tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    tokenizer.padding_side = side  # the trainer's own setting again
    return out


def run(params: Params) -> str | None:
    from datasets import Dataset

    cfg, paths, entry = params.grpo, params.paths, method("grpo")
    if cfg.batch_size % cfg.num_generations:
        raise InputError(f"params.yaml: grpo.batch_size={cfg.batch_size} is not a multiple of grpo.num_generations="
                         f"{cfg.num_generations} (each step takes whole groups)")
    start = start_path(params, entry.start_from)
    inputs = [paths.pairs, start] + ([paths.samples] if cfg.reward == "rules" else [paths.reward_model])
    run = TrainingRun(params, "grpo", inputs)
    train_prompts, eval_prompts = train_and_eval_prompts(paths.pairs)
    harmful = harmful_flags(paths.samples) if cfg.reward == "rules" else {}
    rows = [{"prompt": p, "harmful": harmful.get(repr(p), False)} for p in train_prompts]
    eval_rows = [{"prompt": p, "harmful": harmful.get(repr(p), False)} for p in eval_prompts]
    model, tokenizer = load_policy(run, start)
    reward = reward_function(params, run.device)
    args = load(entry.config)(**run.arguments(cfg, **entry.options(cfg), eval_strategy="no", log_completions=False))
    trainer = load(entry.trainer)(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=run.callbacks())

    def held_out_rewards() -> list[float]:
        answers = greedy(trainer.model, tokenizer, eval_prompts, cfg.max_new_tokens)
        return reward([r["prompt"] for r in eval_rows], [[{"role": "assistant", "content": a}] for a in answers],
                      harmful=[r["harmful"] for r in eval_rows])

    rewards_before = held_out_rewards()
    train_loss = run.train(trainer)
    rewards_after = held_out_rewards()
    before, after = sum(rewards_before) / len(rewards_before), sum(rewards_after) / len(rewards_after)
    head = headline("held-out reward", rewards_before, rewards_after, params.seed)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    save(params, run, "grpo", start, trainer.model, tokenizer, {
        "eval_reward_before": before, "eval_reward": after,
        "headline": head,
        "train_loss": train_loss, "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None, "reward": cfg.reward, **entry.options(cfg),
        "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts), "steps": trainer.state.global_step,
        # policy (+ the reference: the adapter disabled with LoRA) + the reward model
        "model_copies": (1 if cfg.method == "lora" or cfg.beta == 0 else 2) + (cfg.reward == "reward_model"),
    })
    return (f"wrote {Path(params.paths.aligned) / 'grpo'}: held-out reward {before:.3f} -> {after:.3f} ({cfg.reward}; "
            f"paired change {fmt(head['change'])}), "
            f"{trainer.state.global_step} steps")
