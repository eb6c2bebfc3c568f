"""Every place SpecGuard patches vLLM, written for vLLM 0.32.x (V1 model runner).

Read this list before upgrading vLLM: each entry names the vLLM object it
changes, what it changes and why. Patches are applied once per process by
:func:`apply_all_patches` (from the plugin's ``register()``) and do nothing for
an engine whose speculative config does not ask for SpecGuard.

Front end (API server / ``LLM`` process):
  P1 ``EngineArgs.add_cli_args``: ``--speculative-config`` also takes a path to a
     YAML/JSON file (vLLM parses it with ``json.loads`` only), and a SpecGuard
     config is validated there, so ``vllm serve`` refuses a bad one at start.
  P2 ``EngineArgs.create_speculative_config``: ``method: specguard`` becomes vLLM's
     ``draft_model`` method plus ``additional_config["specguard"]``; on CUDA it also
     forces the settings SpecGuard needs (sync scheduling, V1 runner, PIECEWISE
     CUDA graphs), logging each.
  P3 ``SamplingParams._verify_args``: per-request ``vllm_xargs`` overrides of
     ``tau`` / ``beta`` are validated, so a bad value is an HTTP 400 naming it.
Worker (model runner):
  P4 ``gpu_model_runner.DraftModelProposer`` (module name): replaced by
     :class:`SpecGuardDraftProposer`, a subclass (k candidates in one batched loop).
  P5 ``GPUModelRunner.__init__``: attach SpecGuard's state and swap the
     ``rejection_sampler`` for :class:`SpecGuardRejectionSampler`.
  P6 ``GPUModelRunner.execute_model``: clear/disarm the grounding capture around
     the target forward.
  P7 ``GPUModelRunner._calc_spec_decode_metadata``: arm the grounding capture with
     each row's number of drafted tokens.
  P8 ``GPUModelRunner._update_states_after_model_execute``: update each request's
     step state (regenerating after a rejected step) from the committed tokens.
  P9 ``GPUModelRunner.propose_draft_token_ids``: pass row hints to the proposer and
     cut each proposed row after its step delimiter (0 drafts while regenerating).
  P10 ``GPUModelRunner._update_states``: forget finished / aborted requests.
  P11 ``<Backend>Impl.forward`` for CPU_ATTN, FLASH_ATTN, TRITON_ATTN: after the
     backend's attention, compute the grounding statistics of the target's last
     ``grounding_layers`` layers from the paged K cache.
  P12 ``WorkerBase``: add the RPC methods ``specguard_counters`` and
     ``specguard_reset_counters`` (new names only), so ``LLM.collective_rpc`` can
     read SpecGuard's worker-side totals without pickled callables.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

logger = logging.getLogger("vllm.specguard")
WRITTEN_FOR = "vLLM 0.32.x"
_applied = False


def _wrap(owner, name: str, make):
    original = getattr(owner, name)
    if getattr(original, "__specguard_patched__", False):
        return
    wrapped = make(original)
    functools.update_wrapper(wrapped, original)
    wrapped.__specguard_patched__ = True
    setattr(owner, name, wrapped)


# ------------------------------------------------------------------ front end

def patch_cli_speculative_config_path() -> None:  # P1
    from vllm.engine.arg_utils import EngineArgs

    from specguard_vllm.plugin.config_bridge import read_speculative_config_arg

    def make(original):
        def add_cli_args(parser, *args, **kwargs):
            parser = original(parser, *args, **kwargs)
            for action in parser._actions:
                if "--speculative-config" in action.option_strings:
                    action.type = read_speculative_config_arg
                    action.help = (action.help or "") + (
                        " SpecGuard: also a path to a YAML/JSON file; `method: specguard`.")
            return parser
        return add_cli_args

    original = EngineArgs.__dict__["add_cli_args"]
    func = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(func, "__specguard_patched__", False):
        return
    wrapped = make(func)
    functools.update_wrapper(wrapped, func)
    wrapped.__specguard_patched__ = True
    EngineArgs.add_cli_args = staticmethod(wrapped)


def patch_create_speculative_config() -> None:  # P2
    from vllm.engine.arg_utils import EngineArgs

    from specguard_vllm.config import ConfigError, config_from_mapping
    from specguard_vllm.plugin.config_bridge import (
        ADDITIONAL_CONFIG_KEY,
        is_specguard,
        load_if_path,
        to_vllm_speculative_config,
    )

    def make(original):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            spec = load_if_path(self.speculative_config)
            if is_specguard(spec):
                try:
                    config = config_from_mapping(spec, "speculative_config")
                except ConfigError as error:
                    raise ValueError(error.render()) from None
                _check_draft_vocab(config.model, target_model_config)
                _check_grounding_layers(config.specguard.grounding_layers, target_model_config)
                vllm_spec, block = to_vllm_speculative_config(config)
                self.speculative_config = vllm_spec
                additional = dict(self.additional_config or {})
                additional[ADDITIONAL_CONFIG_KEY] = block
                self.additional_config = additional
                _force_gpu_settings(self)
                _enable_worker_metrics()
            else:
                self.speculative_config = spec
            return original(self, target_model_config, target_parallel_config)
        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config", make)


def _check_draft_vocab(draft: str, target_model_config) -> None:
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


def _check_grounding_layers(layers: int, target_model_config) -> None:
    """Refuse more grounding layers than the target has, at start rather than mid-serving."""
    hf_config = getattr(target_model_config, "hf_text_config", None) or target_model_config.hf_config
    num_layers = getattr(hf_config, "num_hidden_layers", None)
    if num_layers is not None and layers > int(num_layers):
        raise ValueError(
            f"invalid SpecGuard config:\n  specguard.grounding_layers: {layers} but the target "
            f"has only {num_layers} layers")


def _enable_worker_metrics() -> None:
    """Let SpecGuard's worker-side metrics reach the API server's ``/metrics``.

    They are recorded in the worker process; prometheus_client's multiprocess
    mode (which vLLM itself uses with several API servers) merges them. Metrics
    created from here on in this process use the multiprocess value class too.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus

    setup_multiprocess_prometheus()
    import prometheus_client.values as values

    values.ValueClass = values.get_value_class()


