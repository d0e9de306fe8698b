"""Bottleneck adapters (Houlsby et al., 2019; placed after each block's MLP as in Pfeiffer et al., 2020).

peft has no bottleneck adapter, so this is ours, kept peft-like: the base stays frozen and untouched on
disk, and the adapter saves beside it as `adapter_config.json` + `adapter_model.safetensors`.

    model = add_bottleneck_adapters(base, bottleneck=64, activation="gelu")   # trainable: adapters only
    save_bottleneck_adapters(model, "models/sft")
    model = load_bottleneck_adapters(AutoModelForCausalLM.from_pretrained("models/base"), "models/sft")

Each adapter computes h + up(act(down(h))) on the MLP output h. `up` starts at zero, so a fresh
adapter leaves the model's outputs exactly unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TYPE = "alignflow_bottleneck"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)  # identity at initialisation
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


class MLPWithAdapter(nn.Module):
    """A block's MLP followed by its adapter."""

    def __init__(self, mlp: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.mlp, self.adapter = mlp, adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.mlp(hidden))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules with an `mlp` child (Llama, Mistral, Qwen, Gemma, ...)."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer block with an `mlp` found for the adapters")
    return blocks


def add_bottleneck_adapters(model: nn.Module, bottleneck: int, activation: str) -> nn.Module:
    """Insert an adapter after every block's MLP, freeze everything else; returns the same model."""
    for param in model.parameters():
        param.requires_grad_(False)
    hidden = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for block in _blocks(model):
        adapter = BottleneckAdapter(hidden, bottleneck, activation).to(device=device, dtype=dtype)
        block.mlp = MLPWithAdapter(block.mlp, adapter)
    model.alignflow_adapter_config = {"adapter_type": ADAPTER_TYPE, "bottleneck": bottleneck, "activation": activation,
                                      "hidden_size": hidden, "blocks": len(_blocks(model))}
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if ".adapter." in name}


def save_bottleneck_adapters(model: nn.Module, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(model.alignflow_adapter_config, indent=2) + "\n")


def load_bottleneck_adapters(base: nn.Module, directory: str | Path) -> nn.Module:
    """Insert adapters into `base` and load their trained weights (every adapter weight must be there)."""
    config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    model = add_bottleneck_adapters(base, config["bottleneck"], config["activation"])
    weights = load_file(Path(directory) / WEIGHTS_NAME)
    params = dict(model.named_parameters())
    missing = set(adapter_state_dict(model)) - set(weights)
    if missing or set(weights) - set(params):
        raise ValueError(f"{directory}: adapter weights do not fit this base model (missing: {sorted(missing)[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return model
