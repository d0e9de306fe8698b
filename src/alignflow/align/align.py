"""Stage `align@<method>`: train one alignment method of `alignment.methods` (the table: alignflow.align.methods).

    alignflow align dpo             # reads params.yaml: seed, <method>, paths
    dvc repro align@grpo            # one DVC stage per entry of alignment.methods
    dvc exp run -S dpo.beta=0.3     # reruns align@dpo and what depends on it, nothing else

Reads:  `paths.pairs` (their train pairs, or for the online methods their train prompts; the eval split measures),
        the model the method starts from (`paths.sft_model`; ORPO: `paths.base_model`), and for PPO / GRPO the reward
        model `paths.reward_model`.
Writes: `<paths.aligned>/<method>/` (a plain checkpoint, LoRA merged in), `<paths.metrics>/<method>.json`, curves
        under `<paths.dvclive>/<method>/` (alignflow.align.policy).
"""

from __future__ import annotations

from alignflow.align.methods import method
from alignflow.core.params import Params


def accelerate_section(name: str) -> str | None:
    """The params section whose batch accelerate splits, for a method trained by an HF / TRL Trainer; None for
    one that runs as one process (our PPO)."""
    return name if method(name).accelerate else None


def run(params: Params, name: str) -> str | None:
    entry = method(name)
    if entry.reads == "pairs":
        from alignflow.align import preference

        return preference.run(params, entry)
    if name == "ppo":
        from alignflow.align.ppo import ppo

        return ppo.run(params)
    from alignflow.align import grpo

    return grpo.run(params)
