"""Our PPO: the formulas on hand-worked numbers, then real seeded training runs on a tiny model whose reward
is easy to learn (the number of times token 7 appears in the response)."""

from __future__ import annotations

import pytest
import torch

from alignflow.align.ppo.ppo_config import PPOConfig
from alignflow.align.ppo.ppo_trainer import AdaptiveKLController, PPOTrainer, gae, kl_penalised_rewards, ppo_losses, whiten


def test_gae_hand_worked():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # delta = [0.1, 0.1, 0.3]; A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    assert advantages.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3])
    assert returns.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0])

    # discounting, and a padded position whose value must not leak in
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    advantages, _ = gae(rewards, values, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), gamma=0.9, lam=0.8)
    # delta2 = 1 - 0.3 = 0.7; delta1 = -0.2 + 0.9*0.3 - 0.4 = -0.33; delta0 = 0.1 + 0.9*0.4 - 0.5 = -0.04
    assert advantages.tolist()[0] == pytest.approx([-0.04 + 0.72 * 0.174, -0.33 + 0.72 * 0.7, 0.7, 0.0])


def test_kl_penalised_reward_is_the_chapters_formula():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.1, 2.0, 0.0])
    # summed over the response: R = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))
    assert rewards.sum().item() == pytest.approx(2.0 - 0.1 * (logprobs - ref).sum().item())


def test_clipped_losses_and_whitening():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    policy_loss, value_loss, clip_fraction, approx_kl = ppo_losses(
        new, old, adv, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), mask, 0.2, 0.2)
    # token 1: max(-1.5, -1.2) = -1.2; token 2: max(0.5, 0.8) = 0.8 -> mean -0.2; both clipped
    assert policy_loss.item() == pytest.approx(-0.2) and clip_fraction.item() == 1.0
    # values: token 1 max((1-1)^2, (0.2-1)^2) = 0.64, token 2 max(1, 1) = 1 -> 0.5 * mean = 0.41
    assert value_loss.item() == pytest.approx(0.41)
    assert approx_kl.item() == pytest.approx(0.5 * (torch.log(torch.tensor(1.5)) ** 2 + torch.log(torch.tensor(0.5)) ** 2).item() / 2)
    w = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert w[0, :3].mean().item() == pytest.approx(0, abs=1e-6) and w[0, 3].item() == 0


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=100)
    controller.update(kl=12.0, n=10)   # KL too high: beta up by at most 20% * 10/100
    assert controller.beta == pytest.approx(0.1 * 1.02)
    controller.update(kl=3.0, n=10)    # too low (-50%, clipped to -20%): down
    assert controller.beta == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))


def test_bad_batch_and_beta_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        PPOConfig(batch_size=6, minibatch_size=4)
    with pytest.raises(ValueError, match="kl_coef"):
        PPOConfig(kl_coef=-0.1)


# --- real training runs on a tiny model ---

VOCAB, EOS, PAD, TARGET = 32, 2, 0, 7


def count_target(prompts, responses):
    return torch.tensor([float(sum(t == TARGET for t in r)) for r in responses])


def tiny_trainer(kl_coef: float, seed: int = 0, targets=("q_proj", "v_proj", "o_proj", "down_proj", "lm_head"), lr=3e-3, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    model_config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=EOS,
                               pad_token_id=PAD, num_labels=1)
    torch.manual_seed(seed)
    policy = get_peft_model(LlamaForCausalLM(model_config), LoraConfig(r=8, lora_alpha=16, target_modules=list(targets)))
    value = LlamaForSequenceClassification(model_config)
    cfg = PPOConfig(batch_size=16, minibatch_size=8, ppo_epochs=4, learning_rate=lr, max_new_tokens=12, kl_coef=kl_coef,
                    stop_kl=None, seed=seed, **config)
    return PPOTrainer(cfg, policy, value, count_target, pad_token_id=PAD, eos_token_id=EOS)


def prompts(rng: torch.Generator, n: int) -> list[list[int]]:
    return [torch.randint(3, VOCAB, (4,), generator=rng).tolist() for _ in range(n)]


