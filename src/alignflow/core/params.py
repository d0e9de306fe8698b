"""params.yaml -> typed, validated settings.

Reads `params.yaml` and validates it against `workflow/schemas/params.schema.yaml` (the same schema
the Snakefile applies), then builds one frozen dataclass per section. Every error names the file,
the line and the key, and says what was expected:

    params.yaml:42: filter.rouge_threshold: 1.5 is greater than the maximum of 1

The schema is the one definition: tests/test_params.py checks these dataclasses against it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_RELPATH = Path("workflow/schemas/params.schema.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, malformed or does not match the schema."""


@dataclass(frozen=True)
class ModelParams:
    name_or_path: str
    gguf_file: str | None
    revision: str | None
    trust_remote_code: bool
    dtype: str


@dataclass(frozen=True)
class PathParams:
    seeds: str
    demonstrations: str
    base_model: str
    generated: str
    filtered: str
    train: str
    eval: str
    sft_model: str
    prompts: str
    annotations: str
    ab_annotations: str
    samples: str
    judgements: str
    pairs: str
    reward_model: str
    aligned: str
    eval_prompts: str
    heldout_text: str
    refusal_examples: str
    evaluation: str
    verdicts: str
    report: str
    plots: str
    checkpoints: str
    dvclive: str
    metrics: str
    logs: str


@dataclass(frozen=True)
class SelfInstructParams:
    backend: str
    generator: str | None
    api_base: str | None
    api_key_env: str
    chat_template: bool
    num_instructions: int
    num_prompt_instructions: int
    num_machine_examples: int
    batch_size: int
    max_rounds: int
    temperature: float
    top_p: float
    max_new_tokens: int
    instance_max_new_tokens: int


@dataclass(frozen=True)
class FilterParams:
    min_tokens: int
    max_tokens: int
    blacklist: tuple[str, ...]
    rouge_threshold: float


@dataclass(frozen=True)
class FormatParams:
    eval_fraction: float
    system_prompt: str | None
    demonstrations: bool


@dataclass(frozen=True)
class DistributedParams:
    """How the Trainer-based stages run on more than one process (alignflow.core.launch)."""

    accelerate_config: str  # ddp | zero2 | zero3 | fsdp: workflow/accelerate/<name>.yaml
    num_processes: int | str  # "auto" (the visible CUDA GPUs, 1 without CUDA) or a count
    mixed_precision: str  # auto (bf16 where the hardware computes it: CUDA, a CPU with AVX512-BF16 / AMX) | bf16 | no


@dataclass(frozen=True)
class LoraParams:
    """The LoRA block every training section has (schema: $defs/lora); core.training.lora_config reads it."""

    method: str  # full | lora | ... (each section's schema lists its own)
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: tuple[str, ...]


@dataclass(frozen=True)
class TrainingParams(LoraParams):
    """The Trainer block of every section an HF / TRL Trainer trains (schema: $defs/training); core.training
    turns it into TrainingArguments."""

    epochs: float
    learning_rate: float | None  # null only in sft: the method's default
    warmup_ratio: float
    weight_decay: float
    batch_size: int  # the global batch, split across processes under accelerate launch
    gradient_accumulation_steps: int
    max_length: int
    save_steps: int

    @property
    def lr(self) -> float:
        return self.learning_rate


