"""The alignment methods `alignment.methods` can name: one entry each.

An entry says which params section configures the method, whether an HF / TRL Trainer trains it (then
accelerate can spread it over processes) and the function that runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alignflow.core.io import InputError


@dataclass(frozen=True)
class Method:
    name: str
    trainer: bool                      # an HF / TRL Trainer: accelerate launch can run it on several processes
    run: Callable                      # run(params)


def _ppo(params):
    from alignflow.align.ppo.ppo import run

    run(params)


def _dpo(params):
    from alignflow.align.dpo import run

    run(params)


def _orpo(params):
    from alignflow.align.orpo import run

    run(params)


METHODS = {m.name: m for m in (Method("ppo", False, _ppo), Method("dpo", True, _dpo), Method("orpo", True, _orpo))}


def method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"alignment method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]