def train(trainer, iterations: int):
    rng = torch.Generator().manual_seed(1)
    return [trainer.step(prompts(rng, 16)) for _ in range(iterations)]


def kl_of_the_regularised_optimum(beta: float, tokens: int) -> float:
    """KL(pi* || pi_ref) of the best policy for reward - beta * KL, pi* ~ pi_ref * exp(r / beta), for a uniform
    reference over VOCAB tokens and a reward of 1 per TARGET token: PPO should approach it, not overshoot."""
    import math

    p = math.exp(1 / beta) / (math.exp(1 / beta) + VOCAB - 1)
    return tokens * (p * math.log(VOCAB * p) + (1 - p) * math.log(VOCAB * (1 - p) / (VOCAB - 1)))


@pytest.mark.slow
def test_ppo_raises_the_reward_and_keeps_kl_bounded():
    history = train(tiny_trainer(kl_coef=0.2), 15)
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 2.0, [round(h["reward"], 2) for h in history]  # from about 0.5 target tokens in 12
    bound = kl_of_the_regularised_optimum(0.2, tokens=12)  # about 29 nats
    assert all(h["kl"] < bound for h in history), ([round(h["kl"], 2) for h in history], bound)
    assert all(0 <= h["clip_fraction"] <= 1 and h["entropy"] > 0 for h in history)


@pytest.mark.slow(seconds=90)
def test_large_beta_keeps_the_policy_near_the_reference():
    free = train(tiny_trainer(kl_coef=0.0), 10)
    held = train(tiny_trainer(kl_coef=1.0), 10)
    assert all(abs(h["kl"]) < 1.5 for h in held), [round(h["kl"], 2) for h in held]
    assert free[-1]["kl"] > 4 and free[-1]["reward"] > held[-1]["reward"] + 1


@pytest.mark.parametrize("backend", ["onnx-fp32", "torch-bf16"])
def test_engine_rollouts_are_scored_with_the_training_models_logprobs(backend, lively_model_dir):
    """ppo.rollout_backend onnx-fp32 / torch-bf16: the responses in the rollout are the engine's samples (an export, or
    a bf16 copy, of the policy's current weights, LoRA merged into a copy), each through its EOS, and their log-probs
    are the training model's on exactly those tokens (fp32); the reference's are the adapter disabled. The training
    model is left unmerged and in fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignflow.align.ppo.ppo import engine_sampler

    tokenizer = AutoTokenizer.from_pretrained(lively_model_dir)
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(lively_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    value = AutoModelForSequenceClassification.from_pretrained(lively_model_dir, num_labels=1)
    engine = engine_sampler(backend, str(lively_model_dir), temperature=1.0, max_new_tokens=10, batch_size=4)
    sampled = []

    def spy(model, prompts):
        sampled.append(engine(model, prompts))
        return sampled[-1]

    cfg = PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=10, temperature=1.0, seed=0)
    trainer = PPOTrainer(cfg, policy, value, lambda p, r: torch.zeros(len(r)), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, sampler=spy)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for q in ("Hi", "Name a colour.", "Why is the sea blue?", "2+2?")]
    ro = trainer.rollout(prompts)
    width = ro.sequences.shape[1] - ro.mask.shape[1]
    responses = [row[width:][mask.bool()].tolist() for row, mask in zip(ro.sequences, ro.mask)]
    assert responses == sampled[0] and any(len(r) > 1 for r in responses)
    assert all(r[-1] == tokenizer.eos_token_id or len(r) == 10 for r in responses)
    with torch.no_grad():
        logprobs = trainer._token_logprobs(policy, ro.sequences, ro.attention, width)[0] * ro.mask
        with policy.disable_adapter():
            reference = trainer._token_logprobs(policy, ro.sequences, ro.attention, width)[0] * ro.mask
    torch.testing.assert_close(ro.logprobs, logprobs)
    torch.testing.assert_close(ro.ref_logprobs, reference)
    assert (ro.logprobs - ro.ref_logprobs).abs().sum() > 0  # the adapter is live in the training model
    assert hasattr(policy, "disable_adapter") and any("lora_A" in n for n, _ in policy.named_parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
