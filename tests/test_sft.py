"""Stage sft: each method trains what it should and nothing else, and its checks of correctness."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignflow.core.io import InputError
from alignflow.core.models import Source, load_tokenizer, load_trained
from alignflow.core.params import ParamsError, load_params
from alignflow.sft import sft
from conftest import alignflow, tiny_params, write_params

METHODS = ["full", "lora", "qlora", "prefix", "adapter"]


def sft_params(directory, tiny_model_dir, precision="auto", **sft_overrides):
    params = tiny_params(tiny_model_dir)
    params["sft"].update(epochs=2, batch_size=4, **sft_overrides)
    params["distributed"]["mixed_precision"] = precision
    return load_params(write_params(directory, params))


def build(params):
    """The model and trainer the stage would use, without running the stage around them."""
    from alignflow.core.training import TrainingRun

    tokenizer = load_tokenizer(Source(params.paths.base_model))
    # seeds torch as the stage does (LoRA and prefix weights start random: every run of a test is the same)
    run = TrainingRun(params, "sft", [params.paths.train, params.paths.eval, params.paths.base_model])
    model = sft.build_model(params.sft, params.paths.base_model, "cpu", torch.float32)
    trainer = sft.make_trainer(params, run, model, tokenizer, sft.load_split(params.paths.train),
                               sft.load_split(params.paths.eval))
    return model, trainer


LEARNING_RATE = {"full": 3e-3, "lora": 3e-2, "qlora": 3e-2, "prefix": 3e-1, "adapter": 3e-2}
TRAINED = {"full": "", "lora": "lora_", "qlora": "lora_", "prefix": "prompt_encoder", "adapter": ".adapter."}


@pytest.mark.parametrize("method", METHODS)
def test_method_lowers_eval_loss_and_trains_only_its_parameters(method, sft_dir, tiny_model_dir, tiny64_model_dir):
    if method == "qlora":  # 4-bit layers need 64 input features on an AVX512-BF16 CPU (conftest.tiny64_model_dir)
        shutil.rmtree(sft_dir / "models" / "base")
        shutil.copytree(tiny64_model_dir, sft_dir / "models" / "base")
    params = sft_params(sft_dir, tiny_model_dir, method=method, learning_rate=LEARNING_RATE[method])
    model, trainer = build(params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before - 0.02
    # float parameters only: QLoRA's frozen 4-bit base is uint8 storage no optimizer can move, which bitsandbytes
    # repacks in place for inference on an AVX512-BF16 CPU (its bytes change, its values do not)
    changed = {n for n, p in model.named_parameters() if p.is_floating_point() and not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(TRAINED[method] in n for n in changed)
    if method == "full":
        assert len(changed) == len(before)
    else:  # the base is frozen: every trainable parameter is the method's own
        assert trainable and all(TRAINED[method] in n for n in trainable)


def test_lora_merged_logits_equal_base_plus_adapter(sft_dir, tiny_model_dir):
    # fp32: under bf16, accelerate wraps the trained model's forward in autocast, which the merged model's lacks
    params = sft_params(sft_dir, tiny_model_dir, precision="no", method="lora", learning_rate=3e-2)
    model, trainer = build(params)
    trainer.train()
    ids = torch.tensor([[1, 520, 2341, 30, 881, 17]])
    model.eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("setting", ["no", "bf16"])
def test_mixed_precision_reaches_the_trainer(setting, sft_dir, tiny_model_dir):
    """distributed.mixed_precision: bf16 runs the Trainer's forward in bf16 autocast over fp32 weights; no stays fp32."""
    raw = tiny_params(tiny_model_dir)
    raw["sft"].update(epochs=1, batch_size=4, method="lora")
    raw["distributed"]["mixed_precision"] = setting
    model, trainer = build(load_params(write_params(sft_dir, raw)))
    assert trainer.args.bf16 is (setting == "bf16")
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with trainer.accelerator.autocast():
        out = linear(torch.randn(2, linear.in_features))
    assert out.dtype == (torch.bfloat16 if setting == "bf16" else torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_qlora_is_4bit_nf4_and_smaller_than_lora(sft_dir, tiny_model_dir):
    from bitsandbytes.nn import Linear4bit

    lora = sft.build_model(sft_params(sft_dir, tiny_model_dir, method="lora").sft, "models/base", "cpu", torch.float32)
    qlora = sft.build_model(sft_params(sft_dir, tiny_model_dir, method="qlora").sft, "models/base", "cpu", torch.float32)
    quantised = [m for m in qlora.modules() if isinstance(m, Linear4bit)]
    assert len(quantised) == 2 * 7  # every linear layer of both blocks: q, k, v, o, gate, up, down
    for layer in quantised:
        assert layer.weight.quant_type == "nf4" and layer.weight.compress_statistics  # double quantisation
    assert qlora.get_memory_footprint() < lora.get_memory_footprint()


def test_fresh_adapter_leaves_outputs_unchanged_and_roundtrips(sft_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignflow.core.adapters import add_bottleneck_adapters, load_bottleneck_adapters, save_bottleneck_adapters

    ids = torch.tensor([[1, 520, 2341, 30, 881, 17]])
    base = AutoModelForCausalLM.from_pretrained("models/base").eval()
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        adapted = add_bottleneck_adapters(AutoModelForCausalLM.from_pretrained("models/base"), 8, "gelu").eval()
        assert torch.equal(adapted(input_ids=ids).logits, reference)
        for name, param in adapted.named_parameters():
            if ".adapter.up." in name:
                param.add_(0.01)  # as if trained
        changed = adapted(input_ids=ids).logits
        assert not torch.allclose(changed, reference)
        save_bottleneck_adapters(adapted, tmp_path / "adapter")
        loaded = load_bottleneck_adapters(AutoModelForCausalLM.from_pretrained("models/base"), tmp_path / "adapter").eval()
        assert torch.equal(loaded(input_ids=ids).logits, changed)


def test_l2_to_pretrained_starts_at_zero_grows_and_holds_weights_closer(sft_dir, tiny_model_dir):
    distances = {}
    for alpha in (0.0, 50.0):
        params = sft_params(sft_dir, tiny_model_dir, method="full", learning_rate=3e-3, l2_to_pretrained=alpha)
        model, trainer = build(params)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        distances[alpha] = sum(((p.detach() - start[n]) ** 2).sum().item() for n, p in model.named_parameters())
        if alpha:
            logged = [h["l2_to_pretrained"] for h in trainer.state.log_history if "l2_to_pretrained" in h]
            assert logged[0] == 0.0 and logged[-1] > 0  # nothing has moved at step 0; later it has
    assert distances[50.0] < 0.5 * distances[0.0]


def test_stage_writes_loadable_model_metrics_and_curves(sft_dir, tiny_model_dir):
    from peft import PeftModel

    write_params(sft_dir, tiny_params(tiny_model_dir))
    result = alignflow("sft", sft_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((sft_dir / "metrics" / "sft.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_perplexity", "trainable_parameters", "total_parameters",
                "trainable_percent", "peak_memory_mb", "tokens_per_second", "wall_seconds"):
        assert metrics[key] > 0, key
    assert metrics["method"] == "lora" and metrics["trainable_percent"] < 5
    # the paired per-example change: as many items as held-out examples, an interval around its value
    change = metrics["eval_loss_change"]
    assert change["n"] == len((sft_dir / "data" / "formatted" / "eval.jsonl").read_text().splitlines())
    assert change["low"] <= change["value"] <= change["high"] and change["holds"] == (change["low"] > 0 or change["high"] < 0)
    assert (change["value"] < 0) == (metrics["eval_loss"] < metrics["eval_loss_before"])  # 4 examples, the same sizes
    assert isinstance(load_trained(sft_dir / "models" / "sft"), PeftModel)
    assert (sft_dir / "models" / "sft" / "chat_template.jinja").exists()
    # peft writes target_modules in a set's order, which differs between processes; the stage sorts them
    saved = json.loads((sft_dir / "models" / "sft" / "adapter_config.json").read_text())["target_modules"]
    assert saved == sorted(saved) == sorted(tiny_params(tiny_model_dir)["sft"]["lora_target_modules"])
    assert list((sft_dir / "dvclive" / "sft" / "plots" / "metrics").rglob("*.tsv"))
    assert not (sft_dir / "checkpoints" / "sft").exists() or not any((sft_dir / "checkpoints" / "sft").iterdir())


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"lora_target_modules": ["attn_qkv"]}, r"sft\.lora_target_modules: \['attn_qkv'\] match no layer"),
        ({"lora_merge": True, "method": "prefix"}, r"sft\.lora_merge: only for method 'lora'"),
    ],
)
def test_bad_settings_stop_before_training(change, expected, sft_dir, tiny_model_dir):
    params = sft_params(sft_dir, tiny_model_dir, **change)
    with pytest.raises(InputError, match=expected):
        sft.run(params)
    assert not (sft_dir / "models" / "sft").exists()


