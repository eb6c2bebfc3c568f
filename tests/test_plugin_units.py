"""The plugin's pieces that need no engine: version gate, config bridge, patches, step state."""

from __future__ import annotations

import argparse
import json

import pytest

from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.plugin import version
from specguard_vllm.plugin.config_bridge import (
    read_speculative_config_arg,
    specguard_from_additional_config,
    to_vllm_speculative_config,
)
from specguard_vllm.plugin.step_state import StepStateTable

GOOD = {"method": "specguard", "model": "some/draft", "num_speculative_tokens": 8,
        "specguard": {"tau": 0.6}}


@pytest.mark.parametrize("found, ok", [("0.32.0", True), ("0.32.3+cpu", True), ("0.31.2", False),
                                      ("0.33.0", False), ("1.0.0", False), ("garbage", False)])
def test_version_gate_names_the_supported_versions(monkeypatch, found, ok):
    monkeypatch.setattr(version, "installed_vllm", lambda: ("vllm", found))
    if ok:
        assert version.check_vllm_version() == found
    else:
        with pytest.raises(version.UnsupportedVLLMError, match=r"0\.32\.x.*found vllm " + found.replace(".", r"\.")):
            version.check_vllm_version()


def test_version_gate_without_vllm(monkeypatch):
    monkeypatch.setattr(version, "installed_vllm", lambda: None)
    with pytest.raises(version.UnsupportedVLLMError, match="no vLLM is installed"):
        version.check_vllm_version()


def test_installed_vllm_is_supported_here():
    assert version.check_vllm_version().startswith("0.32")


def test_speculative_config_arg_accepts_json_yaml_and_json_files(tmp_path):
    assert read_speculative_config_arg(json.dumps(GOOD)) == GOOD
    yaml_file = tmp_path / "sg.yaml"
    yaml_file.write_text("method: specguard\nmodel: some/draft\nnum_speculative_tokens: 8\n"
                         "specguard:\n  tau: 0.6\n")
    assert read_speculative_config_arg(str(yaml_file)) == GOOD
    json_file = tmp_path / "sg.json"
    json_file.write_text(json.dumps(GOOD))
    assert read_speculative_config_arg(str(json_file)) == GOOD
    # Other methods pass through untouched (vLLM validates them).
    assert read_speculative_config_arg('{"method": "ngram", "num_speculative_tokens": 3}')["method"] == "ngram"
    assert read_speculative_config_arg("None") is None