@dataclass(frozen=True)
class SftParams(TrainingParams):
    padding_free: bool
    l2_to_pretrained: float
    lora_merge: bool
    prefix_virtual_tokens: int
    adapter_bottleneck: int
    adapter_activation: str

    @property
    def lr(self) -> float:
        """The learning rate: as set, or the chapter's default for the method."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-5 if self.method == "full" else 2e-4


@dataclass(frozen=True)
class SamplesParams:
    backend: str
    prompts: str
    num_responses: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    max_prompts: int | None
    refusal_openers: dict[str, str] | None  # language -> the opening words of a refusal; null = no steered response


@dataclass(frozen=True)
class PreferencesParams:
    judge: str
    tie_breaker: str | None
    agreement_judge: str | None
    eval_fraction: float
    principles: tuple[str, ...]
    judge_backend: str
    judge_model: str | None
    api_base: str | None
    api_key_env: str
    judge_batch_size: int
    rules_min_tokens: int
    rules_max_tokens: int
    revision_max_new_tokens: int
    max_pairs_per_prompt: int | None  # keep the pairs of widest score gap (then a seeded draw); null = all
    balance_refusals: bool  # add pairs of the scarcer side until refusal-chosen and refusal-rejected pairs are equal


@dataclass(frozen=True)
class RewardModelParams(TrainingParams):
    center_rewards_coefficient: float


@dataclass(frozen=True)
class AlignmentParams:
    methods: tuple[str, ...]


@dataclass(frozen=True)
class PpoParams(LoraParams):
    """Our PPO (align/ppo): the stage builds its PPOConfig from these (and the seed)."""

    iterations: int
    batch_size: int
    minibatch_size: int
    ppo_epochs: int
    learning_rate: float
    max_new_tokens: int
    temperature: float
    kl_coef: float
    adaptive_kl: bool
    target_kl: float
    kl_horizon: int
    gamma: float
    lam: float
    clip_range: float
    clip_range_value: float
    value_coef: float
    max_grad_norm: float
    stop_kl: float | None
    whiten_advantages: bool
    save_every: int
    rollout_backend: str
    rules_weight: float


@dataclass(frozen=True)
class GrpoParams(TrainingParams):
    reward: str  # reward_model | rules
    num_generations: int
    max_new_tokens: int
    temperature: float
    beta: float


@dataclass(frozen=True)
class EvaluateParams:
    backend: str
    models: dict[str, str]
    max_new_tokens: int
    batch_size: int
    examples: int
    refusal_judge: bool


@dataclass(frozen=True)
class Params:
    seed: int
    model: ModelParams
    paths: PathParams
    self_instruct: SelfInstructParams
    filter: FilterParams
    format: FormatParams
    distributed: DistributedParams
    sft: SftParams
    samples: SamplesParams
    preferences: PreferencesParams
    reward_model: RewardModelParams
    alignment: AlignmentParams
    ppo: PpoParams
    grpo: GrpoParams
    methods: dict[str, TrainingParams]  # the TRL preference methods' sections (dpo, ipo, orpo, simpo, ...), typed from the schema
    evaluate: EvaluateParams

    def __getattr__(self, name: str) -> Any:
        """`params.dpo`: a preference method's section, like any other section."""
        try:
            return self.__dict__["methods"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def reference_model(self) -> str:
        """The name in evaluate.models of the SFT model, the reference for KL and win rates (checked on load)."""
        return next(name for name, path in self.evaluate.models.items() if path == self.paths.sft_model)


def schema_path(params_file: Path) -> Path:
    """The schema lives in the repository beside params.yaml (the stages run from the repository root)."""
    return params_file.resolve().parent / SCHEMA_RELPATH


def _line_of(root: yaml.Node | None, keys: list[Any]) -> int | None:
    """1-based line of the deepest node along `keys` in the composed YAML tree."""
    node, line = root, None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def schema_keys(section: dict[str, Any], root_schema: dict[str, Any]) -> set[str]:
    """The keys a section of the schema allows: its own properties and those of the blocks it takes in (allOf $ref)."""
    keys = set(section.get("properties", {}))
    for part in section.get("allOf", []):
        ref = part.get("$ref", "")
        block = root_schema["$defs"][ref.rsplit("/", 1)[-1]] if ref.startswith("#/$defs/") else part
        keys |= schema_keys(block, root_schema)
    return keys


def _describe(error: jsonschema.ValidationError, root_schema: dict[str, Any]) -> tuple[list[Any], str]:
    """The offending key path and a message that says what was expected."""
    path = list(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        allowed = sorted(schema_keys(error.schema, root_schema))
        extra = sorted(set(error.instance) - set(allowed))
        return path + extra[:1], f"unknown key {extra[0]!r}; expected one of: {', '.join(allowed)}"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return path + [missing], f"missing key; this section needs: {', '.join(error.validator_value)}"
    return path, error.message


def validate(data: Any, params_file: Path, text: str) -> dict[str, Any]:
    """Check the data against the schema (every error at once, each with its file:line); returns the schema."""
    schema = yaml.safe_load(schema_path(params_file).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    # a known key with a bad value inside a block ($defs) also counts as "unevaluated": only its own error is shown
    errors = [e for e in errors if e.validator != "unevaluatedProperties" or set(e.instance) - schema_keys(e.schema, schema)]
    if not errors:
        return schema
    root = yaml.compose(text)
    lines = []
    for error in errors:
        path, message = _describe(error, schema)
        line = _line_of(root, path)
        where = f"{params_file}:{line}" if line else str(params_file)
        dotted = ".".join(map(str, path)) or "(top level)"
        lines.append(f"{where}: {dotted}: {message}")
    raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines))


def load_params(params_file: str | Path = "params.yaml") -> Params:
    """Read, validate and type params.yaml. Raises ParamsError naming file, line and key."""
    params_file = Path(params_file)
    try:
        text = params_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{params_file}: not found (run from the repository root)") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{params_file}: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{params_file}:{mark.line + 1}" if mark else str(params_file)
        raise ParamsError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    schema = validate(data, params_file, text)
    kinds = section_types(schema)
    sections = {name: kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in data[name].items()})
                for name, kind in kinds.items()}
    typed = typing.get_type_hints(Params)
    params = Params(seed=data["seed"], methods={k: v for k, v in sections.items() if k not in typed},
                    **{k: v for k, v in sections.items() if k in typed})
    check_evaluated_models(params, params_file, yaml.compose(text))
    return params