@pytest.mark.parametrize("change,expected", [({"method": "dora"}, "sft.method"), ({"lora_r": 0}, "sft.lora_r")])
def test_bad_params_are_refused_at_the_edge(change, expected, sft_dir, tiny_model_dir):
    with pytest.raises(ParamsError, match=expected.replace(".", r"\.")):
        sft_params(sft_dir, tiny_model_dir, **change)


def test_empty_train_split_and_missing_chat_template(sft_dir, tiny_model_dir):
    params = sft_params(sft_dir, tiny_model_dir)
    (sft_dir / params.paths.train).write_text("")
    with pytest.raises(InputError, match=r"train\.jsonl: empty file"):
        sft.run(params)
    config = sft_dir / "models" / "base" / "tokenizer_config.json"
    (sft_dir / "models" / "base" / "chat_template.jinja").unlink()
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    with pytest.raises(InputError, match="no chat template"):
        sft.run(params)
    assert not (sft_dir / "models" / "sft").exists()


def test_padding_free_batches_give_the_padded_loss(lively_model_dir, tmp_path):
    """The sft stage's padding-free batches (TRL: the examples back to back in one row, position ids restarting at
    each) give the held-out loss that padded batches give, on a CPU with sdpa attention; and the check is not empty:
    the same row read as one sequence (each example attending to the ones before it) gives another loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from alignflow.sft.sft_trainer import AlignflowSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(lively_model_dir)
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Question {i}: " + "why " * (3 * i)}],
                               "completion": [{"role": "assistant", "content": "because " * (1 + 5 * (i % 3))}]}
                              for i in range(6)])

    def trainer(padding_free: bool) -> AlignflowSFTTrainer:
        config = SFTConfig(output_dir=str(tmp_path / str(padding_free)), per_device_eval_batch_size=3, report_to="none",
                           use_cpu=True, completion_only_loss=True, padding_free=padding_free,
                           max_length=None if padding_free else 512, activation_checkpointing=False)
        return AlignflowSFTTrainer(model=AutoModelForCausalLM.from_pretrained(lively_model_dir), args=config,
                                   train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)

    padded, free = trainer(False).evaluate()["eval_loss"], trainer(True)
    assert free.evaluate()["eval_loss"] == pytest.approx(padded, rel=1e-5)
    batch = free.data_collator([free.eval_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 1 and (batch["position_ids"] == 0).sum() == 3  # one row, three examples
    with torch.no_grad():
        one_sequence = free.model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
        separated = free.model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                               use_cache=False).loss.item()
    assert abs(one_sequence - separated) > 1e-3
