"""Method `ppo` of align@<method>: RLHF with our PPO trainer (alignflow.align.ppo.ppo_trainer) against the reward model.

    alignflow align ppo                 # reads params.yaml: seed, ppo, paths
    dvc exp run -S ppo.kl_coef=0.1

Reads:  the train prompts of `paths.pairs` (rollouts) and its eval prompts (measured before and after),
        the SFT model `paths.sft_model`, the reward model `paths.reward_model`; with `ppo.rules_weight` > 0 whether
        each prompt is harmful (`paths.samples`), for the rules judge's refusal check.
Writes: `<paths.aligned>/ppo/` (a plain checkpoint, LoRA merged in), `<paths.metrics>/ppo.json`, and per
        iteration reward, KL, entropy, clip fraction, value loss, approximate KL and response length under
        `<paths.dvclive>/ppo/` (dvc plots show).
Keeps:  a checkpoint every `ppo.save_every` iterations under `<paths.checkpoints>/ppo/<run key>/`, written
        atomically, so a killed run resumes and ends as an uninterrupted one would; deleted once it finished.

The four models: the policy (the SFT model; LoRA by default), the reference (with LoRA the same weights
with the adapter disabled, otherwise a frozen copy of the SFT model), the frozen reward model, and the
value model. The value model starts as a copy of the reward model (InstructGPT's choice): it already maps
a conversation to a scalar of the right scale, so the critic is useful from the first iteration, while a
value head on the policy would start from random and share the policy's gradients.

The reward is the reward model's score, plus `rules_weight` times the rules judge's score (alignflow.core.judges: the
verifiable checks non-empty, no repetition, language, length, and refused if and only if the prompt is harmful), as
GPT-4's RLHF added rule-based reward models to the learned one (OpenAI, 2023). The learned reward model is trained on
pairs that the same rules ranked, and a policy can find what it overrates off their distribution; the rules term
scores each rollout directly.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import torch

from alignflow.align.policy import harmful_flags, headline, load_policy, save, start_path, train_and_eval_prompts
from alignflow.align.ppo.ppo_config import PPOConfig
from alignflow.core.checkpoints import open_live, restore_rng_states, rng_states, snapshot_curves, write_checkpoint
from alignflow.core.io import InputError
from alignflow.core.judges import rules_score
from alignflow.core.models import Source, load_tokenizer
from alignflow.core.params import Params
from alignflow.core.reward import conversation_ids, score
from alignflow.core.stats import fmt
from alignflow.core.training import TrainingRun, lora_config

log = logging.getLogger(__name__)

STATE_FILE = "ppo_state.pt"  # in each checkpoint: trainer, RNG states, data position, history (alignflow.core.checkpoints)


def ppo_config(params: Params) -> PPOConfig:
    """PPOConfig from the `ppo` section: every field of the config is a key of the section (and the seed)."""
    cfg = params.ppo
    try:
        return PPOConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PPOConfig) if f.name != "seed"},
                         seed=params.seed)
    except ValueError as err:
        raise InputError(f"params.yaml: {err}") from None


def engine_sampler(backend: str, tokenizer_path: str, temperature: float, max_new_tokens: int, batch_size: int):
    """Rollouts on an inference engine (`ppo.rollout_backend: torch-<dtype>` or `onnx-<precision>`), as OpenRLHF and
    verl sample with vLLM: each call hands the policy's current weights to the engine (a merged copy with LoRA; the
    training model is left as it is) and samples there; PPOTrainer then scores the samples with the training model's
    log-probs, so the PPO maths is the same. The seed of each call is drawn from torch's seeded generator (restored on
    resume)."""
    import copy

    from alignflow.core.generation import local_generator

    def sample(policy, prompts: list[list[int]]) -> list[list[int]]:
        weights = copy.deepcopy(policy)  # the engine may cast or switch modes; the training model stays as it is
        weights = weights.merge_and_unload() if hasattr(weights, "merge_and_unload") else weights
        engine = local_generator(backend, tokenizer_path, temperature=temperature, top_p=1.0, batch_size=batch_size,
                                 chat_template=False, seed=0, model=weights)
        return engine.sample_ids(prompts, max_new_tokens=max_new_tokens, seed=int(torch.randint(0, 2**31 - 1, ()).item()))

    return sample


def run(params: Params) -> str | None:
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from alignflow.align.ppo.ppo_trainer import PPOTrainer

    cfg, paths = params.ppo, params.paths
    config = ppo_config(params)
    if not (Path(paths.reward_model) / "config.json").is_file():
        raise InputError(f"{paths.reward_model}: no reward model; PPO needs one (dvc repro reward_model)")
    start = start_path(params, "sft")
    # fp32 whatever distributed.mixed_precision says: PPO's ratio compares a token's log-prob before and after a few
    # small updates, and in bf16 autocast the difference rounds away (measured on the default run: approximate KL and
    # clip fraction exactly 0 in every iteration, so the clipped objective never clipped)
    inputs = [paths.pairs, start, paths.reward_model] + ([paths.samples] if cfg.rules_weight else [])
    run = TrainingRun(params, "ppo", inputs, marker=STATE_FILE, mixed_precision=False)
    train_prompts, eval_prompts = train_and_eval_prompts(paths.pairs)
    harmful = harmful_flags(paths.samples) if cfg.rules_weight else {}

    policy, tokenizer = load_policy(run, start)
    ref_model = None
    if cfg.method == "lora":
        policy = get_peft_model(policy, lora_config(cfg))
    else:
        ref_model = load_policy(run, start)[0].requires_grad_(False)
    reward_model = AutoModelForSequenceClassification.from_pretrained(paths.reward_model).to(run.device).requires_grad_(False).eval()
    value_model = AutoModelForSequenceClassification.from_pretrained(paths.reward_model).to(run.device)
    rm_tokenizer = load_tokenizer(Source(paths.reward_model))

    def prompt_ids(messages):
        return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]

    messages_of = {tuple(prompt_ids(m)): m for m in train_prompts + eval_prompts}

    def reward_fn(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        texts = [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
        messages = [messages_of[tuple(p)] for p in prompts]
        rewards = torch.tensor(score(reward_model, rm_tokenizer, [conversation_ids(rm_tokenizer, m, t) for m, t in zip(messages, texts)]))
        if cfg.rules_weight:  # + the rules judge's verifiable checks (a rule-based reward beside the learned one)
            rewards += cfg.rules_weight * torch.tensor([float(rules_score(m, t, harmful.get(repr(m), False), params.preferences))
                                                        for m, t in zip(messages, texts)])
        return rewards

    sampler = None if cfg.rollout_backend == "policy" else engine_sampler(cfg.rollout_backend, start, cfg.temperature,
                                                                          cfg.max_new_tokens, cfg.batch_size)
    trainer = PPOTrainer(config, policy, value_model, reward_fn, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.eos_token), ref_model=ref_model, sampler=sampler)

    eval_ids = [prompt_ids(m) for m in eval_prompts]

    def held_out_rewards() -> list[float]:
        torch.manual_seed(params.seed)  # the same draw before and after
        return trainer.rollout(eval_ids).scores.tolist()

    from tqdm import tqdm

    rewards_before = held_out_rewards()
    order = random.Random(params.seed)
    pool: list[list[int]] = []
    history = []
    first_iteration = 0
    checkpoints = run.checkpoints
    if checkpoints.resume:  # everything a step reads: weights, optimizer, beta, RNGs, the prompt order and pool
        state = torch.load(checkpoints.resume / STATE_FILE, weights_only=True)
        trainer.load_state_dict(state["trainer"])
        restore_rng_states(state["rng"])
        version, internal, gauss = state["order"]
        order.setstate((version, tuple(internal), gauss))
        first_iteration, pool, history = state["iteration"], state["pool"], state["history"]
    live_dir = Path(paths.dvclive) / "ppo"

    def write_state(tmp: Path, done: int) -> None:
        torch.save({"iteration": done, "trainer": trainer.state_dict(), "rng": rng_states(),
                    "order": order.getstate(), "pool": pool, "history": history}, tmp / STATE_FILE)
        snapshot_curves(live_dir, tmp)

    with open_live(live_dir, checkpoints.resume) as live, run.timed():
        for iteration in tqdm(range(first_iteration, cfg.iterations), desc="ppo", unit="iteration", initial=first_iteration,
                              total=cfg.iterations):
            while len(pool) < cfg.batch_size:  # cycle through the train prompts, reshuffled each pass
                batch = [prompt_ids(m) for m in train_prompts]
                order.shuffle(batch)
                pool.extend(batch)
            stats = trainer.step(pool[: cfg.batch_size])
            pool = pool[cfg.batch_size :]
            history.append(stats)
            for key, value in stats.items():
                live.log_metric(key, value)
            live.next_step()
            log.info("iteration %d: reward %.3f, KL %.3f, entropy %.3f, clip %.3f, value loss %.4f, approx KL %.4f, length %.1f",
                     iteration, stats["reward"], stats["kl"], stats["entropy"], stats["clip_fraction"], stats["value_loss"],
                     stats["approx_kl"], stats["response_length"])
            if (iteration + 1) % cfg.save_every == 0 and iteration + 1 < cfg.iterations:
                write_checkpoint(checkpoints.run_dir, iteration + 1, lambda tmp: write_state(tmp, iteration + 1))
    rewards_after = held_out_rewards()
    before, after = sum(rewards_before) / len(rewards_before), sum(rewards_after) / len(rewards_after)
    head = headline("held-out reward", rewards_before, rewards_after, params.seed)
    first, last = history[: max(1, len(history) // 4)], history[-max(1, len(history) // 4) :]
    save(params, run, "ppo", start, policy, tokenizer, {
        "eval_reward_before": before, "eval_reward": after,
        "headline": head,
        "train_reward_first_quarter": sum(h["reward"] for h in first) / len(first),
        "train_reward_last_quarter": sum(h["reward"] for h in last) / len(last),
        "final_kl": history[-1]["kl"], "final_beta": history[-1]["beta"], "iterations": cfg.iterations,
        "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts),
        "resumed_from_iteration": checkpoints.resumed_from_step,
        # policy + reference (0 extra with LoRA) + reward model + value model
        "model_copies": (3 if cfg.method == "lora" else 4),
    })
    return (f"wrote {Path(params.paths.aligned) / 'ppo'}: held-out reward {before:.3f} -> {after:.3f} (paired change "
            f"{fmt(head['change'])}) in {cfg.iterations} iterations")
