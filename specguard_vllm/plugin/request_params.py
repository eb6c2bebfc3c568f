"""A request's effective SpecGuard knobs: the config's, with its validated ``vllm_xargs``.

The proposer's hints, the draft truncation and the verifier all need them per request at
every engine step; they must agree, so they read them through
:meth:`SpecGuardRunnerState.request_params`, which resolves them here once per request.
"""

from __future__ import annotations

from specguard_vllm.config import ConfigError, SpecGuardParams, apply_request_overrides


def resolve_request_params(request, base: SpecGuardParams) -> SpecGuardParams:
    """``base`` with the overrides in the request's ``extra_args`` (vLLM's ``CachedRequestState``)."""
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    if not extra:
        return base
    try:
        return apply_request_overrides(base, extra)
    except ConfigError:
        return base  # refused at the API server already; never reached there
