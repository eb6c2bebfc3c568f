"""The file users pass as ``vllm serve <target> --speculative-config specguard.yaml``.

It holds vLLM's own speculative keys (``method: specguard``, ``model``,
``num_speculative_tokens``) plus a ``specguard:`` block. This module is the one
source of truth for every SpecGuard setting, its default and its validation
message; the CLI, the reference decoder and the vLLM plugin all read it.

YAML is read with ``yaml.safe_load`` only: tags that would construct Python
objects are refused as bad YAML, and nothing in a config is ever executed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# vLLM's rejection sampler refuses more than this many draft tokens per request
# (vllm/v1/sample/rejection_sampler.py: MAX_SPEC_LEN in 0.32).
MAX_STEP_TOKENS = 128

SelectorName = Literal["rouge_l", "token_f1"]


class ConfigError(ValueError):
    """A config that cannot be used, with every problem and its field path."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"invalid SpecGuard config{where}:"]
        lines += [f"  {path}: {message}" for path, message in self.problems]
        return "\n".join(lines)


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


class SpecGuardParams(BaseModel):
    """The ``specguard:`` block: the paper's knobs, with the paper's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_candidates: int = Field(4, ge=1, le=64, description="k draft candidates per step")
    draft_temperature: float = Field(0.7, ge=0.0, description="temperature of the k candidates")
    step_delimiters: list[str] = Field(
        default_factory=lambda: ["\n"], min_length=1,
        description="a step ends at the first token whose text completes one of these",
    )
    tau: float = Field(0.5, ge=0.0, description="accept a step when score >= tau; > 1 rejects all")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="weight of confidence vs grounding")
    grounding_layers: int = Field(3, ge=1, description="last m target layers rolled out for ABGV")
    attention_sparsity: float = Field(0.01, ge=0.0, lt=1.0, description="drop attention below this")
    lpbv_floor: float = Field(-5.0, lt=0.0, description="min log-prob that maps to confidence 0")
    selector: SelectorName = Field("rouge_l", description="similarity for self-consistency")
    seed: int | None = Field(None, description="seed of the draft candidates' sampler")
    fallback: Literal["target", "speculative"] = Field(
        "speculative",
        description="after a rejected step: the target regenerates it token by token (the "
                    "paper), or keep the prefix token-level verification accepts and finish "
                    "the step with token-level speculative decoding (lossless; drafts also run "
                    "past an accepted step's end, the tail verified token-level). Default "
                    "speculative: docs/RESULTS.md measures both",
    )

    tail_min_prob: float = Field(
        0.0, ge=0.0, le=1.0,
        description="with fallback speculative: a tail (the greedy draft past the step's end) "
                    "stops after its first token the draft gives a probability below this "
                    "(that token kept), as Hugging Face's assistant_confidence_threshold "
                    "does; 0 drafts every tail to num_speculative_tokens, as vLLM's SD does",
    )

    @field_validator("draft_temperature", "tau", "beta", "attention_sparsity", "lpbv_floor",
                     "tail_min_prob")
    @classmethod
    def _no_nan(cls, value: float, info: Any) -> float:
        return _finite(info.field_name, value)

    @field_validator("step_delimiters")
    @classmethod
    def _non_empty_delimiters(cls, value: list[str]) -> list[str]:
        for i, delimiter in enumerate(value):
            if delimiter == "":
                raise ValueError(f"step_delimiters[{i}] is an empty string")
        if len(set(value)) != len(value):
            raise ValueError("step_delimiters has duplicates")
        return value


class SpecGuardConfig(BaseModel):
    """The whole speculative config: vLLM's keys plus the ``specguard`` block."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    method: Literal["specguard"]
    model: str = Field(min_length=1, description="draft model: a local path or a hub id")
    num_speculative_tokens: int = Field(
        ge=1, le=MAX_STEP_TOKENS, description="max tokens in one drafted step"
    )
    # vLLM speculative keys that make sense for a separate draft model; passed through.
    draft_tensor_parallel_size: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    quantization: str | None = None
    revision: str | None = None
    specguard: SpecGuardParams = Field(default_factory=SpecGuardParams)

    def vllm_passthrough(self) -> dict[str, Any]:
        """vLLM's own speculative keys (without ``method`` and ``specguard``)."""
        keys = ("model", "num_speculative_tokens", "draft_tensor_parallel_size",
                "max_model_len", "quantization", "revision")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def normalised(self) -> dict[str, Any]:
        """Every field with its effective value, as `specguard validate` prints it."""
        return self.model_dump(mode="json")


