"""A request's effective SpecGuard knobs: the config's, with its validated ``vllm_xargs``.

The proposer's hints, the draft truncation and the verifier all need them per request at
every engine step; they must agree, so they read them here. A request's overrides never
change, so they are validated once and kept in its step state (dropped with the request).
"""

from __future__ import annotations

from specguard_vllm.config import ConfigError, SpecGuardParams, apply_request_overrides


def request_params(runner, req_id: str, base: SpecGuardParams) -> SpecGuardParams:
    state = getattr(runner, "_specguard", None)
    steps = state.steps.get(req_id) if state is not None else None
    if steps is not None and steps.params is not None:
        return steps.params
    params = _resolve(runner, req_id, base)
    if steps is not None:
        steps.params = params
    return params


def _resolve(runner, req_id: str, base: SpecGuardParams) -> SpecGuardParams:
    request = getattr(runner, "requests", {}).get(req_id)
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    if not extra:
        return base
    try:
        return apply_request_overrides(base, extra)
    except ConfigError:
        return base  # refused at the API server already; never reached there
