"""Atomic outputs and data contracts: a failure leaves nothing behind and says what broke where."""

from __future__ import annotations

import json

import pytest

from alignflow.core import contracts
from alignflow.core.contracts import ContractError
from alignflow.core.io import atomic_path
from alignflow.core.params import load_params
from alignflow.data import filter as filter_stage
from conftest import tiny_params, write_params


def test_atomic_path_file_and_directory(tmp_path):
    target = tmp_path / "out" / "data.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not target.exists() and list(target.parent.iterdir()) == []

    model_dir = tmp_path / "model"
    for version in ("v1", "v2"):
        with atomic_path(model_dir) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
    assert (model_dir / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_contract_failure_lists_expectations_rows_and_writes_result(tmp_path):
    rows = [{"id": "a", "instruction": "Say hi.", "input": "", "output": "hi", "is_classification": False},
            {"id": "a", "instruction": "Say bye.", "input": "", "output": "", "is_classification": "maybe"}]
    data = tmp_path / "filtered.jsonl"
    with pytest.raises(ContractError) as err:
        contracts.validate("filtered_instructions", rows, data)
    message = str(err.value)
    assert "expect_column_values_to_be_unique(column='id')" in message
    assert "expect_column_values_to_be_in_set(column='is_classification')" in message
    assert "row 1 (id='a'): 'maybe'" in message
    assert "expect_column_value_lengths_to_be_between(column='output')" in message
    result = json.loads((tmp_path / "filtered.jsonl.validation.json").read_text())
    assert result["success"] is False
    assert not data.exists()


def test_contract_passes_good_data(tmp_path):
    rows = [{"id": "a", "instruction": "Say hi.", "input": "", "output": "hi", "is_classification": False}]
    contracts.validate("filtered_instructions", rows, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl.validation.json").exists()


def test_stage_stops_on_broken_contract_and_writes_no_data(workdir, tiny_model_dir):
    """Duplicate ids in the generated data pass the per-line checks but break the contract."""
    params = load_params(write_params(workdir, tiny_params(tiny_model_dir)))
    generated = workdir / params.paths.generated
    generated.parent.mkdir(parents=True)
    row = {"id": "dup", "input": "", "output": "ok", "is_classification": False}
    generated.write_text(json.dumps({**row, "instruction": "Name three rivers in Europe."}) + "\n"
                         + json.dumps({**row, "instruction": "List two famous Chinese poets and a poem each."}) + "\n")
    with pytest.raises(ContractError, match="expect_column_values_to_be_unique"):
        filter_stage.run(params)
    assert not (workdir / params.paths.filtered).exists()
    assert (workdir / (params.paths.filtered + ".validation.json")).exists()