def _problems_from(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors(include_url=False):
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        if item["type"] not in ("missing",) and "input" in item and item["type"] != "extra_forbidden":
            message = f"{message} (got {item['input']!r})"
        problems.append((path, message))
    return problems


def config_from_mapping(data: Any, source: str | None = None) -> SpecGuardConfig:
    """Validate an already-parsed mapping (YAML/JSON/dict), raising ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError([("<root>", f"expected a mapping of keys, got {type(data).__name__}")], source)
    try:
        return SpecGuardConfig.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(_problems_from(error), source) from None


def parse_config_text(text: str, source: str | None = None) -> SpecGuardConfig:
    """Parse YAML (a superset of JSON) with safe_load, then validate."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([("<file>", f"bad YAML: {error}".replace("\n", " "))], source) from None
    if data is None:
        raise ConfigError([("<file>", "the config is empty")], source)
    return config_from_mapping(data, source)


def load_config(path: str | os.PathLike[str]) -> SpecGuardConfig:
    """Load a YAML or JSON config file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError([("<file>", f"no such file: {file}")], str(file))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([("<file>", f"cannot read: {error}")], str(file)) from None
    return parse_config_text(text, str(file))


def resolve_config(value: str | os.PathLike[str] | Mapping[str, Any] | SpecGuardConfig) -> SpecGuardConfig:
    """Accept what users pass: a config object, a dict, a path, or a JSON string."""
    if isinstance(value, SpecGuardConfig):
        return value
    if isinstance(value, Mapping):
        return config_from_mapping(value, "<dict>")
    text = os.fspath(value)
    if text.lstrip().startswith("{"):
        try:
            return config_from_mapping(json.loads(text), "<json>")
        except json.JSONDecodeError as error:
            raise ConfigError([("<json>", f"bad JSON: {error}")], "<json>") from None
    return load_config(text)


# Per-request overrides (vLLM's `vllm_xargs`): only these keys, validated like the file.
OVERRIDABLE_KEYS = ("tau", "beta", "fallback")
# `vllm_xargs: {"specguard": false}` turns SpecGuard off for one request, which then runs
# as vLLM's own token-level SD: one greedy draft candidate, no step scoring.
OPT_OUT_KEY = "specguard"


def request_opts_out(overrides: Mapping[str, Any]) -> bool:
    """True when ``overrides`` turn SpecGuard off for the request; ConfigError names a bad value.

    vLLM's OpenAI server hands JSON booleans on as 0 / 1 (its ``vllm_xargs`` values are
    ``str | int | float``), so those two integers are accepted as well.
    """
    value = overrides.get(OPT_OUT_KEY, True)
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return not value
    raise ConfigError([(OPT_OUT_KEY, f"must be true or false (got {value!r})")], "request")


def apply_request_overrides(params: SpecGuardParams, overrides: Mapping[str, Any]) -> SpecGuardParams:
    """Return ``params`` with per-request overrides applied; ConfigError names a bad one
    (the opt-out key included, though it is read by :func:`request_opts_out`)."""
    request_opts_out(overrides)
    relevant = {k.removeprefix("specguard_"): v
                for k, v in overrides.items()}
    chosen = {k: v for k, v in relevant.items() if k in OVERRIDABLE_KEYS}
    if not chosen:
        return params
    try:
        return SpecGuardParams.model_validate({**params.model_dump(), **chosen})
    except ValidationError as error:
        raise ConfigError(_problems_from(error), "request") from None
