"""A request's effective SpecGuard knobs: the config's, with its validated ``vllm_xargs``.

The proposer's hints, the draft truncation and the verifier all need them per request at
every engine step; they must agree, so they read them through
:meth:`SpecGuardRunnerState.request_params`, which resolves them here once per request.
"""

from __future__ import annotations

from specguard_vllm.config import (
    ConfigError,
    SpecGuardParams,
    apply_request_overrides,
    request_opts_out,
)


def refuse_bad_request_overrides(extra_args, vllm_config) -> None:
    """Raise vLLM's validation error (an HTTP 400) naming each bad SpecGuard ``vllm_xargs`` value.

    Only on an engine that runs SpecGuard: other engines, and other plugins' xargs, are
    never read. The overrides are checked on top of the engine's own SpecGuard params, so
    a value that only clashes with the served config is refused too.
    """
    if not extra_args or vllm_config is None:
        return
    from specguard_vllm.plugin.config_bridge import specguard_from_additional_config

    config = specguard_from_additional_config(getattr(vllm_config, "additional_config", None))
    if config is None:
        return
    try:
        apply_request_overrides(config.specguard, extra_args)
    except ConfigError as error:
        from vllm.exceptions import VLLMValidationError

        problems = "; ".join(f"vllm_xargs.{path}: {msg}" for path, msg in error.problems)
        raise VLLMValidationError(
            f"invalid SpecGuard request override: {problems}", parameter="vllm_xargs"
        ) from None


def _extra_args(request) -> dict | None:
    return getattr(getattr(request, "sampling_params", None), "extra_args", None)


def resolve_request_params(request, base: SpecGuardParams) -> SpecGuardParams:
    """``base`` with the overrides in the request's ``extra_args`` (vLLM's ``CachedRequestState``)."""
    extra = _extra_args(request)
    if not extra:
        return base
    try:
        return apply_request_overrides(base, extra)
    except ConfigError:
        return base  # refused at the API server already; never reached there


def resolve_opt_out(request) -> bool:
    """Whether the request turned SpecGuard off (``vllm_xargs: {"specguard": false}``)."""
    extra = _extra_args(request)
    if not extra:
        return False
    try:
        return request_opts_out(extra)
    except ConfigError:
        return False  # refused at the API server already; never reached there
