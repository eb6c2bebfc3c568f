"""The plugin's pieces that need no engine: version gate, config bridge, patches, step state."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.plugin import version
from specguard_vllm.plugin.config_bridge import (
    read_speculative_config_arg,
    specguard_from_additional_config,
    to_vllm_speculative_config,
)
from specguard_vllm.plugin.step_state import (
    NO_STEP,
    RowVerdict,
    StepMode,
    StepStateTable,
    Verdict,
)

REPO = Path(__file__).resolve().parents[1]

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


class _Target:
    """A stand-in for a vLLM class (patched by the tests below, never by the plugin)."""

    def greet(self, name):
        return f"hello {name}"

    @staticmethod
    def build(x):
        return [x]


class _Child(_Target):
    pass


def test_vllm_patch_keeps_originals_reachable_and_applies_once():
    from specguard_vllm.plugin.patching import VllmPatch

    class Patch(VllmPatch):
        target = f"{__name__}:_Target"

        def greet(self, name):
            return self._orig_greet(name).upper()

        @staticmethod
        def build(x):
            return Patch.original("build")(x) + ["patched"]

        def added(self):
            return "new"

    class ChildPatch(VllmPatch):
        target = f"{__name__}:_Child"

        def added(self):
            return "child"

    Patch.apply()
    Patch.apply()  # idempotent: read off the target class, not a module flag
    ChildPatch.apply()  # the parent's record does not count for the child
    assert _Target().greet("x") == "HELLO X"
    assert _Target.build(1) == [1, "patched"]  # once, not twice
    assert _Target().added() == "new" and not hasattr(_Target, "_orig_added")
    assert _Child().added() == "child" and _Child().greet("y") == "HELLO Y"
    assert _Target._specguard_patches == ("Patch",)
    assert _Child._specguard_patches == ("ChildPatch",)


def test_optional_patch_of_a_missing_backend_is_skipped():
    from specguard_vllm.plugin.patches import GroundingAttentionPatch

    class Missing(GroundingAttentionPatch):
        target = "no_such_module_here:Impl"

    Missing.apply()  # no error: a GPU backend that is not installed
    assert set(Missing.overrides()) == {"forward"}


class _AttentionImpl:
    """A stand-in for a backend's ``AttentionImpl`` (patched by the test below)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, **kwargs):
        layer.log.append(("attention", layer.layer_name))
        return output


def test_attention_hook_finds_the_capture_on_grounding_layers_only():
    from types import SimpleNamespace

    from specguard_vllm.plugin.grounding_capture import GroundingCapture, capture_of
    from specguard_vllm.plugin.patches import GroundingAttentionPatch

    class Capture(GroundingCapture):
        def on_attention(self, layer_name, impl, query, kv_cache, attn_metadata, key=None, layer=None):
            layer.log.append(("grounding", layer_name))

    class Patch(GroundingAttentionPatch):
        target = f"{__name__}:_AttentionImpl"

    Patch.apply()
    log = []
    grounding = SimpleNamespace(layer_name="model.layers.1.attn", log=log)
    other = SimpleNamespace(layer_name="model.layers.0.attn", log=log)
    capture = Capture({"model.layers.1.attn": 0}, 0.01, "CPU_ATTN")
    capture.attach_to([grounding])
    assert capture_of(grounding) is capture and capture_of(other) is None
    impl = _AttentionImpl()
    assert impl.forward(grounding, None, None, None, None, None, output="out") == "out"  # disarmed
    capture.arm([2])
    impl.forward(other, None, None, None, None, None, output="out")
    impl.forward(grounding, None, None, None, None, None, output="out")
    assert log == [("attention", "model.layers.1.attn"), ("attention", "model.layers.0.attn"),
                   ("attention", "model.layers.1.attn"), ("grounding", "model.layers.1.attn")]


def test_every_patch_is_applied_once_to_its_vllm_class():
    from specguard_vllm.plugin import patches

    patches.apply_all_patches()
    patches.apply_all_patches()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.worker import gpu_model_runner

    from specguard_vllm.plugin.proposer import SpecGuardDraftProposer

    for patch in (patches.EngineArgsPatch, patches.InputProcessorPatch, patches.GPUModelRunnerPatch,
                  patches.CPUAttentionPatch, patches.WorkerBasePatch):
        assert vars(patch.target_class())["_specguard_patches"] == (patch.__name__,)
    assert gpu_model_runner.DraftModelProposer is SpecGuardDraftProposer
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    (action,) = [a for a in parser._actions if "--speculative-config" in a.option_strings]
    assert action.help.count("SpecGuard: also a path") == 1


