"""Kernel vs PyTorch reference across context lengths, step lengths and batch sizes.

    python -m benchmarks.kernels [--quick] [--json PATH]

On CPU it times the PyTorch reference (the path the CPU plugin runs) against the
attention it mirrors (SDPA of the same step queries over the same context, GQA),
the issue's target being ratio <= 2. On CUDA it times the Triton kernels against
the same reference, reports the K bandwidth achieved (bytes of K read by the two
passes / time) against the device's peak, and the scorer's share of one
verification forward of a Llama-3-8B-sized layer stack.
Shapes are Llama-3-8B's attention: 32 heads, 8 kv heads, head_dim 128, bf16 on
GPU (fp32 on CPU, whose bf16 matmuls are emulated), block_size 16 (128 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from specguard_vllm.kernels.min_logprob_ref import step_min_logprob_ref
from specguard_vllm.kernels.step_grounding_ref import step_grounding_stats_ref
from specguard_vllm.kernels.testing import make_grounding_case, make_logits_case
from specguard_vllm.kernels.workspace import GroundingWorkspace

HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 8, 128, 128256
# Dense HBM peaks (bytes/s) by device name; the measured copy bandwidth is reported too.
PEAK_BW = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}
GROUNDING_LAYERS = 3  # SpecGuard's default m (last layers rolled out)


def timed(fn, device: str, reps: int) -> float:
    """Median seconds per call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_timed(fn, reps: int) -> float:
    """Median seconds per replay of ``fn`` captured in a CUDA graph: device time, no launch cost.

    This is how FULL-graph engines run kernels; the eager figure adds the host's
    launch overhead, which is what a PIECEWISE engine pays for the attention op.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, "cuda", reps)


def mirrored_attention(case) -> callable:
    """SDPA of the step rows over their context: the attention the grounding mirrors."""
    from specguard_vllm.kernels.kv_layout import gather_keys

    items = []
    for b in range(case.seq_lens.numel()):
        n = int(case.cu_step_lens[b + 1] - case.cu_step_lens[b])
        seq = int(case.seq_lens[b])
        k = gather_keys(case.k_view, case.block_table[b], seq).transpose(0, 1)[None]
        q = case.query[int(case.query_start[b]):][:n].transpose(0, 1)[None]
        mask = torch.arange(seq, device=k.device)[None] <= (seq - n + torch.arange(n, device=k.device))[:, None]
        items.append((q, k.contiguous(), k.contiguous().clone(), mask))

    def run():
        for q, k, v, mask in items:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return run


def copy_bandwidth() -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), "cuda", 10)
    return 2 * x.numel() / t


def verification_forward_time(batch: int, step: int, ctx: int, layers: int = 32) -> float:
    """One Llama-3-8B-sized verification forward (bf16, step + 1 tokens per request), timed."""
    hidden, ffn, dev, dt = 4096, 14336, "cuda", torch.bfloat16
    tokens = batch * (step + 1)
    w = {name: torch.randn(*shape, device=dev, dtype=dt) * 0.02 for name, shape in {
        "qkv": (hidden, (HEADS + 2 * KV_HEADS) * HEAD_DIM), "o": (HEADS * HEAD_DIM, hidden),
        "gate_up": (hidden, 2 * ffn), "down": (ffn, hidden), "lm_head": (hidden, VOCAB)}.items()}
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    k = torch.randn(batch, KV_HEADS, ctx + step + 1, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn_like(k)

    def layer():
        qkv = x @ w["qkv"]
        q = qkv[:, : HEADS * HEAD_DIM].view(batch, step + 1, HEADS, HEAD_DIM).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # prefix: no mask needed
        h = a.transpose(1, 2).reshape(tokens, -1) @ w["o"]
        g, u = (h @ w["gate_up"]).chunk(2, dim=-1)
        return (F.silu(g) * u) @ w["down"]

    # Device time, as in vLLM's graphed forward (PIECEWISE or FULL).
    t_layer = graph_timed(layer, 10)
    t_head = graph_timed(lambda: x @ w["lm_head"], 10)
    return layers * t_layer + t_head


def scorer_time(ctx: int, step: int, batch: int, reps: int) -> tuple[float, float]:
    """(eager, graph) seconds of the whole scorer: GROUNDING_LAYERS grounding calls + min-logprob."""
    from specguard_vllm.kernels.min_logprob import step_min_logprob_triton
    from specguard_vllm.kernels.step_grounding import (
        default_num_splits,
        step_grounding_stats_triton,
    )

    case = make_grounding_case([step] * batch, [ctx] * batch, num_heads=HEADS,
                               num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=16,
                               dtype=torch.bfloat16, layout="NHD", device="cuda", seed=ctx)
    args, kw = case.args, case.kwargs(0.01)
    splits = default_num_splits(batch, case.query.device)
    spaces = [GroundingWorkspace.allocate(batch * step, HEADS, step, max_splits=splits,
                                          device="cuda", max_batch=batch)
              for _ in range(GROUNDING_LAYERS)]
    logits, tokens, cu, rows = make_logits_case([step] * batch, VOCAB, dtype=torch.bfloat16,
                                                device="cuda")
    counters = torch.zeros(batch, dtype=torch.int32, device="cuda")

    def scorer():
        for ws in spaces:
            step_grounding_stats_triton(*args, workspace=ws, **kw)
        step_min_logprob_triton(logits, tokens, cu, max_step_len=step, rows=rows,
                                counters=counters)

    return timed(scorer, "cuda", reps), graph_timed(scorer, reps)


def bench_grounding(ctx: int, step: int, batch: int, device: str, reps: int) -> dict:
    on_gpu = device == "cuda"
    case = make_grounding_case([step] * batch, [ctx] * batch, num_heads=HEADS,
                               num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                               block_size=16 if on_gpu else 128,
                               dtype=torch.bfloat16 if on_gpu else torch.float32,
                               layout="NHD" if on_gpu else "CPU", device=device, seed=ctx + step)
    args, kw = case.args, case.kwargs(0.01)
    row = {"kernel": "grounding", "ctx": ctx, "step": step, "batch": batch, "device": device}
    row["reference_ms"] = 1e3 * timed(lambda: step_grounding_stats_ref(*args, **kw), device, reps)
    row["attention_ms"] = 1e3 * timed(mirrored_attention(case), device, reps)
    if on_gpu:
        from specguard_vllm.kernels.step_grounding import (
            default_num_splits,
            step_grounding_stats_triton,
        )

        splits = default_num_splits(batch, case.query.device)
        ws = GroundingWorkspace.allocate(batch * step, HEADS, step, max_splits=splits,
                                         device=device, max_batch=batch)
        call = lambda: step_grounding_stats_triton(*args, workspace=ws, **kw)
        row["num_splits"] = splits
        row["triton_ms"] = 1e3 * timed(call, device, reps)
        row["graph_ms"] = 1e3 * graph_timed(call, reps)
        k_bytes = batch * (ctx + step) * KV_HEADS * HEAD_DIM * case.query.element_size()
        row["k_bytes"] = k_bytes
        # Two passes over K, against the device time (graph replay).
        row["bandwidth_GBs"] = 2 * k_bytes / (row["graph_ms"] / 1e3) / 1e9
        row["eager_bandwidth_GBs"] = 2 * k_bytes / (row["triton_ms"] / 1e3) / 1e9
    return row


def bench_min_logprob(step: int, batch: int, device: str, reps: int) -> dict:
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    logits, tokens, cu, rows = make_logits_case([step] * batch, VOCAB, dtype=dt, device=device)
    row = {"kernel": "min_logprob", "step": step, "batch": batch, "vocab": VOCAB, "device": device}
    row["reference_ms"] = 1e3 * timed(lambda: step_min_logprob_ref(logits, tokens, cu, rows=rows),
                                      device, reps)
    if device == "cuda":
        from specguard_vllm.kernels.min_logprob import step_min_logprob_triton

        counters = torch.zeros(batch, dtype=torch.int32, device=device)
        call = lambda: step_min_logprob_triton(
            logits, tokens, cu, max_step_len=step, rows=rows, counters=counters)
        row["triton_ms"] = 1e3 * timed(call, device, reps)
        row["graph_ms"] = 1e3 * graph_timed(call, reps)
        row["bandwidth_GBs"] = step * batch * VOCAB * logits.element_size() / (row["graph_ms"] / 1e3) / 1e9
    return row


def bench_draft_position(rows: int, vocab: int, device: str, reps: int) -> dict:
    """One draft position of the proposer (k candidates x batch rows): the reference's ~20
    ops against the one fused launch (eager, and replayed in a CUDA graph)."""
    from specguard_vllm.kernels.draft_sampling_ref import (
        DraftRowState, StepTable, draft_position_ref)

    gen = torch.Generator().manual_seed(rows)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dt).to(device)
    flat = torch.randint(0, 3, (4 * vocab,), generator=gen).to(device)  # END (3) never reached:
    # every row stays in its step, so each timed call samples every row
    uniforms = torch.rand(rows, 16, generator=gen).to(device)
    fresh = lambda: DraftRowState(  # noqa: E731 - the same state shape each call
        open=torch.ones(rows, dtype=torch.bool, device=device),
        open_pushes=torch.zeros(rows, dtype=torch.int64, device=device),
        states=torch.zeros(rows, dtype=torch.int64, device=device),
        tail_open=torch.ones(rows, dtype=torch.bool, device=device),
        kept=torch.zeros(rows, dtype=torch.int64, device=device),
        stop_below=torch.full((rows,), -1.0, device=device))
    table, state = StepTable(flat, vocab, 3), fresh()
    kw = dict(temperature=0.7, u_col=5)
    row = {"kernel": "draft_position", "rows": rows, "vocab": vocab, "device": device}
    row["reference_ms"] = 1e3 * timed(
        lambda: draft_position_ref(logits, uniforms, None, state, table, **kw), device, reps)
    if device == "cuda":
        from specguard_vllm.kernels.draft_sampling import draft_position_triton

        call = lambda: draft_position_triton(logits, uniforms, None, state, table, **kw)  # noqa: E731
        row["triton_ms"] = 1e3 * timed(call, device, reps)
        row["graph_ms"] = 1e3 * graph_timed(call, reps)
    return row


def grid(device: str, quick: bool) -> list[tuple[int, int, int]]:
    if device == "cuda":
        ctxs, steps, batches = [1024, 4096, 16384, 32768], [4, 8, 32], [1, 8]
        if quick:
            ctxs, steps = [1024, 4096, 32768], [4, 8, 32]
    else:
        ctxs, steps, batches = [1024, 4096, 16384, 32768], [4, 8, 32], [1, 4]
        if quick:
            ctxs, steps, batches = [1024, 4096, 16384, 32768], [4, 32], [1]
    return [(c, s, b) for b in batches for s in steps for c in ctxs
            if not (device == "cpu" and b * c > 32768)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--json", default=".run/kernels-bench.json", help="where to write results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: this 2-core box is shared, and contended "
                             "multi-threaded BLAS is 10-50x slower)")
    opts = parser.parse_args(argv)
    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    device, reps = opts.device, (20 if opts.device == "cuda" else 3)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "rows": []}
    if device == "cuda":
        import triton

        result["triton"] = triton.__version__
        result["copy_bandwidth_GBs"] = copy_bandwidth() / 1e9
        result["peak_bandwidth_GBs"] = next((v / 1e9 for k, v in PEAK_BW.items()
                                             if k in result["device"]), None)
    print(f"device {result['device']}, torch {torch.__version__}"
          + (f", copy bandwidth {result['copy_bandwidth_GBs']:.0f} GB/s, peak "
             f"{result['peak_bandwidth_GBs']} GB/s" if device == "cuda" else ""))
    hdr = f"{'ctx':>6} {'step':>4} {'batch':>5} {'reference ms':>12} {'attention ms':>12} {'ref/attn':>8}"
    if device == "cuda":
        hdr += (f" {'splits':>6} {'eager ms':>8} {'graph ms':>8} {'speedup':>7} {'GB/s':>6}"
                f" {'% peak':>6}")
    print("grounding (one layer, 32 heads / 8 kv heads / d128, sparsity 0.01)\n" + hdr)
    for ctx, step, batch in grid(device, opts.quick):
        row = bench_grounding(ctx, step, batch, device, reps)
        line = (f"{ctx:>6} {step:>4} {batch:>5} {row['reference_ms']:>12.3f} "
                f"{row['attention_ms']:>12.3f} {row['reference_ms'] / row['attention_ms']:>8.2f}")
        if device == "cuda":
            peak = result["peak_bandwidth_GBs"] or result["copy_bandwidth_GBs"]
            row["pct_peak"] = 100 * row["bandwidth_GBs"] / peak
            line += (f" {row['num_splits']:>6} {row['triton_ms']:>8.3f} {row['graph_ms']:>8.3f}"
                     f" {row['reference_ms'] / row['graph_ms']:>7.1f}"
                     f" {row['bandwidth_GBs']:>6.0f} {row['pct_peak']:>6.1f}")
        print(line, flush=True)
        result["rows"].append(row)
    print(f"min-logprob (vocab {VOCAB})\n{'step':>4} {'batch':>5} {'reference ms':>12}"
          + (f" {'eager ms':>8} {'graph ms':>8} {'GB/s':>6}" if device == "cuda" else ""))
    for step, batch in [(4, 1), (8, 8), (32, 8)]:
        row = bench_min_logprob(step, batch, device, reps)
        print(f"{step:>4} {batch:>5} {row['reference_ms']:>12.3f}"
              + (f" {row['triton_ms']:>8.3f} {row['graph_ms']:>8.3f} {row['bandwidth_GBs']:>6.0f}"
                 if device == "cuda" else ""),
              flush=True)
        result["rows"].append(row)
    print(f"draft position (sampling + tail stop + step automaton, T 0.7)\n{'rows':>5} "
          f"{'vocab':>6} {'reference ms':>12}"
          + (f" {'eager ms':>8} {'graph ms':>8} {'speedup':>7}" if device == "cuda" else ""))
    for rows, vocab in [(64, 32000), (256, 32000), (256, VOCAB), (1024, VOCAB)] \
            if device == "cuda" else [(64, 32000), (256, 32000)]:
        row = bench_draft_position(rows, vocab, device, reps)
        print(f"{rows:>5} {vocab:>6} {row['reference_ms']:>12.3f}"
              + (f" {row['triton_ms']:>8.3f} {row['graph_ms']:>8.3f}"
                 f" {row['reference_ms'] / row['triton_ms']:>7.1f}" if device == "cuda" else ""),
              flush=True)
        result["rows"].append(row)
    if device == "cuda":
        print(f"scorer share of one verification forward (Llama-3-8B-sized, 32 layers, "
              f"{GROUNDING_LAYERS} grounding layers + min-logprob)")
        shares = []
        for ctx, step, batch in [(4096, 8, 1), (32768, 8, 1), (4096, 8, 8), (32768, 8, 8)]:
            fwd = 1e3 * verification_forward_time(batch, step, ctx)
            eager, graph = (1e3 * t for t in scorer_time(ctx, step, batch, reps))
            share = {"ctx": ctx, "step": step, "batch": batch, "forward_ms": fwd,
                     "scorer_ms": graph, "scorer_eager_ms": eager,
                     "share_pct": 100 * graph / fwd, "eager_share_pct": 100 * eager / fwd}
            shares.append(share)
            print(f"  ctx {ctx:>6} step {step} batch {batch}: forward {fwd:.2f} ms, scorer "
                  f"{graph:.3f} ms in a graph = {share['share_pct']:.1f}%, eager {eager:.3f} ms "
                  f"= {share['eager_share_pct']:.1f}%", flush=True)
        result["scorer_share"] = shares
    if opts.json:
        os.makedirs(os.path.dirname(opts.json) or ".", exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {opts.json}")
    return result


if __name__ == "__main__":
    main()