def _force_gpu_settings(engine_args) -> None:
    """On CUDA, the settings under which the grounding hook is never skipped."""
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


def patch_sampling_params_overrides() -> None:  # P3
    from vllm.sampling_params import SamplingParams

    from specguard_vllm.config import ConfigError, SpecGuardParams, apply_request_overrides

    def make(original):
        def _verify_args(self):
            original(self)
            if self.extra_args:
                try:
                    apply_request_overrides(SpecGuardParams(), self.extra_args)
                except ConfigError as error:
                    problems = "; ".join(f"vllm_xargs.{path}: {msg}" for path, msg in error.problems)
                    raise ValueError(f"invalid SpecGuard request override: {problems}") from None
        return _verify_args

    _wrap(SamplingParams, "_verify_args", make)


# ------------------------------------------------------------------ worker

def patch_draft_proposer_class() -> None:  # P4
    gpu_model_runner = importlib.import_module("vllm.v1.worker.gpu_model_runner")
    from specguard_vllm.plugin.proposer import SpecGuardDraftProposer

    gpu_model_runner.DraftModelProposer = SpecGuardDraftProposer


def patch_runner() -> None:  # P5-P10
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from specguard_vllm.plugin import runner_hooks as hooks

    def init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            hooks.after_runner_init(self)
        return __init__

    def execute_model(original):
        def wrapped(self, *args, **kwargs):
            hooks.before_execute_model(self)
            try:
                return original(self, *args, **kwargs)
            finally:
                hooks.after_execute_model(self)
        return wrapped

    def calc_metadata(original):
        def wrapped(self, *args, **kwargs):
            metadata = original(self, *args, **kwargs)
            hooks.on_spec_decode_metadata(self, metadata)
            return metadata
        return wrapped

    def after_execute(original):
        def wrapped(self, output_token_ids, scheduler_output, *args, **kwargs):
            result = original(self, output_token_ids, scheduler_output, *args, **kwargs)
            hooks.after_sampling(self, output_token_ids)
            return result
        return wrapped

    def propose(original):
        def wrapped(self, *args, **kwargs):
            hooks.before_propose(self)
            return hooks.truncate_drafts(self, original(self, *args, **kwargs))
        return wrapped

    def update_states(original):
        def wrapped(self, scheduler_output, *args, **kwargs):
            hooks.on_update_states(self, scheduler_output)
            return original(self, scheduler_output, *args, **kwargs)
        return wrapped

    _wrap(GPUModelRunner, "__init__", init)
    _wrap(GPUModelRunner, "execute_model", execute_model)
    _wrap(GPUModelRunner, "_calc_spec_decode_metadata", calc_metadata)
    _wrap(GPUModelRunner, "_update_states_after_model_execute", after_execute)
    _wrap(GPUModelRunner, "propose_draft_token_ids", propose)
    _wrap(GPUModelRunner, "_update_states", update_states)


ATTENTION_IMPLS = (
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl"),
)


def patch_attention_impls() -> None:  # P11
    from specguard_vllm.plugin.runner_hooks import grounding_hook

    def make(original):
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            result = original(self, layer, query, key, value, kv_cache, attn_metadata, output,
                              *args, **kwargs)
            grounding_hook(self, layer, query, kv_cache, attn_metadata, key=key)
            return result
        return forward

    for module_name, class_name in ATTENTION_IMPLS:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a GPU backend whose kernels are not installed here
            continue
        impl = getattr(module, class_name, None)
        if impl is not None:
            _wrap(impl, "forward", make)


def patch_worker_rpc_methods() -> None:  # P12
    from vllm.v1.worker.worker_base import WorkerBase

    from specguard_vllm.plugin import introspect

    if not hasattr(WorkerBase, "specguard_counters"):
        WorkerBase.specguard_counters = introspect.worker_counters
        WorkerBase.specguard_reset_counters = introspect.reset_worker_counters


def apply_all_patches() -> None:
    """Apply P1-P12 in order (idempotent)."""
    global _applied
    if _applied:
        return
    patch_cli_speculative_config_path()
    patch_create_speculative_config()
    patch_sampling_params_overrides()
    patch_draft_proposer_class()
    patch_runner()
    patch_attention_impls()
    patch_worker_rpc_methods()
    _applied = True
    logger.debug("SpecGuard patches applied (written for %s)", WRITTEN_FOR)