def test_request_overrides_are_validated_by_specguard_engines_only():
    from types import SimpleNamespace

    from specguard_vllm.plugin.patches import apply_all_patches

    apply_all_patches()
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    def processor(additional_config):
        return SimpleNamespace(_orig__validate_params=lambda params, *a, **k: None,
                               vllm_config=SimpleNamespace(additional_config=additional_config))

    from vllm.exceptions import VLLMValidationError

    from specguard_vllm.config import load_config
    from specguard_vllm.plugin.config_bridge import to_vllm_speculative_config

    _, block = to_vllm_speculative_config(load_config(REPO / "configs" / "specguard.yaml"))
    specguard, plain = processor({"specguard": block}), processor(None)
    validate = InputProcessor._validate_params
    validate(specguard, SamplingParams(extra_args={"tau": 0.9, "beta": 0.1, "other_plugin_key": "x"}))
    with pytest.raises(VLLMValidationError, match=r"vllm_xargs\.tau"):  # an HTTP 400
        validate(specguard, SamplingParams(extra_args={"tau": -0.5}))
    with pytest.raises(VLLMValidationError, match=r"vllm_xargs\.beta"):
        validate(specguard, SamplingParams(extra_args={"specguard_beta": 7}))
    # Another plugin's "tau" means something else: an engine without SpecGuard never reads it.
    validate(plain, SamplingParams(extra_args={"tau": "nucleus", "fallback": 3}))


VOCAB = ["a", "b", "\n", "</s>"]


def table() -> StepStateTable:
    return StepStateTable(StepSegmenter(lambda ids: "".join(VOCAB[i] for i in ids), 4, ["\n"], [3]))


ACCEPTED, REJECTED, TOKEN_LEVEL = (RowVerdict(Verdict.ACCEPTED), RowVerdict(Verdict.REJECTED),
                                   RowVerdict(Verdict.TOKEN_LEVEL))


def test_rejected_step_gets_no_drafts_until_the_target_writes_the_delimiter():
    steps = table()
    steps.after_sampling("r", [0], NO_STEP)          # prefill token
    assert steps.truncate_draft("r", [1, 0, 2, 1]).tokens == [1, 0, 2]
    steps.after_sampling("r", [1], REJECTED)          # step rejected: target's token only
    assert steps.truncate_draft("r", [0, 2]).tokens == []
    steps.after_sampling("r", [0], NO_STEP)
    assert steps.truncate_draft("r", [0, 2]).tokens == []
    steps.after_sampling("r", [2], NO_STEP)          # the target ends the step
    assert steps.truncate_draft("r", [0, 0, 2, 0]).tokens == [0, 0, 2]
    steps.after_sampling("r", [0, 0, 2, 1], ACCEPTED)  # accepted + bonus
    assert steps.get("r").mode is not StepMode.REGENERATING and steps.get("r").open_len == 1
    steps.forget(["r"])
    assert len(steps) == 0


def test_rejection_whose_token_ends_the_step_does_not_regenerate():
    steps = table()
    steps.after_sampling("r", [2], REJECTED)
    assert steps.get("r").mode is not StepMode.REGENERATING
    assert steps.truncate_draft("r", [1, 1]).tokens == [1, 1]


def test_speculative_fallback_verifies_token_level_until_the_step_ends():
    steps = table()
    steps.after_sampling("r", [0], NO_STEP)
    steps.after_sampling("r", [0, 1], TOKEN_LEVEL)       # kept prefix + recovered token
    state = steps.get("r")
    assert state.mode is StepMode.TOKEN_LEVEL and state.open_len == 3
    assert steps.truncate_draft("r", [1, 2, 0]).tokens == [1, 2]       # drafts continue the step
    steps.after_sampling("r", [1, 2, 0], TOKEN_LEVEL)    # the step ends, bonus opens the next
    state = steps.get("r")
    assert state.mode is not StepMode.TOKEN_LEVEL and state.open_len == 1


def test_speculative_drafts_keep_the_tail_and_remember_the_step_length():
    steps = table()
    steps.after_sampling("r", [0], NO_STEP)
    # The row runs past the step's end; only the step part is judged, and EOS cuts the row.
    draft = steps.truncate_draft("r", [1, 2, 0, 1, 3, 0], keep_tail=True)
    assert draft.tokens == [1, 2, 0, 1, 3]
    assert draft.step_len == 2
    # Accepted step of 2 tokens, then the kept tail [0] and the target's token 1.
    steps.after_sampling("r", [1, 2, 0, 1], RowVerdict(Verdict.ACCEPTED, step_len=2))
    state = steps.get("r")
    assert state.open_len == 2 and state.mode is not StepMode.TOKEN_LEVEL
    # Finishing a rejected step token-level: nothing in the row is a step.
    steps.after_sampling("r", [1], TOKEN_LEVEL)
    draft = steps.truncate_draft("r", [0, 2, 1], keep_tail=True)
    assert draft.tokens == [0, 2, 1]
    assert draft.step_len == 0
    # Without keep_tail the old cut applies and no step length is kept.
    draft = steps.truncate_draft("r", [0, 2, 1])
    assert draft.tokens == [0, 2]
    assert draft.step_len is None


