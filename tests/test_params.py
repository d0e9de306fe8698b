"""params.yaml is validated once, at the edge, against the one schema; errors name file, line and key."""

from __future__ import annotations

import re

import pytest
import yaml

from alignflow.core.params import ParamsError, load_params, schema_keys, section_fields
from conftest import ROOT, alignflow, make_repo, sh, tiny_params, write_params

SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/params.schema.yaml").read_text())


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.filter.rouge_threshold == 0.7
    assert params.model.name_or_path == "embedded:smollm2"


def required_keys(section: dict) -> set[str]:
    """A section's required keys, its blocks' ($defs, through allOf) included."""
    keys = set(section.get("required", []))
    for part in section.get("allOf", []):
        keys |= required_keys(SCHEMA["$defs"][part["$ref"].rsplit("/", 1)[-1]])
    return keys


def test_typed_settings_have_exactly_the_schema_keys():
    fields = section_fields(SCHEMA)
    assert set(fields) | {"seed"} == set(SCHEMA["properties"])
    for section, names in fields.items():
        assert sorted(names) == sorted(schema_keys(SCHEMA["properties"][section], SCHEMA)), section
        assert sorted(required_keys(SCHEMA["properties"][section])) == sorted(names), section


def test_shared_blocks_are_written_once():
    """The LoRA and Trainer blocks: one $defs entry each, one dataclass each, taken in by every training section."""
    from alignflow.core.params import LoraParams, TrainingParams

    params = load_params(ROOT / "params.yaml")
    for section in ("sft", "reward_model", "grpo", "dpo", "ipo", "orpo", "simpo"):
        assert SCHEMA["properties"][section]["allOf"] == [{"$ref": "#/$defs/training"}], section
        assert isinstance(getattr(params, section), TrainingParams), section
    assert SCHEMA["properties"]["ppo"]["allOf"] == [{"$ref": "#/$defs/lora"}]
    assert isinstance(params.ppo, LoraParams) and issubclass(TrainingParams, LoraParams)
    # a preference method's section is typed from the schema alone: its own keys with the schema's types
    assert params.simpo.beta == 2.0 and isinstance(params.simpo.gamma, float) and params.dpo.lr == params.dpo.learning_rate
    for section in SCHEMA["properties"].values():  # no section restates a block's key with its own (laxer) rule
        for part in section.get("allOf", []):
            block = SCHEMA["$defs"][part["$ref"].rsplit("/", 1)[-1]]
            restated = set(section.get("properties", {})) & set(block["properties"]) - {"method", "learning_rate"}
            assert not restated, restated


def _bad(tmp_path, section, key, value, drop=None):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section][key] = value
    if drop:
        del params[section][drop]
    return write_params(tmp_path, params)


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("filter", "rouge_treshold", 0.7, r"filter\.rouge_treshold: unknown key 'rouge_treshold'; expected one of: .*rouge_threshold"),
        ("self_instruct", "batch_size", "eight", r"self_instruct\.batch_size: 'eight' is not of type 'integer'"),
        ("filter", "rouge_threshold", 1.5, r"filter\.rouge_threshold: 1\.5 is greater than the maximum of 1"),
        ("self_instruct", "backend", "llamacpp", r"self_instruct\.backend: 'llamacpp' is not one of \['auto', 'torch-fp32', 'torch-bf16', 'onnx-int4', 'onnx-int8', 'onnx-fp32', 'transformers', 'openai', 'vllm'\]"),
    ],
)
def test_bad_value_names_file_line_key(tmp_path, section, key, value, expected):
    path = _bad(tmp_path, section, key, value)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert re.search(expected, message), message
    # the line number points at the offending key in the file
    line = int(re.search(r"params\.yaml:(\d+):", message).group(1))
    assert path.read_text().splitlines()[line - 1].strip().startswith(f"{key}:")


def test_missing_key_is_named(tmp_path):
    path = _bad(tmp_path, "filter", "min_tokens", 3, drop="max_tokens")
    with pytest.raises(ParamsError, match=r"filter\.max_tokens: missing key"):
        load_params(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write_params(tmp_path, {})
    path.write_text("seed: 1\nmodel: [unclosed\n")
    with pytest.raises(ParamsError, match=r"params\.yaml:\d+: not valid YAML"):
        load_params(path)


def test_cli_stops_before_any_output(tmp_path):
    _bad(tmp_path, "filter", "rouge_treshold", 0.7)
    result = alignflow("filter", tmp_path)
    assert result.returncode == 2
    assert "unknown key 'rouge_treshold'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "workflow"]


def test_snakemake_applies_the_same_schema(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["filter"]["rouge_treshold"] = 0.7
    repo = make_repo(tmp_path / "repo", params)
    result = sh(["snakemake", "-n"], repo, check=False)
    assert result.returncode != 0
    assert "rouge_treshold" in result.stdout + result.stderr