@pytest.mark.parametrize("value, message", [
    ("/no/such/file.yaml", "neither a JSON object nor an existing"),
    ('{"method": "specguard"', "not valid JSON"),
    (json.dumps({**GOOD, "specguard": {"tau": -1}}), "specguard.tau"),
    (json.dumps({**GOOD, "bogus": 1}), "bogus: unknown key"),
])
def test_speculative_config_arg_refusals_name_the_problem(value, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        read_speculative_config_arg(value)


def test_unsafe_yaml_file_is_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(argparse.ArgumentTypeError, match="bad YAML"):
        read_speculative_config_arg(str(evil))


def test_alias_maps_to_draft_model_and_round_trips_through_additional_config():
    from specguard_vllm.config import config_from_mapping

    config = config_from_mapping(GOOD)
    spec, block = to_vllm_speculative_config(config)
    assert spec == {"method": "draft_model", "model": "some/draft", "num_speculative_tokens": 8}
    again = specguard_from_additional_config({"specguard": block})
    assert again == config
    assert specguard_from_additional_config({}) is None
    assert specguard_from_additional_config(None) is None


def test_patched_vllm_parser_takes_a_path_and_refuses_bad_configs(tmp_path):
    from specguard_vllm.plugin.patches import apply_all_patches

    apply_all_patches()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    good = tmp_path / "good.yaml"
    good.write_text("method: specguard\nmodel: d\nnum_speculative_tokens: 4\n")
    args = parser.parse_args(["--speculative-config", str(good)])
    assert args.speculative_config["method"] == "specguard"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: specguard\nmodel: d\nnum_speculative_tokens: 0\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", str(bad)])


def test_request_override_validation_in_sampling_params():
    from specguard_vllm.plugin.patches import apply_all_patches

    apply_all_patches()
    from vllm import SamplingParams

    SamplingParams(extra_args={"tau": 0.9, "beta": 0.1, "other_plugin_key": "x"})
    with pytest.raises(ValueError, match=r"vllm_xargs\.tau"):
        SamplingParams(extra_args={"tau": -0.5})
    with pytest.raises(ValueError, match=r"vllm_xargs\.beta"):
        SamplingParams(extra_args={"specguard_beta": 7})


VOCAB = ["a", "b", "\n", "</s>"]


def table() -> StepStateTable:
    return StepStateTable(StepSegmenter(lambda ids: "".join(VOCAB[i] for i in ids), 4, ["\n"], [3]))


def test_rejected_step_gets_no_drafts_until_the_target_writes_the_delimiter():
    steps = table()
    steps.after_sampling("r", [0], verified=None)          # prefill token
    assert steps.truncate_draft("r", [1, 0, 2, 1]) == [1, 0, 2]
    steps.after_sampling("r", [1], verified=False)          # step rejected: target's token only
    assert steps.truncate_draft("r", [0, 2]) == []
    steps.after_sampling("r", [0], verified=None)
    assert steps.truncate_draft("r", [0, 2]) == []
    steps.after_sampling("r", [2], verified=None)          # the target ends the step
    assert steps.truncate_draft("r", [0, 0, 2, 0]) == [0, 0, 2]
    steps.after_sampling("r", [0, 0, 2, 1], verified=True)  # accepted + bonus
    assert not steps.get("r").regenerating and steps.get("r").open_step == [1]
    steps.forget(["r"])
    assert len(steps) == 0


def test_rejection_whose_token_ends_the_step_does_not_regenerate():
    steps = table()
    steps.after_sampling("r", [2], verified=False)
    assert not steps.get("r").regenerating
    assert steps.truncate_draft("r", [1, 1]) == [1, 1]


def test_speculative_fallback_verifies_token_level_until_the_step_ends():
    steps = table()
    steps.after_sampling("r", [0], verified=None)
    steps.after_sampling("r", [0, 1], verified="token")       # kept prefix + recovered token
    state = steps.get("r")
    assert state.token_level and not state.regenerating and state.open_step == [0, 0, 1]
    assert steps.truncate_draft("r", [1, 2, 0]) == [1, 2]       # drafts continue the step
    steps.after_sampling("r", [1, 2, 0], verified="token")    # the step ends, bonus opens the next
    state = steps.get("r")
    assert not state.token_level and state.open_step == [0]


def test_speculative_drafts_keep_the_tail_and_remember_the_step_length():
    steps = table()
    steps.after_sampling("r", [0], verified=None)
    # The row runs past the step's end; only the step part is judged, and EOS cuts the row.
    assert steps.truncate_draft("r", [1, 2, 0, 1, 3, 0], keep_tail=True) == [1, 2, 0, 1, 3]
    assert steps.get("r").draft_step_len == 2
    # Accepted step of 2 tokens, then the kept tail [0] and the target's token 1.
    steps.after_sampling("r", [1, 2, 0, 1], verified=True, step_len=2)
    state = steps.get("r")
    assert state.open_step == [0, 1] and not state.token_level
    # Finishing a rejected step token-level: nothing in the row is a step.
    steps.after_sampling("r", [1], verified="token")
    assert steps.truncate_draft("r", [0, 2, 1], keep_tail=True) == [0, 2, 1]
    assert steps.get("r").draft_step_len == 0
    # Without keep_tail the old cut applies and no step length is kept.
    assert steps.truncate_draft("r", [0, 2, 1]) == [0, 2]
    assert steps.get("r").draft_step_len is None


def test_grounding_capture_reuses_one_workspace_per_layer_and_matches_the_reference():
    """The attention hook's path: per-forward indices built once, results in persistent
    workspaces (regrown for a larger batch), equal to the reference on the backend's cache."""
    from types import SimpleNamespace

    import torch

    from specguard_vllm.kernels.step_grounding_ref import step_grounding_stats_ref
    from specguard_vllm.kernels.testing import make_grounding_case
    from specguard_vllm.plugin.grounding_capture import GroundingCapture

    capture = GroundingCapture({"model.layers.0.attn": 0, "model.layers.1.attn": 1}, 0.01, "CPU_ATTN")
    seen = {}
    for steps, ctxs in (([3, 0, 2], [40, 9, 70]), ([4, 1, 3, 2], [20, 33, 5, 90]), ([1], [12])):
        case = make_grounding_case(steps, ctxs, layout="CPU", extra_rows=1, seed=len(steps))
        n = torch.tensor(steps, dtype=torch.int32)
        qsl = torch.cat([torch.zeros(1, dtype=torch.int32), (case.query_start + n).to(torch.int32)])
        metadata = SimpleNamespace(query_start_loc=qsl, seq_lens=case.seq_lens,
                                   block_table=case.block_table)
        impl = SimpleNamespace(head_size=case.query.shape[2], scale=case.scale)
        capture.arm(steps)
        for name in ("model.layers.0.attn", "model.layers.1.attn"):
            capture.on_attention(name, impl, case.query, case.kv_cache, metadata)
        assert capture.complete_for(steps)
        want_pm, want_blk = step_grounding_stats_ref(
            case.query, case.k_view, case.block_table, case.seq_lens, case.cu_step_lens,
            scale=case.scale, sparsity=0.01, max_step_len=max(steps), query_start=case.query_start)
        t = sum(steps)
        for position in (0, 1):
            torch.testing.assert_close(capture.batch.prefix_mass[position][:t], want_pm)
            torch.testing.assert_close(capture.batch.block[position][:t, :max(steps)], want_blk)
            ws = capture.workspaces[position]
            assert ws.fits(len(steps) * max(steps), 1, len(steps), max(steps))
            seen.setdefault(position, []).append(ws)
        assert capture.seconds > 0
        capture.seconds = 0.0
        assert capture.seconds == 0.0
        capture.clear()
    # Regrown once for the larger second batch, then reused for the smaller third.
    assert all(ws[0] is not ws[1] and ws[1] is ws[2] for ws in seen.values())


def test_verifier_grounding_rolls_out_every_row_at_once_and_ignores_tails():
    """_grounding on captured statistics: each row's G_min over its step (not its tail),
    1.0 for rows without a step, equal to the per-request rollout."""
    from types import SimpleNamespace

    import torch

    from specguard_vllm.core.grounding import rollout_grounding, step_attention_stats
    from specguard_vllm.plugin import grounding_capture
    from specguard_vllm.plugin.verifier import SpecGuardRejectionSampler

    gen = torch.Generator().manual_seed(5)
    num_drafts, step_lens, k = [4, 0, 3, 5], [2, 0, 3, 5], 6
    rows = sum(num_drafts) + 3  # a workspace holds more rows than this batch uses
    capture = grounding_capture.GroundingCapture({"a": 0, "b": 1}, 0.01, "CPU_ATTN")
    capture.arm(num_drafts)
    masses, blocks = [], []
    for layer in range(2):
        pm, blk = torch.full((rows,), 7.0), torch.full((rows, k), 9.0)  # garbage outside steps
        offset = 0
        for n in num_drafts:
            if n:
                probs = torch.rand(2, n, 11 + n, generator=gen)
                probs = probs.masked_fill(torch.arange(11 + n) > 11 + torch.arange(n)[:, None], 0)
                p, b = step_attention_stats(probs / probs.sum(-1, keepdim=True), 11, 0.01)
                pm[offset: offset + n], blk[offset: offset + n, :n] = p, b
            offset += n
        capture.batch.prefix_mass[layer], capture.batch.block[layer] = pm, blk
        masses.append(pm)
        blocks.append(blk)
    grounding_capture.ACTIVE = capture
    try:
        got = SpecGuardRejectionSampler._grounding(
            SimpleNamespace(metrics=None), SimpleNamespace(num_draft_tokens=num_drafts), "cpu",
            step_lens)
    finally:
        grounding_capture.ACTIVE = None
    want, offset = [], 0
    for n, m in zip(num_drafts, step_lens):
        if m == 0:
            want.append(1.0)
        else:
            pm = torch.stack([x[offset: offset + m] for x in masses])
            blk = torch.stack([x[offset: offset + m, :m] for x in blocks])
            want.append(float(rollout_grounding(pm, blk).min()))
        offset += n
    torch.testing.assert_close(got, torch.tensor(want))
    assert capture.batch is None  # consumed, ready for the next forward


def test_layout_selfcheck_passes_on_written_keys_and_names_the_backend_when_they_differ():
    from types import SimpleNamespace

    import torch

    from specguard_vllm.kernels.kv_layout import k_cache_view
    from specguard_vllm.kernels.testing import alloc_kv_cache
    from specguard_vllm.plugin.grounding_selfcheck import check_cache_layout

    kv_cache, backend = alloc_kv_cache(4, 2, 16, 8, "NHD", torch.float32, "cpu")
    key = torch.randn(5, 2 * 8)  # [tokens, kv_heads * head_size], as some models pass it
    slots = torch.tensor([17, 18, 40, -1, 3])  # one padded token (slot -1)
    key_cache = kv_cache.transpose(1, 2).split(8, dim=-1)[0]  # what reshape_and_cache_flash writes
    written = slots >= 0
    key_cache[slots[written] // 16, slots[written] % 16] = key.view(5, 2, 8)[written]
    k_view = k_cache_view(kv_cache, backend, 8)
    metadata = SimpleNamespace(slot_mapping=slots, num_actual_tokens=5)
    assert check_cache_layout(k_view, key, metadata, backend, layer=None)
    assert not check_cache_layout(k_view, None, metadata, backend, layer=None)  # cannot tell
    with pytest.raises(RuntimeError, match=r"FLASH_ATTN KV cache \(ISA 'amx'\) is not laid out"):
        check_cache_layout(k_view, key + 1.0, metadata, backend, layer=SimpleNamespace(isa="amx"))


def test_kernel_selfcheck_switches_the_process_to_the_reference_on_disagreement():
    import torch

    from specguard_vllm.kernels import dispatch
    from specguard_vllm.plugin.grounding_selfcheck import check_kernel

    pm, blk = torch.rand(6), torch.rand(6, 4)
    try:
        assert check_kernel((pm, blk), (pm.clone(), blk.clone()), rows=6, step=4)
        assert dispatch._TRITON_DISABLED is None
        off = blk.clone()
        off[2, 1] += 0.01
        assert not check_kernel((pm, blk), (pm, off), rows=6, step=4)
        assert "differs from its PyTorch reference" in dispatch._TRITON_DISABLED
        assert not dispatch.use_triton(torch.empty(1))
    finally:
        dispatch._TRITON_DISABLED = None