def test_proposed_step_lengths_hand_off_each_length_to_one_verification():
    import numpy as np

    from specguard_vllm.plugin.step_state import NO_LENGTH

    steps = table()
    slots = steps.slots(["a", "b", "c"])
    steps.record_proposed(slots, np.array([3, NO_LENGTH, 1]))
    # Rows without drafts take nothing and keep their entry for their next verification.
    assert steps.take_proposed(slots, np.array([True, True, False])).tolist() == [3, NO_LENGTH,
                                                                                 NO_LENGTH]
    assert steps.take_proposed(slots, np.array([True, True, True])).tolist() == [NO_LENGTH,
                                                                                NO_LENGTH, 1]
    steps.record_proposed(slots[2:], np.array([4]))
    steps.forget(["c"])
    assert steps.take_proposed(steps.slots(["c"]), np.array([True])).tolist() == [NO_LENGTH]


def test_step_table_slots_are_reused_and_grow_past_their_capacity():
    steps = StepStateTable(table().segmenter, capacity=2)
    first = steps.slots(["a", "b"]).tolist()
    assert steps.slots(["a", "b"]).tolist() == first and len(steps) == 2
    steps.after_sampling("a", [0, 1], NO_STEP)
    grown = steps.slots(["a", "b", "c", "d", "e"]).tolist()  # past capacity: arrays grow
    assert grown[:2] == first and len(set(grown)) == 5 and steps.get("a").open_len == 2
    steps.forget(["a"])
    reused = steps.slots(["f"]).tolist()[0]
    assert reused == first[0] and steps.get("f").open_len == 0  # a fresh request's state


def _after_sampling_one_token_at_a_time(segmenter, state, tokens, row):
    """The step table's rule written per token (mode, automaton state, open step length)."""
    mode, automaton, open_len = state

    def push(mode, automaton, open_len, token):
        nxt = segmenter.advance(automaton, token)
        if nxt == segmenter.END:
            return StepMode.DRAFTING, 0, 0
        return mode, nxt, open_len + 1

    if not tokens:
        return state
    if row.verdict is Verdict.REJECTED:
        return push(StepMode.REGENERATING, automaton, open_len, tokens[0])
    if row.verdict is Verdict.ACCEPTED:
        mode, automaton, open_len = StepMode.DRAFTING, 0, 0
        tokens = tokens[-1:] if row.step_len is None else tokens[row.step_len:]
    elif row.verdict is Verdict.TOKEN_LEVEL:
        mode = StepMode.TOKEN_LEVEL
    for token in tokens:
        mode, automaton, open_len = push(mode, automaton, open_len, token)
    return mode, automaton, open_len


def test_batched_after_sampling_follows_the_rule_token_by_token():
    """The engine's one call for the batch gives each request the state a token-by-token
    walk of the rule gives (multi-token delimiter, EOS, every verdict, ragged rows)."""
    import numpy as np

    from specguard_vllm.plugin.step_state import NO_LENGTH

    vocab = ["a", "b", "\n", "</s>", "x\n", "\n\n"]
    segmenter = StepSegmenter(lambda ids: "".join(vocab[i] for i in ids), len(vocab),
                              ["\n\n", "b."], [3])
    rng = np.random.default_rng(0)
    steps = StepStateTable(segmenter)
    ids = [f"r{i}" for i in range(8)]
    expected = {r: (StepMode.DRAFTING, 0, 0) for r in ids}
    for _ in range(60):
        width = int(rng.integers(1, 7))
        tokens = rng.integers(0, len(vocab), size=(8, width))
        counts = rng.integers(0, width + 1, size=8)
        kinds = rng.integers(0, 4, size=8).astype(np.int8)
        lens = np.where(kinds == Verdict.ACCEPTED, rng.integers(-1, width + 1, size=8), NO_LENGTH)
        steps.after_sampling_rows(steps.slots(ids), tokens, counts, kinds, lens)
        for i, req_id in enumerate(ids):
            row = RowVerdict(Verdict(int(kinds[i])), None if lens[i] < 0 else int(lens[i]))
            expected[req_id] = _after_sampling_one_token_at_a_time(
                segmenter, expected[req_id], tokens[i, : counts[i]].tolist(), row)
            got = steps.get(req_id)
            assert (got.mode, got.open_state, got.open_len) == expected[req_id]


