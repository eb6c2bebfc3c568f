"""The dispatch's CPU path, and the kernels' compilation for GPU targets without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from specguard_vllm.kernels import GroundingWorkspace, step_grounding_stats, step_min_logprob
from specguard_vllm.kernels.min_logprob_ref import step_min_logprob_ref
from specguard_vllm.kernels.step_grounding_ref import step_grounding_stats_ref
from specguard_vllm.kernels.testing import make_grounding_case, make_logits_case

REPO = Path(__file__).resolve().parents[2]


def test_cpu_dispatch_uses_reference_and_fills_the_workspace():
    case = make_grounding_case([3, 2], [30, 12], seed=9)
    ws = GroundingWorkspace.allocate(8, 4, 4)
    pm, blk = step_grounding_stats(*case.args, **case.kwargs(0.01, max_step_len=4, workspace=ws))
    assert pm.data_ptr() == ws.prefix_mass.data_ptr() and blk.data_ptr() == ws.block.data_ptr()
    pr, br = step_grounding_stats_ref(*case.args, **case.kwargs(0.01, max_step_len=4))
    torch.testing.assert_close(pm[:5], pr)
    torch.testing.assert_close(blk[:5], br)
    logits, tokens, cu, rows = make_logits_case([2, 0, 3], 50)
    got = step_min_logprob(logits, tokens, cu, max_step_len=3, rows=rows)
    want = step_min_logprob_ref(logits, tokens, cu, rows=rows)
    torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "specguard_vllm.kernels.aot", "cuda:90", "cuda:80"],
                         check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    for kernel in ("grounding_pass1", "grounding_pass2", "step_logprob", "draft_sample",
                   "draft_position", "draft_tails", "head_share"):
        for arch in ("sm_90", "sm_80"):
            assert any(kernel in line and arch in line for line in out.stdout.splitlines()), \
                f"{kernel} not compiled for {arch}"


def test_cpu_dispatch_of_draft_sampling_is_the_reference():
    from specguard_vllm.kernels import draft_sample
    from specguard_vllm.kernels.draft_sampling_ref import draft_sample_ref

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=gen)
    u = torch.rand(5, generator=gen)
    greedy = torch.tensor([True, False, True, False, False])
    got = draft_sample(logits, u, greedy, temperature=0.7)
    want = draft_sample_ref(logits, u, greedy, temperature=0.7)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gpu_check_of_the_new_kernels_runs_and_passes_in_the_interpreter(device):
    """`make gpu-check`'s draft-position and TP head-share checks, on small cases here (in
    Triton's interpreter on CPU), so the check a device session runs is known to work."""
    from specguard_vllm.kernels.gpu_check import check_draft_position, check_head_shares

    assert check_draft_position(device, trials=4, vocabs=(97, 300), rows=9) == 0
    assert check_head_shares(device, trials=3, max_ctx=60, head_dim=(16,)) == 0