def check_evaluated_models(params: Params, params_file: Path, root: yaml.Node) -> None:
    """What the schema cannot say: the SFT model, the reference, is evaluated, and an aligned checkpoint is
    evaluated only when its stage runs (else DVC stops on a missing dependency, far from the cause)."""
    models, aligned = params.evaluate.models, Path(params.paths.aligned)
    problems = []
    if params.paths.sft_model not in models.values():
        problems.append((["evaluate", "models"], f"no entry is the SFT model {params.paths.sft_model} (paths.sft_model), "
                                                 "the reference for KL and win rates"))
    for name, path in models.items():
        made_by = Path(path).parent == aligned and Path(path).name
        if made_by and made_by not in params.alignment.methods:
            problems.append((["evaluate", "models", name], f"{path} is written by align@{made_by}, but alignment.methods "
                                                          f"({', '.join(params.alignment.methods)}) does not run it"))
    if problems:
        lines = [f"{params_file}:{_line_of(root, keys)}: {'.'.join(keys)}: {message}" for keys, message in problems]
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines))


_PYTHON_TYPES = {"number": float, "integer": int, "boolean": bool, "string": str, "array": tuple}


def schema_section_type(name: str, section: dict[str, Any]) -> type:
    """The dataclass of a section only the schema defines (a TRL preference method's): the Trainer block's fields
    (TrainingParams) and the section's own keys, typed by the schema."""
    inherited = {f.name for f in dataclasses.fields(TrainingParams)}
    own = [(key, _PYTHON_TYPES.get(rule.get("type"), str)) for key, rule in section.get("properties", {}).items()
           if key not in inherited]
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}Params", own, bases=(TrainingParams,), frozen=True)


def section_types(schema: dict[str, Any]) -> dict[str, type]:
    """The dataclass of every section: written in this module, or, for a section the Params class does not name (a
    preference method: dpo, ipo, orpo, simpo), built from its schema section, which must take in $defs/training."""
    typed = typing.get_type_hints(Params)
    kinds = {}
    for name, section in schema["properties"].items():
        if name in typed:
            if name != "seed":
                kinds[name] = typed[name]
        elif section.get("allOf") == [{"$ref": "#/$defs/training"}]:
            kinds[name] = schema_section_type(name, section)
        else:
            raise ParamsError(f"{SCHEMA_RELPATH}: section {name!r} has no dataclass in core/params.py and does not take in "
                              "$defs/training (only a preference method's section can be typed from the schema alone)")
    return kinds


def section_fields(schema: dict[str, Any]) -> dict[str, list[str]]:
    """Field names of each typed section, for the schema-agreement test."""
    return {name: [f.name for f in dataclasses.fields(kind)] for name, kind in section_types(schema).items()}
