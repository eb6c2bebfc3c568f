"""From the user's SpecGuard file to what vLLM's own config understands.

vLLM knows no ``method: specguard``. We rewrite it, before vLLM validates the
speculative config, into vLLM's ``draft_model`` method (so the draft-model
KV-cache plumbing, lookahead slots and isinstance checks all keep working) and
carry the validated ``specguard:`` block in ``additional_config["specguard"]``,
which every worker receives and which is part of vLLM's config hash. The checks
against the target model and the settings SpecGuard forces on CUDA run at the same
point (``EngineArgs.create_speculative_config``, patch P2), before any weights load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def check_draft_vocab(draft: str, target_model_config) -> None:
    """Refuse a draft whose vocabulary differs from the target's, before loading weights."""
    from transformers import AutoConfig

    try:
        draft_vocab = int(AutoConfig.from_pretrained(draft).vocab_size)
    except Exception as error:  # noqa: BLE001 - any loading problem is the user's input
        raise ValueError(f"SpecGuard: cannot read the draft model config {draft!r}: {error}") from None
    target_vocab = int(target_model_config.get_vocab_size())
    if draft_vocab != target_vocab:
        raise ValueError(
            f"SpecGuard: draft vocabulary size {draft_vocab} ({draft}) does not match the "
            f"target's {target_vocab}: the draft must share the target's tokenizer")


def check_grounding_layers(layers: int, target_model_config) -> None:
    """Refuse more grounding layers than the target has, at start rather than mid-serving."""
    hf_config = getattr(target_model_config, "hf_text_config", None) or target_model_config.hf_config
    num_layers = getattr(hf_config, "num_hidden_layers", None)
    if num_layers is not None and layers > int(num_layers):
        raise ValueError(
            f"invalid SpecGuard config:\n  specguard.grounding_layers: {layers} but the target "
            f"has only {num_layers} layers")


def force_gpu_settings(engine_args) -> None:
    """On CUDA, the settings under which the grounding hook is never skipped (logged each)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return
    if getattr(engine_args, "async_scheduling", None) is not False:
        engine_args.async_scheduling = False
        logger.warning("SpecGuard: async scheduling disabled (per-request step lengths need "
                       "the synchronous scheduler)")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "0":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.warning("SpecGuard: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0); "
                       "its hooks are written for V1")
    if not engine_args.enforce_eager:
        from vllm.config.compilation import CUDAGraphMode

        compilation = engine_args.compilation_config
        if isinstance(compilation, dict):
            mode = compilation.get("cudagraph_mode")
            mode = CUDAGraphMode[mode.upper()] if isinstance(mode, str) else mode
        else:
            mode = getattr(compilation, "cudagraph_mode", None)
        if mode not in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):
            if isinstance(compilation, dict):
                compilation["cudagraph_mode"] = CUDAGraphMode.PIECEWISE
            else:
                compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
            logger.warning("SpecGuard: cudagraph_mode=PIECEWISE (FULL graphs replay the "
                           "attention without the grounding hook)")
