"""Stage format: Alpaca text exactly as Stanford Alpaca has it, chat rendering, a stable seeded split."""

from __future__ import annotations

import json

import pytest

from alignflow.core.io import InputError
from alignflow.core.params import load_params
from alignflow.data import format as format_stage
from alignflow.data.format import alpaca_prompt, split_of
from conftest import tiny_params, write_params


def test_alpaca_templates_verbatim():
    assert alpaca_prompt("Add the numbers.", "2, 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:"
    )
    assert alpaca_prompt("Say hi.", "") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:"
    )


def test_split_is_a_seeded_hash():
    texts = [f"instruction number {i}" for i in range(2000)]
    first = [split_of(t, 42, 0.1) for t in texts]
    assert first == [split_of(t, 42, 0.1) for t in texts]  # stable
    assert 150 < first.count("eval") < 250  # about 10%
    assert first != [split_of(t, 7, 0.1) for t in texts]  # the seed matters


def test_format_stage(workdir, tiny_model_dir):
    params = load_params(write_params(workdir, tiny_params(tiny_model_dir, format__eval_fraction=0.5, format__demonstrations=False)))
    filtered = workdir / params.paths.filtered
    filtered.parent.mkdir(parents=True)
    rows = [{"id": f"m{i}", "instruction": f"Task {i}: name a colour.", "input": "red?" if i % 2 else "",
             "output": f"Blue {i}", "is_classification": False} for i in range(12)]
    filtered.write_text("".join(json.dumps(r) + "\n" for r in rows))
    format_stage.run(params)
    train = [json.loads(x) for x in (workdir / params.paths.train).read_text().splitlines()]
    eval_ = [json.loads(x) for x in (workdir / params.paths.eval).read_text().splitlines()]
    assert len(train) + len(eval_) == 12 and train and eval_
    assert not {r["id"] for r in train} & {r["id"] for r in eval_}
    for r in train + eval_:
        assert r["text"] == r["prompt"] + r["output"] and r["split"] == split_of(r["instruction"], params.seed, 0.5)
        assert ("### Input:" in r["prompt"]) == bool(r["input"])
        assert r["messages"][-1] == {"role": "assistant", "content": r["output"]}
        assert "<|im_start|>user" in r["chat_text"] and r["output"] in r["chat_text"]
    metrics = json.loads((workdir / "metrics" / "format.json").read_text())
    assert metrics["train"]["examples"] == len(train)


def test_demonstrations_join_the_instructions(workdir, tiny_model_dir):
    """The written demonstrations (refusals of harmful requests, answers to alarming-but-benign ones) are formatted and
    split as the instructions are; an id used by both is refused with the file and line."""
    params = load_params(write_params(workdir, tiny_params(tiny_model_dir)))
    filtered = workdir / params.paths.filtered
    filtered.parent.mkdir(parents=True)
    filtered.write_text(json.dumps({"id": "m0", "instruction": "Name a colour.", "input": "", "output": "Blue",
                                    "is_classification": False}) + "\n")
    format_stage.run(params)
    demos = [json.loads(x) for x in (workdir / params.paths.demonstrations).read_text().splitlines()]
    out = [json.loads(x) for split in (params.paths.train, params.paths.eval) for x in (workdir / split).read_text().splitlines()]
    assert sorted(r["id"] for r in out) == sorted(["m0", *(d["id"] for d in demos)])
    assert {d["category"] for d in demos} == {"harmful", "benign_alarming"} and len(demos) >= 96
    assert json.loads((workdir / "metrics" / "format.json").read_text())["demonstrations"] == len(demos)
    clash = workdir / params.paths.demonstrations
    clash.write_text(clash.read_text() + json.dumps({**demos[0], "id": "m0"}, ensure_ascii=False) + "\n")
    with pytest.raises(InputError, match=rf"{clash.name}:{len(demos) + 1}: field 'id': 'm0' is also an instruction's id"):
        format_stage.run(params)
