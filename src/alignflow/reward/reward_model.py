"""Stage `reward_model`: a Bradley-Terry reward model on the preference pairs, with TRL's RewardTrainer.

    alignflow reward_model                      # reads params.yaml: seed, reward_model, paths
    dvc exp run -S reward_model.method=full

Reads:  `paths.pairs` (train pairs to learn from, eval pairs to measure on), the SFT model `paths.sft_model`
        (on `paths.base_model`), whose weights the reward model starts from.
Writes: `paths.reward_model/`: a plain `AutoModelForSequenceClassification` checkpoint with one output
        (LoRA merged in) + tokenizer + `alignflow_model.json`; `<paths.metrics>/reward_model.json`;
        `<paths.plots>/reward_model/rewards.json` (each eval pair's two rewards, a scatter for `dvc plots`) and
        `reward_distributions.png`; training curves under `<paths.dvclive>/reward_model/`.
Keeps:  trainer checkpoints every `reward_model.save_steps` under `<paths.checkpoints>/reward_model/<run key>/`
        (alignflow.core.checkpoints), so a killed run resumes; deleted once the stage has finished.

Loss: -log sigmoid(r_chosen - r_rejected) (+ c * mean((r_chosen + r_rejected)^2) to centre the rewards).
Methods: `full` (every weight) or `lora` (LoRA on the backbone; the score head always trains fully).
Metrics on the held-out pairs: accuracy (reward of chosen > rejected), mean margin, and on the same pairs
two baselines, always-prefer-the-longer-response and a seeded coin, so a model that only learned length
shows; `prefers_longer_rate` says how often the reward model itself picks the longer response. Each with its
95% interval (Wilson for a share, a seeded bootstrap over pairs for a mean), and `accuracy_over_longer`, the
paired gain over the longer-answer baseline.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from alignflow.core.io import InputError, atomic_path, dump_json
from alignflow.core.launch import is_main_process
from alignflow.core.pairs import load_preference_splits
from alignflow.core.params import Params
from alignflow.core.reward import conversation_ids, from_causal_lm, score
from alignflow.core.stats import fmt, mean_interval, paired_difference, proportion
from alignflow.core.training import TrainingRun, chat_tokenizer, lora_config

log = logging.getLogger(__name__)


def load_pairs(path: str, tokenizer, max_length: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(train, eval, dropped): tokenised pairs; pairs longer than max_length are dropped and counted."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    dropped = 0
    for name, split in zip(splits, load_preference_splits(path)):
        for prompt, good, bad in zip(split.prompts, split.chosen, split.rejected):
            chosen, rejected = conversation_ids(tokenizer, prompt, good), conversation_ids(tokenizer, prompt, bad)
            if max(len(chosen), len(rejected)) > max_length:
                dropped += 1
                continue
            splits[name].append({"chosen_ids": chosen, "rejected_ids": rejected, "chosen_chars": len(good), "rejected_chars": len(bad)})
    for name, rows in splits.items():
        if not rows:
            raise InputError(f"{path}: no {name} pairs of at most reward_model.max_length={max_length} tokens")
    return splits["train"], splits["eval"], dropped


def pairwise_metrics(pairs: list[dict[str, Any]], chosen: list[float], rejected: list[float], seed: int) -> dict[str, Any]:
    """Accuracy and margin of the rewards, and the two baselines on the same pairs (the longer answer: ties count
    half), each with its 95% interval (alignflow.core.stats); accuracy_over_longer is the paired gain over the
    longer-answer baseline, pair by pair."""
    coin = random.Random(seed)
    right = [c > r for c, r in zip(chosen, rejected)]
    longer = [1.0 if p["chosen_chars"] > p["rejected_chars"] else 0.5 if p["chosen_chars"] == p["rejected_chars"] else 0.0
              for p in pairs]
    picks_longer = [(c > r) == (p["chosen_chars"] > p["rejected_chars"]) for p, c, r in zip(pairs, chosen, rejected)
                    if p["chosen_chars"] != p["rejected_chars"]]
    n = len(pairs)
    return {
        "accuracy": proportion(right),
        "accuracy_over_longer": paired_difference([float(x) for x in right], longer, seed),
        "mean_margin": mean_interval([c - r for c, r in zip(chosen, rejected)], seed),
        "baseline_longer_accuracy": mean_interval(longer, seed),
        "baseline_random_accuracy": proportion([coin.random() < 0.5 for _ in pairs]),
        "prefers_longer_rate": proportion(picks_longer),
        "mean_reward_chosen": sum(chosen) / n, "mean_reward_rejected": sum(rejected) / n,
    }


def plot_distributions(chosen: list[float], rejected: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = 20
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {sum(chosen) / len(chosen):.2f})", color="tab:green")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {sum(rejected) / len(rejected):.2f})", color="tab:red")
    ax.set_xlabel("reward")
    ax.set_ylabel("held-out responses")
    ax.set_title("Reward model: held-out pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)


def make_trainer(params: Params, run: TrainingRun, model, tokenizer, train_rows, eval_rows):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cfg = params.reward_model
    config = RewardConfig(**run.arguments(cfg, max_length=cfg.max_length,
                                          center_rewards_coefficient=cfg.center_rewards_coefficient or None))
    keep = ["chosen_ids", "rejected_ids"]
    return RewardTrainer(
        model=model, args=config, processing_class=tokenizer,
        peft_config=lora_config(cfg, "SEQ_CLS", modules_to_save=["score"]),  # the new score head always trains fully
        callbacks=run.callbacks(),
        train_dataset=Dataset.from_list([{k: r[k] for k in keep} for r in train_rows]),
        eval_dataset=Dataset.from_list([{k: r[k] for k in keep} for r in eval_rows]),
    )


def run(params: Params) -> str | None:
    cfg, paths = params.reward_model, params.paths
    tokenizer = chat_tokenizer(paths.sft_model)
    train_rows, eval_rows, dropped = load_pairs(paths.pairs, tokenizer, cfg.max_length)

    run = TrainingRun(params, "reward_model", [paths.pairs, paths.sft_model])  # seeds torch: the new score head
    model = from_causal_lm(paths.sft_model, dtype=run.dtype).to(run.device)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = make_trainer(params, run, model, tokenizer, train_rows, eval_rows)
    log.info("reward model (%s) on %s: %d train / %d eval pairs (%d longer than %d tokens dropped)",
             cfg.method, run.device, len(train_rows), len(eval_rows), dropped, cfg.max_length)

    def measure(rows):
        rewards = score(trainer.model, tokenizer, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], cfg.batch_size)
        return rewards[: len(rows)], rewards[len(rows) :]

    before = pairwise_metrics(eval_rows, *measure(eval_rows), params.seed)
    train_loss = run.train(trainer)
    eval_chosen, eval_rejected = measure(eval_rows)
    held_out = pairwise_metrics(eval_rows, eval_chosen, eval_rejected, params.seed)
    train_acc = pairwise_metrics(train_rows, *measure(train_rows), params.seed)["accuracy"]

    model = trainer.model.merge_and_unload() if cfg.method == "lora" else trainer.model
    metrics = {
        "method": cfg.method, **{f"eval_{k}": v for k, v in held_out.items()},
        "eval_accuracy_before_training": before["accuracy"], "train_accuracy": train_acc,
        "train_loss": train_loss, "train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
        "pairs_dropped_too_long": dropped, "steps": trainer.state.global_step, **run.metrics(),
    }
    if not is_main_process():
        return  # under accelerate launch rank 0 writes the outputs
    plots = Path(paths.plots) / "reward_model"
    with (atomic_path(paths.reward_model) as tmp, atomic_path(Path(paths.metrics) / "reward_model.json") as tmp_metrics,
          atomic_path(plots / "rewards.json") as tmp_rewards, atomic_path(plots / "reward_distributions.png") as tmp_png):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        dump_json({"kind": "reward", "method": cfg.method, "base": paths.sft_model}, tmp / "alignflow_model.json")
        dump_json(metrics, tmp_metrics)
        dump_json([{"pair": i, "chosen": c, "rejected": r} for i, (c, r) in enumerate(zip(eval_chosen, eval_rejected))], tmp_rewards)
        plot_distributions(eval_chosen, eval_rejected, tmp_png)
    run.finish()
    return (f"wrote {paths.reward_model}: held-out accuracy {before['accuracy']['value']:.3f} -> {fmt(held_out['accuracy'])} "
            f"on {len(eval_chosen)} pairs (longer-response baseline {fmt(held_out['baseline_longer_accuracy'])}, random "
            f"{fmt(held_out['baseline_random_accuracy'])}), mean margin {fmt(held_out['mean_margin'])}")


def accelerate_section() -> str:
    return "reward_model"  # reward_model.batch_size is the global batch under accelerate launch
