"""From the user's SpecGuard file to what vLLM's own config understands.

vLLM knows no ``method: specguard``. We rewrite it, before vLLM validates the
speculative config, into vLLM's ``draft_model`` method (so the draft-model
KV-cache plumbing, lookahead slots and isinstance checks all keep working) and
carry the validated ``specguard:`` block in ``additional_config["specguard"]``,
which every worker receives and which is part of vLLM's config hash.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from specguard_vllm.config import ConfigError, SpecGuardConfig, config_from_mapping

logger = logging.getLogger("vllm.specguard")
ADDITIONAL_CONFIG_KEY = "specguard"


def read_speculative_config_arg(value: str) -> dict[str, Any] | None:
    """``--speculative-config`` value: a JSON object string, or a path to a YAML/JSON file.

    A SpecGuard config is validated here, so ``vllm serve`` refuses a bad one before
    loading any model, with the same messages as ``specguard validate``.
    """
    if value in ("", "None"):
        return None
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
        source = "<json>"
    else:
        path = Path(os.path.expanduser(text))
        if not path.is_file():
            raise argparse.ArgumentTypeError(
                f"{value!r} is neither a JSON object nor an existing YAML/JSON file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
            raise argparse.ArgumentTypeError(
                f"invalid SpecGuard config in {path}:\n  <file>: bad YAML: {error}") from None
        source = str(path)
    if isinstance(data, Mapping) and data.get("method") == "specguard":
        try:
            config_from_mapping(data, source)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(error.render()) from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"the speculative config in {source} must be a mapping")
    return data


def is_specguard(spec: Any) -> bool:
    return isinstance(spec, Mapping) and spec.get("method") == "specguard"


def load_if_path(spec: Any) -> Any:
    """Offline ``LLM(speculative_config=<path>)``: read the file."""
    if isinstance(spec, (str, os.PathLike)):
        try:
            return read_speculative_config_arg(os.fspath(spec))
        except argparse.ArgumentTypeError as error:
            raise ValueError(str(error)) from None
    return spec


def to_vllm_speculative_config(config: SpecGuardConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(speculative_config for vLLM, additional_config["specguard"])``."""
    spec = {"method": "draft_model", **config.vllm_passthrough()}
    return spec, config.normalised()


def specguard_from_additional_config(additional_config: Mapping[str, Any] | None) -> SpecGuardConfig | None:
    """The engine's SpecGuard config as the workers see it, or None when inactive."""
    if not additional_config or ADDITIONAL_CONFIG_KEY not in additional_config:
        return None
    return config_from_mapping(additional_config[ADDITIONAL_CONFIG_KEY], "additional_config")
