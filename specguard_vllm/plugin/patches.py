"""Every place SpecGuard patches vLLM, written for vLLM 0.32.x (V1 model runner).

Read this list before upgrading vLLM: each entry names the vLLM object it
changes, what it changes and why. :func:`apply_all_patches` (called by the
plugin's ``register()``) checks the installed vLLM release, then applies them in
this order, once per process. Each patch is a :class:`VllmPatch` (see
``patching.py``): its methods replace the target's, whose originals stay reachable
as ``_orig_<name>``. Every patch does nothing for an engine whose speculative
config does not ask for SpecGuard.

On any other vLLM release none of these is applied: ``register()`` logs one line
and applies only P0 (:class:`~specguard_vllm.plugin.version.UnsupportedReleaseGuard`,
in ``version.py`` because it must import nothing release-specific): ``EngineArgs``
refuses ``method: specguard`` at start naming the installed and supported releases.

Front end (API server / ``LLM`` process):
  P1 ``EngineArgs.add_cli_args``: ``--speculative-config`` also takes a path to a
     YAML/JSON file (vLLM parses it with ``json.loads`` only), and a SpecGuard
     config is validated there, so ``vllm serve`` refuses a bad one at start.
  P2 ``EngineArgs.create_speculative_config``: ``method: specguard`` becomes vLLM's
     ``draft_model`` method plus ``additional_config["specguard"]``; on CUDA it also
     forces the settings SpecGuard needs (sync scheduling, V1 runner, PIECEWISE
     CUDA graphs), logging each.
  P3 ``InputProcessor._validate_params``: per-request ``vllm_xargs`` overrides of
     ``tau`` / ``beta`` / ``fallback`` are validated on engines that run SpecGuard (the
     input processor knows its engine's config), so a bad value is an HTTP 400 naming
     it; other engines' xargs are never read.
Worker (model runner):
  P4 ``gpu_model_runner.DraftModelProposer`` (a module-level name, not a class patch):
     replaced by :class:`SpecGuardDraftProposer`, a subclass (k candidates in one
     batched loop), so the runner builds SpecGuard's proposer.
  P5 ``GPUModelRunner.__init__``: attach a :class:`SpecGuardRunnerState`, which swaps
     the ``rejection_sampler`` for :class:`SpecGuardRejectionSampler`.
  P6 ``GPUModelRunner.execute_model``: clear the grounding capture and the last
     verdicts before the target forward, disarm the capture after it.
  P7 ``GPUModelRunner._calc_spec_decode_metadata``: arm the grounding capture with
     each row's number of drafted tokens.
  P8 ``GPUModelRunner._update_states_after_model_execute``: update each request's
     step mode from the committed tokens and the verifier's verdicts.
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

import importlib
import logging

from specguard_vllm.plugin.patching import VllmPatch
from specguard_vllm.plugin.runner_state import SpecGuardRunnerState

logger = logging.getLogger("vllm.specguard")
WRITTEN_FOR = "vLLM 0.32.x"


# ------------------------------------------------------------------ front end

class EngineArgsPatch(VllmPatch):
    target = "vllm.engine.arg_utils:EngineArgs"

    @staticmethod
    def add_cli_args(parser, *args, **kwargs):
        """P1: ``--speculative-config`` also takes a YAML/JSON path and validates SpecGuard.

        vLLM 0.32 parses the flag with ``json.loads``; ours reads a file too and refuses
        a bad SpecGuard config before any model loads. Written for vLLM 0.32.
        """
        from specguard_vllm.plugin.config_bridge import read_speculative_config_arg

        parser = EngineArgsPatch.original("add_cli_args")(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings:
                action.type = read_speculative_config_arg
                action.help = (action.help or "") + (
                    " SpecGuard: also a path to a YAML/JSON file; `method: specguard`.")
        return parser

    def create_speculative_config(self, target_model_config, target_parallel_config):
        """P2: ``method: specguard`` becomes ``draft_model`` + ``additional_config["specguard"]``.

        vLLM knows no ``specguard`` method; its ``draft_model`` plumbing is what the
        proposer builds on. The draft's vocabulary and the grounding layers are checked
        against the target here, before weights load. Written for vLLM 0.32.
        """
        from specguard_vllm.config import ConfigError, config_from_mapping
        from specguard_vllm.plugin.config_bridge import (
            ADDITIONAL_CONFIG_KEY,
            check_draft_vocab,
            check_grounding_layers,
            force_gpu_settings,
            is_specguard,
            load_if_path,
            to_vllm_speculative_config,
        )
        from specguard_vllm.plugin.metrics import enable_worker_metrics

        spec = load_if_path(self.speculative_config)
        if is_specguard(spec):
            try:
                config = config_from_mapping(spec, "speculative_config")
            except ConfigError as error:
                raise ValueError(error.render()) from None
            check_draft_vocab(config.model, target_model_config)
            check_grounding_layers(config.specguard.grounding_layers, target_model_config)
            vllm_spec, block = to_vllm_speculative_config(config)
            self.speculative_config = vllm_spec
            additional = dict(self.additional_config or {})
            additional[ADDITIONAL_CONFIG_KEY] = block
            self.additional_config = additional
            force_gpu_settings(self)
            enable_worker_metrics()
        else:
            self.speculative_config = spec
        return self._orig_create_speculative_config(target_model_config, target_parallel_config)


class InputProcessorPatch(VllmPatch):
    target = "vllm.v1.engine.input_processor:InputProcessor"

    def _validate_params(self, params, *args, **kwargs):
        """P3: validate SpecGuard's per-request ``vllm_xargs`` overrides, on SpecGuard engines only.

        So a bad ``tau`` / ``beta`` / ``fallback`` is an HTTP 400 naming it, not a failure
        inside the worker; an engine without SpecGuard (and other plugins' xargs) never
        sees this check. Written for vLLM 0.32 (``InputProcessor`` knows its engine's config).
        """
        from specguard_vllm.config import ConfigError, SpecGuardParams, apply_request_overrides
        from specguard_vllm.plugin.config_bridge import ADDITIONAL_CONFIG_KEY

        result = self._orig__validate_params(params, *args, **kwargs)
        extra = getattr(params, "extra_args", None)
        if extra and ADDITIONAL_CONFIG_KEY in (self.vllm_config.additional_config or {}):
            try:
                apply_request_overrides(SpecGuardParams(), extra)
            except ConfigError as error:
                problems = "; ".join(f"vllm_xargs.{path}: {msg}" for path, msg in error.problems)
                raise ValueError(f"invalid SpecGuard request override: {problems}") from None
        return result


# ------------------------------------------------------------------ worker

def use_specguard_draft_proposer() -> None:
    """P4: the runner builds :class:`SpecGuardDraftProposer` where it builds ``DraftModelProposer``.

    vLLM 0.32's ``GPUModelRunner.__init__`` looks the class up in its own module, so the
    module-level name is replaced (a subclass: every ``isinstance`` check still holds).
    """
    gpu_model_runner = importlib.import_module("vllm.v1.worker.gpu_model_runner")
    from specguard_vllm.plugin.proposer import SpecGuardDraftProposer

    gpu_model_runner.DraftModelProposer = SpecGuardDraftProposer


class GPUModelRunnerPatch(VllmPatch):
    """P5-P10: each override runs vLLM's method and one step of the runner's SpecGuard state."""

    target = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"

    def __init__(self, *args, **kwargs):
        """P5: attach SpecGuard's state (None unless the engine runs SpecGuard).

        The state swaps in the step verifier and hands the proposer its segmenter and
        metrics. Written for the vLLM 0.32 V1 runner.
        """
        self._orig___init__(*args, **kwargs)
        self.specguard_state = SpecGuardRunnerState.for_runner(self)

    def execute_model(self, *args, **kwargs):
        """P6: a fresh grounding capture and no stale verdicts for each target forward.

        Disarmed afterwards so the draft's forwards never reach the grounding hook.
        Written for vLLM 0.32.
        """
        state = self.specguard_state
        if state is None:
            return self._orig_execute_model(*args, **kwargs)
        state.before_target_forward()
        try:
            return self._orig_execute_model(*args, **kwargs)
        finally:
            state.after_target_forward()

    def _calc_spec_decode_metadata(self, *args, **kwargs):
        """P7: arm the grounding capture with each row's number of drafted tokens.

        This is where vLLM 0.32 fixes the verification rows, just before the forward.
        """
        metadata = self._orig__calc_spec_decode_metadata(*args, **kwargs)
        if self.specguard_state is not None:
            self.specguard_state.arm_grounding(metadata.num_draft_tokens)
        return metadata

    def _update_states_after_model_execute(self, output_token_ids, scheduler_output, *args,
                                           **kwargs):
        """P8: update each request's step mode from what this engine step committed.

        vLLM 0.32 calls this with the sampled tokens right after sampling, before drafting.
        """
        result = self._orig__update_states_after_model_execute(
            output_token_ids, scheduler_output, *args, **kwargs)
        if self.specguard_state is not None:
            self.specguard_state.record_committed(output_token_ids)
        return result

    def propose_draft_token_ids(self, *args, **kwargs):
        """P9: hand the proposer its row hints; cut each proposed row after its step.

        vLLM 0.32 sends the returned rows to the scheduler as next step's drafts, so a
        regenerating request gets none.
        """
        state = self.specguard_state
        if state is None:
            return self._orig_propose_draft_token_ids(*args, **kwargs)
        self.drafter.row_hints = state.draft_row_hints()
        return state.truncate_drafts(self._orig_propose_draft_token_ids(*args, **kwargs))

    def _update_states(self, scheduler_output, *args, **kwargs):
        """P10: forget finished and aborted requests, so no step state outlives them.

        vLLM 0.32 lists them in ``scheduler_output.finished_req_ids``.
        """
        if self.specguard_state is not None:
            self.specguard_state.forget(getattr(scheduler_output, "finished_req_ids", None) or ())
        return self._orig__update_states(scheduler_output, *args, **kwargs)


class GroundingAttentionPatch(VllmPatch):
    """P11, one subclass per attention backend whose paged K cache the grounding reads."""

    optional = True  # a GPU backend whose kernels are not installed here is skipped

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        """P11: after the backend's attention, score the step queries of a grounding layer.

        The keys of this forward are in the paged cache by now; only layers carrying a
        capture (the target's last ``grounding_layers``) do any work. Written for the
        vLLM 0.32 ``AttentionImpl.forward`` signature.
        """
        from specguard_vllm.plugin.grounding_capture import capture_of

        result = self._orig_forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                    *args, **kwargs)
        capture = capture_of(layer)
        if capture is not None and capture.armed:
            capture.on_attention(layer.layer_name, self, query, kv_cache, attn_metadata, key=key,
                                 layer=layer)
        return result


class CPUAttentionPatch(GroundingAttentionPatch):
    target = "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl"


class FlashAttentionPatch(GroundingAttentionPatch):
    target = "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl"


class TritonAttentionPatch(GroundingAttentionPatch):
    target = "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl"


def _worker_state(worker) -> SpecGuardRunnerState | None:
    return getattr(getattr(worker, "model_runner", None), "specguard_state", None)


class WorkerBasePatch(VllmPatch):
    """P12: RPC methods for ``LLM.collective_rpc`` (new names; vLLM 0.32 has none such)."""

    target = "vllm.v1.worker.worker_base:WorkerBase"

    def specguard_counters(self) -> dict:
        """SpecGuard's worker-side totals, or {} when SpecGuard is not active here."""
        state = _worker_state(self)
        return {} if state is None else state.metrics.counters.as_dict()

    def specguard_reset_counters(self) -> bool:
        """Zero the worker-side totals (False when SpecGuard is not active here)."""
        from specguard_vllm.plugin.metrics import StepCounters

        state = _worker_state(self)
        if state is None:
            return False
        state.metrics.counters = StepCounters()
        return True


def apply_all_patches() -> None:
    """Check the installed vLLM, then apply P1-P12 in order (each is idempotent)."""
    from specguard_vllm.plugin.version import check_vllm_version

    check_vllm_version()
    EngineArgsPatch.apply()  # P1, P2
    InputProcessorPatch.apply()  # P3
    use_specguard_draft_proposer()  # P4
    GPUModelRunnerPatch.apply()  # P5-P10
    CPUAttentionPatch.apply()  # P11
    FlashAttentionPatch.apply()
    TritonAttentionPatch.apply()
    WorkerBasePatch.apply()  # P12
    logger.debug("SpecGuard patches applied (written for %s)", WRITTEN_FOR)
