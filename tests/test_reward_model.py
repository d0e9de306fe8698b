"""The reward-model stage on a tiny task whose preference is learnable: chosen responses carry a marker
word, rejected ones do not, both the same number of words, so length says nothing. The stage (the real
TRL RewardTrainer, run through `alignflow reward_model`) must beat both baselines by a wide margin."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignflow.core.reward import conversation_ids, from_causal_lm, score
from conftest import MARKER, alignflow, sft_and_marker_pairs, tiny_params, write_params

@pytest.fixture
def rm_workdir(workdir, tiny_model_dir):
    return sft_and_marker_pairs(workdir, tiny_model_dir, 30, 8, seed=3)


@pytest.mark.slow(seconds=140)
def test_reward_model_learns_a_marker_and_beats_both_baselines(rm_workdir, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["reward_model"].update(method="full", epochs=4, learning_rate=3e-3, batch_size=16, warmup_ratio=0.0)
    write_params(rm_workdir, params)
    result = alignflow("reward_model", rm_workdir)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((rm_workdir / "metrics" / "reward_model.json").read_text())
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 240 and metrics["eval_pairs"] == 48
    value = {k: v["value"] for k, v in metrics.items() if isinstance(v, dict) and "value" in v}  # intervals' values
    assert 0.3 <= value["eval_baseline_longer_accuracy"] <= 0.7  # length carries no signal here
    assert value["eval_accuracy_before_training"] < 0.8
    assert value["eval_accuracy"] >= 0.9
    assert value["eval_accuracy"] >= value["eval_baseline_longer_accuracy"] + 0.25
    assert value["eval_accuracy"] >= value["eval_baseline_random_accuracy"] + 0.25
    assert value["eval_mean_margin"] > 0
    # with their 95% intervals: Wilson for the accuracy on 48 pairs, the paired gain over the longer answer holds
    accuracy = metrics["eval_accuracy"]
    assert accuracy["n"] == 48 and 0.5 < accuracy["low"] <= accuracy["value"] <= accuracy["high"] <= 1
    assert metrics["eval_accuracy_over_longer"]["holds"] and metrics["eval_accuracy_over_longer"]["low"] > 0

    # the checkpoint is a plain sequence classifier: plain transformers loads it and agrees with the metrics
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_workdir / "models" / "reward")
    tokenizer = AutoTokenizer.from_pretrained(rm_workdir / "models" / "reward")
    prompt = [{"role": "user", "content": "Say something about stone number 99."}]
    good, bad = score(model, tokenizer, [conversation_ids(tokenizer, prompt, f"river {MARKER} stone cloud green quick table seven"),
                                         conversation_ids(tokenizer, prompt, "river apple stone cloud green quick table seven")])
    assert good > bad
    plotted = json.loads((rm_workdir / "plots" / "reward_model" / "rewards.json").read_text())
    assert len(plotted) == 48
    assert sum(p["chosen"] > p["rejected"] for p in plotted) / 48 == pytest.approx(value["eval_accuracy"])
    assert (rm_workdir / "plots" / "reward_model" / "reward_distributions.png").read_bytes()[:4] == b"\x89PNG"
    assert (rm_workdir / "dvclive" / "reward_model" / "plots" / "metrics").is_dir()


def test_lora_reward_model_from_a_lora_sft_keeps_the_sft_weights(tiny_model_dir, tmp_path):
    """from_causal_lm merges a LoRA SFT adapter into the backbone: the classifier's hidden states equal the
    merged causal LM's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sft = tmp_path / "sft"
    peft_model.save_pretrained(sft)
    (sft / "alignflow_model.json").write_text(json.dumps({"kind": "peft", "method": "lora", "base": str(tiny_model_dir)}))
    shutil.copy2(tiny_model_dir / "tokenizer.json", sft)
    shutil.copy2(tiny_model_dir / "tokenizer_config.json", sft)

    classifier = from_causal_lm(sft)
    merged = peft_model.merge_and_unload()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(classifier.base_model(ids).last_hidden_state, merged.base_model(ids).last_hidden_state, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).base_model(ids).last_hidden_state
        assert not torch.allclose(classifier.base_model(ids).last_hidden_state, plain, atol=1e-3)  # the adapter mattered


def test_too_few_pairs_is_a_clear_error(rm_workdir, tiny_model_dir):
    pairs = rm_workdir / "data" / "preferences" / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    pairs.write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    write_params(rm_workdir, tiny_params(tiny_model_dir))
    result = alignflow("reward_model", rm_workdir)
    assert result.returncode == 2 and "no eval pairs" in result.stderr
    assert not (rm_workdir / "models" / "reward").exists()
