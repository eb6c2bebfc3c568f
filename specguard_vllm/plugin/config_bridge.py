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
    """Refuse a draft whose tokenizer differs from the target's, before loading weights.

    The tokenizers are compared (size and token -> id map), not the embedding sizes: a
    pair such as Qwen2.5-Math-7B (embedding padded to 152064) and -1.5B (151936) shares
    one tokenizer and is served; the proposer never proposes the padding ids past it.
    """
    from transformers import AutoConfig, AutoTokenizer

    trust = bool(getattr(target_model_config, "trust_remote_code", False))
    try:
        draft_vocab = int(AutoConfig.from_pretrained(draft, trust_remote_code=trust).vocab_size)
        draft_tokenizer = AutoTokenizer.from_pretrained(draft, trust_remote_code=trust)
    except Exception as error:  # noqa: BLE001 - any loading problem is the user's input
        raise ValueError(f"SpecGuard: cannot read the draft model config {draft!r}: {error}") from None
    target_vocab = int(target_model_config.get_vocab_size())
    target_tokenizer = AutoTokenizer.from_pretrained(target_model_config.tokenizer,
                                                     trust_remote_code=trust)
    tokens = len(target_tokenizer)
    if len(draft_tokenizer) != tokens or draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError(
            f"SpecGuard: the draft's tokenizer ({len(draft_tokenizer)} tokens, vocabulary size "
            f"{draft_vocab}, {draft}) differs from the target's ({tokens} tokens, vocabulary size "
            f"{target_vocab}): the draft must share the target's tokenizer")
    if draft_vocab < tokens:
        raise ValueError(
            f"SpecGuard: the draft's vocabulary size {draft_vocab} ({draft}) is smaller than its "
            f"tokenizer ({tokens} tokens): the draft cannot embed every token the target writes")
    _CHECKED_PAIRS.add((str(target_model_config.model), str(draft)))
    if draft_vocab != target_vocab:
        logger.info("SpecGuard: draft vocabulary size %d, target's %d, one tokenizer of %d tokens: "
                    "the draft proposes ids below %d only", draft_vocab, target_vocab, tokens,
                    min(tokens, target_vocab))


# (target, draft) model pairs whose tokenizers check_draft_vocab found equal in this process.
_CHECKED_PAIRS: set[tuple[str, str]] = set()


def _model_pair(speculative_config) -> tuple[str, str]:
    target = getattr(getattr(speculative_config, "target_model_config", None), "model", None)
    draft = getattr(getattr(speculative_config, "draft_model_config", None), "model", None)
    return str(target), str(draft)


def trust_engine_pair(speculative_config) -> None:
    """In a worker of a SpecGuard engine: its pair was compared by P2 in the front end (a
    SpecGuard engine config exists only after that), but the worker re-validates copies of
    the config (the draft's ``VllmConfig``), so the pair is recorded here too."""
    _CHECKED_PAIRS.add(_model_pair(speculative_config))


def tokenizers_were_checked(speculative_config) -> bool:
    """Whether this draft's tokenizer was compared with this target's (P2), so vLLM's
    equal-embedding-size check is not needed (P13). Keyed by the pair, not by a scope:
    vLLM re-validates the speculative config inside ``VllmConfig`` after P2 returned."""
    return _model_pair(speculative_config) in _CHECKED_PAIRS


def check_grounding_layers(layers: int, target_model_config) -> None:
    """Refuse more grounding layers than the target has, at start rather than mid-serving."""
    hf_config = getattr(target_model_config, "hf_text_config", None) or target_model_config.hf_config
    num_layers = getattr(hf_config, "num_hidden_layers", None)
    if num_layers is not None and layers > int(num_layers):
        raise ValueError(
            f"invalid SpecGuard config:\n  specguard.grounding_layers: {layers} but the target "
            f"has only {num_layers} layers")


def check_parallelism(parallel_config) -> None:
    """Refuse the parallel layouts under which grounding would read only part of the target.

    Tensor parallelism is supported (the ranks' head shares are summed before thresholding).
    Pipeline parallelism puts the grounding layers and the sampler on the last stage only,
    and context parallelism splits each request's keys over ranks; neither is handled.
    """
    for field_name, flag, reason in (
        ("pipeline_parallel_size", "--pipeline-parallel-size",
         "the step verifier and its grounding capture run on one pipeline stage only"),
        ("decode_context_parallel_size", "--decode-context-parallel-size",
         "grounding reads every key of a request from one rank's KV cache"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size",
         "grounding reads every key of a request from one rank's KV cache"),
    ):
        size = int(getattr(parallel_config, field_name, 1) or 1)
        if size > 1:
            raise ValueError(
                f"SpecGuard does not support {flag} {size} ({reason}); use "
                "--tensor-parallel-size to split the target over devices")


# KV cache dtypes whose keys the grounding capture reads as stored (no quantisation scales).
UNQUANTISED_KV_DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "float")


def check_kv_cache_dtype(kv_cache_dtype: Any) -> None:
    """Refuse a quantised KV cache (``--kv-cache-dtype fp8*``, ...) at start."""
    name = str(kv_cache_dtype or "auto").removeprefix("torch.")
    if name not in UNQUANTISED_KV_DTYPES:
        raise ValueError(
            f"SpecGuard cannot start: --kv-cache-dtype {name} (a quantised KV cache) is not "
            "supported: the grounding capture reads the keys from the paged cache unscaled. "
            "Use --kv-cache-dtype auto.")


def check_attention_backend(backend: Any, supported: tuple[str, ...]) -> None:
    """Refuse an explicitly chosen attention backend the grounding capture cannot read."""
    name = getattr(backend, "name", backend)
    if name is not None and str(name) not in supported:
        raise ValueError(
            f"SpecGuard cannot start: --attention-backend {name}: the grounding capture reads the "
            f"paged K cache of {', '.join(supported)} only.")


def _sliding_window(value: Any) -> Any:
    """The window of an attention impl's ``sliding_window`` (-1, (-1, -1) or None: none)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return None if value is None or all(v is None or v == -1 for v in values) else value


def check_grounding_attention(layer_name: str, backend: str, impl: Any,
                              supported: tuple[str, ...]) -> None:
    """Refuse, at start, a grounding layer whose attention the capture would not reproduce.

    The capture recomputes the layer's attention probabilities from the paged K cache with
    plain scaled dot products over the whole context: a backend whose cache layout it does
    not know, sliding windows, ALiBi biases, logit soft-capping or a quantised cache would
    give grounding scores of some other attention.
    """
    where = f"SpecGuard cannot start: grounding layer {layer_name}"
    if backend not in supported:
        raise ValueError(
            f"{where} runs on the {backend} attention backend; the grounding capture reads the "
            f"paged K cache of {', '.join(supported)} only. Choose one with --attention-backend.")
    window = _sliding_window(getattr(impl, "sliding_window", None))
    if window is not None:
        raise ValueError(
            f"{where} uses sliding-window attention (sliding_window={window}); the grounding "
            "capture attends to the whole context. Use fewer grounding_layers (full-attention "
            "layers only) or a target without sliding windows.")
    if getattr(impl, "alibi_slopes", None) is not None:
        raise ValueError(f"{where} uses ALiBi position biases, which the grounding capture does "
                         "not apply.")
    soft_cap = getattr(impl, "logits_soft_cap", None)
    if soft_cap not in (None, 0, 0.0):
        raise ValueError(f"{where} soft-caps its attention logits (logits_soft_cap={soft_cap}), "
                         "which the grounding capture does not apply.")
    check_kv_cache_dtype(getattr(impl, "kv_cache_dtype", None))


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
