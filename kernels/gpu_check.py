"""`make gpu-check`: every kernel against its reference on CUDA, a CUDA-graph replay, then the benchmark.

Needs only torch and triton (no vLLM, no network); about 2-4 minutes on an H100,
most of it Triton JIT compilation and the benchmark grid.

    python -m specguard_vllm.kernels.gpu_check [--json PATH] [--full]   # installed
    python -m kernels.gpu_check [--json PATH] [--full]                  # bare box, repo root
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

if __package__ == "kernels":
    # A bare GPU box runs this from the repo root without installing the package; the
    # benchmark imports the installed name, so point it at this same folder.
    import specguard_vllm

    sys.modules.setdefault("specguard_vllm.kernels", sys.modules["kernels"])
    specguard_vllm.kernels = sys.modules["kernels"]


def check_grounding() -> int:
    from .step_grounding import step_grounding_stats_triton
    from .step_grounding_ref import step_grounding_stats_ref
    from .testing import LAYOUTS, make_grounding_case, threshold_margin

    rng, failures, worst = random.Random(0), 0, 0.0
    configs = [(l, dt) for l in LAYOUTS[:3] for dt in (torch.float32, torch.float16, torch.bfloat16)]
    for trial in range(24):
        layout, dtype = configs[trial % len(configs)]
        hkv, group = rng.choice([(1, 8), (2, 4), (8, 4), (4, 1), (2, 3)])
        steps = [rng.randint(0, 8) for _ in range(rng.randint(1, 5))]
        ctxs = [rng.randint(0, 3000) for _ in steps]
        case = make_grounding_case(steps, ctxs, num_heads=hkv * group, num_kv_heads=hkv,
                                   head_dim=rng.choice([64, 128]), block_size=rng.choice([16, 32]),
                                   dtype=dtype, layout=layout, device="cuda", max_step_len=8,
                                   extra_rows=rng.randint(0, 2), q_gain=2.0, seed=trial)
        sparsity = rng.choice([0.0, 0.01, 0.05, 1.0])
        if threshold_margin(case, sparsity) < 1e-5:
            continue
        pm, blk = step_grounding_stats_triton(*case.args, **case.kwargs(sparsity))
        pr, br = step_grounding_stats_ref(*case.args, **case.kwargs(sparsity))
        t = case.num_step_tokens
        err = max((pm[:t] - pr).abs().max().item() if t else 0.0,
                  (blk[:t] - br).abs().max().item() if t else 0.0)
        worst = max(worst, err)
        if err > 1e-3:
            failures += 1
            print(f"  FAIL grounding {layout} {dtype} gqa {hkv}x{group} steps {steps} ctx {ctxs} "
                  f"sparsity {sparsity}: max err {err:.2e}")
    print(f"grounding vs reference: 24 random ragged batches, worst abs err {worst:.2e}, "
          f"{failures} failures")
    return failures


def check_arrival_ordering(repeats: int = 40) -> int:
    """Many chunks per request, run again and again on one workspace.

    The last chunk of a request to finish merges the others' partial results
    (``arrive_last``); a memory-ordering bug there shows as an occasional wrong
    row, which the interpreter cannot reveal. Every repeat is checked.
    """
    from .step_grounding import step_grounding_stats_triton
    from .step_grounding_ref import step_grounding_stats_ref
    from .testing import make_grounding_case
    from .workspace import GroundingWorkspace

    failures, worst = 0, 0.0
    for steps, ctxs, splits, block_n in (([8], [32760], None, None),
                                         ([3, 8, 1], [9000, 4000, 20000], 300, 16)):
        case = make_grounding_case(steps, ctxs, num_heads=32, num_kv_heads=8, head_dim=128,
                                   dtype=torch.bfloat16, device="cuda", max_step_len=8, seed=21)
        ws = GroundingWorkspace.allocate(len(steps) * 8, 32, 8, max_splits=splits or 512,
                                         device="cuda", max_batch=len(steps))
        pr, br = step_grounding_stats_ref(*case.args, **case.kwargs(0.01))
        t = case.num_step_tokens
        bad = 0
        for _ in range(repeats):
            ws.prefix_mass.fill_(float("nan"))
            pm, blk = step_grounding_stats_triton(*case.args, **case.kwargs(
                0.01, workspace=ws, num_splits=splits, block_n=block_n))
            err = max((pm[:t] - pr).abs().max().item(), (blk[:t] - br).abs().max().item())
            worst = max(worst, err)
            bad += not err < 1e-3
        left = int(ws.counters.abs().sum())
        failures += bad + (left != 0)
        print(f"arrival ordering (steps {steps}, ctx {ctxs}, splits {splits or 'default'}): "
              f"{repeats} repeats, {bad} wrong, counters left {left}")
    print(f"arrival ordering: worst abs err {worst:.2e}, {failures} failures")
    return failures


def check_cuda_graph() -> int:
    """Capture once; replay after writing other lengths, steps and queries into the static inputs.

    Both scorer kernels are in the graph, with their static arrival counters.
    """
    from .min_logprob import step_min_logprob_triton
    from .min_logprob_ref import step_min_logprob_ref
    from .step_grounding import step_grounding_stats_triton
    from .step_grounding_ref import step_grounding_stats_ref
    from .testing import make_grounding_case, make_logits_case
    from .workspace import GroundingWorkspace

    case = make_grounding_case([4, 4, 4], [500, 2000, 3000], num_heads=8, num_kv_heads=2,
                               head_dim=128, dtype=torch.bfloat16, device="cuda", max_step_len=4,
                               seed=11)
    q, table = case.query, case.block_table
    seq_lens, cu, q0 = case.seq_lens.clone(), case.cu_step_lens.clone(), case.query_start.clone()
    ws = GroundingWorkspace.allocate(q.shape[0], 8, 4, device="cuda", max_batch=3)
    kw = {"scale": case.scale, "sparsity": 0.01, "max_step_len": 4, "query_start": q0,
          "workspace": ws}
    args = (q, case.k_view, table, seq_lens, cu)
    logits, tokens, _, rows = make_logits_case([4, 4, 4], 32000, dtype=torch.bfloat16,
                                               device="cuda", seed=12)
    counters = torch.zeros(3, dtype=torch.int32, device="cuda")
    lp_out = torch.empty(12, device="cuda")
    min_out = torch.empty(3, device="cuda")

    def scorer():
        step_grounding_stats_triton(*args, **kw)
        step_min_logprob_triton(logits, tokens, cu, max_step_len=4, rows=rows,
                                token_logprobs=lp_out, min_logprob=min_out, counters=counters)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        scorer()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scorer()
    failures = 0
    # Shorter contexts (prefixes of the same blocks), other step lengths (one empty), new queries.
    for lens, steps in (([504, 2004, 3004], [4, 4, 4]), ([1200, 7, 2999], [2, 0, 3])):
        seq_lens.copy_(torch.tensor(lens))
        cu.copy_(torch.tensor([0, *torch.tensor(steps).cumsum(0).tolist()]))
        q0.copy_(cu[:-1])
        q.copy_(torch.randn_like(q) * 2)
        logits.copy_(torch.randn_like(logits) * 3)
        ws.prefix_mass.fill_(float("nan"))
        min_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        pr, br = step_grounding_stats_ref(*args, scale=case.scale, sparsity=0.01, max_step_len=4,
                                          query_start=q0)
        t = int(cu[-1])
        _, want_min = step_min_logprob_ref(logits, tokens[:t], cu, rows=rows[:t])
        err = max((ws.prefix_mass[:t] - pr).abs().max().item(),
                  (ws.block[:t] - br).abs().max().item(),
                  (min_out - want_min).abs().max().item())
        ok = err < 1e-3 and int(counters.abs().sum()) == 0
        failures += not ok
        print(f"cuda graph replay (seq_lens {lens}, steps {steps}): max err {err:.2e} "
              f"{'ok' if ok else 'FAIL'}")
    return failures


def check_min_logprob() -> int:
    from .min_logprob import step_min_logprob_triton
    from .min_logprob_ref import step_min_logprob_ref
    from .testing import make_logits_case

    failures, worst = 0, 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for vocab in (1000, 32000, 128256, 151936):
            logits, tokens, cu, rows = make_logits_case([4, 0, 8, 3], vocab, dtype=dtype,
                                                        device="cuda", seed=vocab)
            got = step_min_logprob_triton(logits, tokens, cu, max_step_len=8, rows=rows)
            want = step_min_logprob_ref(logits, tokens, cu, rows=rows)
            err = max((a - b).abs().max().item() for a, b in zip(got, want))
            worst = max(worst, err)
            if err > 1e-4:
                failures += 1
                print(f"  FAIL min-logprob {dtype} vocab {vocab}: max err {err:.2e}")
    print(f"min-logprob vs reference: 12 cases, worst abs err {worst:.2e}, {failures} failures")
    return failures


def check_draft_position(device: str = "cuda", trials: int = 12,
                         vocabs: tuple[int, ...] = (32000, 128256, 151936), rows: int = 256) -> int:
    """One draft position in one launch against the reference: the rows' state the kernel
    leaves is exactly the reference's update for the tokens it drew, greedy rows take the
    first argmax, sampled rows the reference's draw away from a CDF boundary."""
    from .draft_sampling import draft_position_triton
    from .draft_sampling_ref import DraftRowState, StepTable, draft_position_ref, update_rows_ref

    failures = 0
    for trial in range(trials):
        gen = torch.Generator().manual_seed(trial)
        vocab = vocabs[trial % len(vocabs)]
        dtype = (torch.float32, torch.float16, torch.bfloat16)[trial % 3]
        temperature = (0.7, 0.0, 1.3)[trial % 3]
        all_tails = trial % 4 == 3
        states_n = 5
        logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
        flat = torch.randint(0, states_n + 1, ((states_n + 1) * vocab,), generator=gen)
        flat[states_n * vocab:] = states_n
        states = torch.randint(0, states_n + 1, (rows,), generator=gen)
        state = DraftRowState(
            open=states != states_n, open_pushes=torch.randint(0, 9, (rows,), generator=gen),
            states=states, tail_open=torch.rand(rows, generator=gen) < 0.7,
            kept=torch.randint(0, 9, (rows,), generator=gen),
            stop_below=torch.full((rows,), -1.0))
        greedy = torch.rand(rows, generator=gen) < 0.1
        uniforms = torch.rand(rows + 7, 16, generator=gen).clamp(min=1e-6)
        u_rows = torch.randperm(rows + 7, generator=gen)[:rows]
        table = StepTable(flat, vocab, states_n)
        kw = dict(temperature=temperature, u_col=trial % 16, all_tails=all_tails)
        to = lambda t: t.to(device)  # noqa: E731
        got_state = DraftRowState(*[to(t.clone()) for t in state])
        tokens, lp = draft_position_triton(
            to(logits), to(uniforms), to(greedy), got_state,
            StepTable(to(flat), vocab, states_n), u_rows=to(u_rows), **kw)
        tokens, lp = tokens.cpu(), lp.cpu()
        replayed = DraftRowState(*[t.clone() for t in state])
        update_rows_ref(tokens, lp, replayed, None if all_tails else table, all_tails=all_tails)
        state_ok = all(torch.equal(a.cpu(), b) for a, b in zip(got_state, replayed))
        want_tokens, _ = draft_position_ref(logits, uniforms, greedy,
                                            DraftRowState(*[t.clone() for t in state]), table,
                                            u_rows=u_rows, **kw)
        x = logits.float()
        lp_ok = torch.allclose(lp, torch.log_softmax(x, -1).gather(1, tokens[:, None])[:, 0],
                               atol=1e-4, rtol=1e-4)
        same = (tokens == want_tokens).float().mean().item()
        greedy_rows = greedy | ~state.open if temperature > 0 and not all_tails \
            else torch.ones(rows, dtype=torch.bool)
        greedy_ok = torch.equal(tokens[greedy_rows], x.argmax(-1)[greedy_rows])
        if not (state_ok and lp_ok and greedy_ok and same >= 0.99):
            failures += 1
            print(f"  FAIL draft position vocab {vocab} {dtype} T {temperature} tails-only "
                  f"{all_tails}: state {state_ok}, log-probs {lp_ok}, greedy {greedy_ok}, "
                  f"same tokens {same:.3f}")
    print(f"draft position vs reference: {trials} cases of {rows} rows, {failures} failures")
    return failures