def test_verdicts_name_each_rows_outcome_and_ignore_rows_they_did_not_see():
    import numpy as np

    from specguard_vllm.plugin.step_state import StepVerdicts, row_verdicts

    # Rows: accepted step, rejected step, verified token-level (judged or not), not judged.
    kinds, lens = row_verdicts(judged=np.array([True, True, False, True, False]),
                               accepted=np.array([True, False, False, True, False]),
                               token_level=np.array([False, False, True, True, False]),
                               cut=np.array([3, 3, 0, 2, 0]))
    assert kinds.tolist() == [Verdict.ACCEPTED, Verdict.REJECTED, Verdict.TOKEN_LEVEL,
                              Verdict.TOKEN_LEVEL, Verdict.NO_STEP]
    assert lens.tolist() == [3, -1, -1, -1, -1]
    verdicts = StepVerdicts.of(["a", "b"], [REJECTED, RowVerdict(Verdict.ACCEPTED, 2)])
    assert verdicts.row(1, "b") == RowVerdict(Verdict.ACCEPTED, 2)
    assert verdicts.row(1, "a") == NO_STEP and verdicts.row(2, "c") == NO_STEP
    kinds, lens = verdicts.for_batch(["a", "x", "c"])  # row 1 is another request now
    assert kinds.tolist() == [Verdict.REJECTED, Verdict.NO_STEP, Verdict.NO_STEP]
    assert lens.tolist() == [-1, -1, -1]
    assert verdicts.for_batch(["a", "b"])[1].tolist() == [-1, 2]


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
        assert capture.take_timing().seconds > 0  # read once the layers ran (here: at once)
        assert capture.take_timing().seconds == 0.0  # a take starts a new count
        capture.clear()
    # Regrown once for the larger second batch, then reused for the smaller third.
    assert all(ws[0] is not ws[1] and ws[1] is ws[2] for ws in seen.values())


def test_verifier_grounding_rolls_out_every_row_at_once_and_ignores_tails():
    """_grounding on captured statistics: each row's G_min over its step (not its tail),
    1.0 for rows without a step, equal to the per-request rollout."""
    from types import SimpleNamespace

    import torch

    from specguard_vllm.core.grounding import rollout_grounding, step_attention_stats
    from specguard_vllm.plugin.grounding_capture import GroundingCapture
    from specguard_vllm.plugin.verifier import SpecGuardRejectionSampler

    gen = torch.Generator().manual_seed(5)
    num_drafts, step_lens, k = [4, 0, 3, 5], [2, 0, 3, 5], 6
    rows = sum(num_drafts) + 3  # a workspace holds more rows than this batch uses
    capture = GroundingCapture({"a": 0, "b": 1}, 0.01, "CPU_ATTN")
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
    verifier = SimpleNamespace(metrics=None, state=SimpleNamespace(capture=capture))
    got = SpecGuardRejectionSampler._grounding(
        verifier, SimpleNamespace(num_draft_tokens=num_drafts), "cpu", step_lens,
        torch.tensor(num_drafts), torch.tensor(step_lens))
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


def test_batched_draft_cuts_follow_the_rule_row_by_row():
    """truncate_rows (the engine's array cut) against the rule written per row."""
    import numpy as np

    from specguard_vllm.plugin.step_state import NO_LENGTH

    rng = np.random.default_rng(1)
    steps = table()
    ids = [f"r{i}" for i in range(16)]
    slots = steps.slots(ids)
    for _ in range(30):
        steps.mode[slots] = rng.integers(0, 3, size=16)
        draft_lens = rng.integers(0, 9, size=16)
        step_ends = np.where(rng.random(16) < 0.3, 0, rng.integers(1, 9, size=16))
        step_ends = np.minimum(step_ends, draft_lens)  # a step ends inside its row's draft
        eos_ends = np.where(rng.random(16) < 0.5, 0, rng.integers(1, 12, size=16))
        keep_tail = rng.random(16) < 0.5
        lengths, step_lens = steps.truncate_rows(slots, draft_lens, step_ends, eos_ends, keep_tail)
        for i in range(16):
            mode, n, end, eos = StepMode(int(steps.mode[slots[i]])), draft_lens[i], step_ends[i], eos_ends[i]
            if mode is StepMode.REGENERATING:
                want = (0, NO_LENGTH)
            elif not keep_tail[i]:
                want = (min(end, n) if end else n, NO_LENGTH)
            else:
                kept = min(eos, n) if eos else n
                want = (kept, 0 if mode is StepMode.TOKEN_LEVEL else (end if end else kept))
            assert (lengths[i], step_lens[i]) == want
