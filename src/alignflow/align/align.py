"""Stage `align@<method>`: train one alignment method of `alignment.methods` from the same SFT model and data.

    alignflow align dpo             # reads params.yaml: seed, <method>, paths
    dvc repro align@dpo             # one stage per entry of alignment.methods

Which methods exist, what each starts from and reads, is the table in alignflow.align.methods.
"""

from __future__ import annotations

from alignflow.align.methods import METHODS, method
from alignflow.core.params import Params


def accelerate_section(name: str) -> str | None:
    """The params section whose batch accelerate splits, for a method trained by an HF / TRL Trainer; None for
    one that runs as one process (our PPO)."""
    return name if method(name).trainer else None


def run(params: Params, name: str) -> None:
    method(name).run(params)


__all__ = ["METHODS", "accelerate_section", "run"]