def check_head_shares(device: str = "cuda", trials: int = 12, max_ctx: int = 3000,
                      head_dim: tuple[int, ...] = (64, 128)) -> int:
    """Tensor parallelism's head-share rows (pass 1 + the head-share pass) against the
    per-request reference, on a dirty buffer."""
    from .step_grounding import step_head_share_rows_triton
    from .step_grounding_ref import step_head_share_rows_ref
    from .testing import LAYOUTS, make_grounding_case

    rng, failures, worst = random.Random(1), 0, 0.0
    for trial in range(trials):
        hkv, group = rng.choice([(1, 8), (2, 4), (4, 1), (2, 3)])
        steps = [rng.randint(0, 8) for _ in range(rng.randint(1, 5))]
        ctxs = [rng.randint(0, max_ctx) for _ in steps]
        dtype = (torch.float32, torch.float16, torch.bfloat16)[trial % 3]
        case = make_grounding_case(steps, ctxs, num_heads=hkv * group, num_kv_heads=hkv,
                                   head_dim=rng.choice(head_dim), block_size=16, dtype=dtype,
                                   layout=LAYOUTS[trial % min(3, len(LAYOUTS))], device=device,
                                   max_step_len=8, q_gain=2.0, seed=100 + trial)
        keys, total = max(int(case.seq_lens.max()), 1) + 3, max(case.num_step_tokens, 1)
        kw = dict(scale=case.scale, total_heads=hkv * group * 2, query_start=case.query_start)
        got = step_head_share_rows_triton(
            *case.args, out=torch.full((total, keys), 5.0, device=device), max_step_len=8, **kw)
        want = step_head_share_rows_ref(
            *case.args, out=torch.full((total, keys), 5.0, device=device), **kw)
        t = case.num_step_tokens
        err = (got[:t] - want[:t]).abs().max().item() if t else 0.0
        worst = max(worst, err)
        if err > 1e-4:
            failures += 1
            print(f"  FAIL head shares {dtype} gqa {hkv}x{group} steps {steps} ctx {ctxs}: "
                  f"max err {err:.2e}")
    print(f"TP head shares vs reference: {trials} random ragged batches, worst abs err "
          f"{worst:.2e}, {failures} failures")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=".run/kernels-bench-gpu.json")
    parser.add_argument("--full", action="store_true", help="the full benchmark grid")
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}")
    t0 = time.time()
    failures = (check_grounding() + check_min_logprob() + check_draft_position()
                + check_head_shares() + check_arrival_ordering() + check_cuda_graph())
    print(f"checks: {failures} failures ({time.time() - t0:.0f} s)", flush=True)
    from benchmarks.kernels import main as bench

    bench(([] if opts.full else ["--quick"]) + ["--json", opts.json])
    print(f"gpu-check {'PASSED' if not failures else 'FAILED'} in {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
