"""Compile every kernel for GPU targets on a machine without a GPU.

The interpreter checks semantics but accepts code the compiler rejects
(``break``, loop variables that change type, register-hungry tiles), so CI also
builds each kernel for sm_90 (Hopper) and sm_80 (Ampere) down to a cubin with
the ptxas bundled in the Triton wheel. Run it without ``TRITON_INTERPRET``::

    python -m specguard_vllm.kernels.aot cuda:90 cuda:80 [--full]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

FLOATS = {"scale_log2", "inv_heads", "sparsity", "inv_t"}
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _signature(fn, ptr_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = "*" + ptr_types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(arch: int, full: bool):
    """(label, jit function, pointer dtypes, constexprs, num_warps) of every kernel build.

    Quick mode (CI): all dtypes on sm_90, bf16 on the others, one grounding tile;
    ``--full`` adds every dtype everywhere and the largest tile (step 32, GQA 8).
    """
    from . import draft_sampling as ds
    from . import min_logprob as ml
    from . import step_grounding as sg

    f32 = {n: "fp32" for n in ("m_ptr", "l_ptr", "lse_ptr", "sums_ptr", "bk_ptr", "ba_ptr",
                                "pm_ptr", "blk_ptr", "lp_ptr", "min_ptr")}
    for dt in DTYPES if (full or arch == 90) else ("bf16",):
        io = dict(f32, q_ptr=dt, k_ptr=dt)
        # step 8 with GQA 4 (Llama-3-8B-like) and step 32 with GQA 8 (the largest tile).
        for n_pad, g_pad in ((8, 4), (32, 8)) if full else ((8, 4),):
            block_n, warps = sg.tile_config(n_pad * g_pad)
            ce = {"N_PAD": n_pad, "G_PAD": g_pad, "D_PAD": 128, "BLOCK_N": block_n,
                  "S_BLOCK": sg.S_BLOCK, "UPCAST": False}
            yield (f"grounding_pass1[{dt},n{n_pad},g{g_pad}]", sg._grounding_pass1, io, ce, warps)
            yield (f"grounding_pass2[{dt},n{n_pad},g{g_pad}]", sg._grounding_pass2, io,
                   dict(ce, MS_PAD=n_pad), warps)
            yield (f"head_share[{dt},n{n_pad},g{g_pad}]", sg._head_share_pass,
                   dict(io, out_ptr="fp32"), {k: v for k, v in ce.items() if k != "S_BLOCK"},
                   warps)
        yield (f"step_logprob[{dt}]", ml._step_logprob_kernel,
               dict(f32, logits_ptr=dt), {"HAS_ROWS": True, "BLOCK_V": 2048, "N_PAD": 32}, 8)
        position = dict(f32, logits_ptr=dt, u_ptr="fp32", u_rows_ptr="i64", greedy_ptr="i1",
                        tok_ptr="i64", open_ptr="i1", pushes_ptr="i64", states_ptr="i64",
                        table_ptr="i64", tail_ptr="i1", kept_ptr="i64", below_ptr="fp32")
        off = {"SAMPLE": True, "HAS_GREEDY": True, "U_ROWS": False, "STEP_GREEDY": False,
               "ADVANCE": False, "TAIL": False, "TAIL_IN_STEP": False, "BLOCK_V": 1024}
        yield (f"draft_sample[{dt}]", ds._draft_position_kernel, position, off, 4)
        # A whole draft position: keyed draws by row index, step greedy, tails, automaton.
        yield (f"draft_position[{dt}]", ds._draft_position_kernel, position,
               dict(off, U_ROWS=True, STEP_GREEDY=True, ADVANCE=True, TAIL=True,
                    TAIL_IN_STEP=True), 4)
        yield (f"draft_tails[{dt}]", ds._draft_position_kernel, position,
               dict(off, SAMPLE=False, HAS_GREEDY=False, TAIL=True), 4)


def compile_all(targets: list[tuple[str, int, int]], full: bool = False) -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lines = []
    for backend, arch, warp in targets:
        target = GPUTarget(backend, arch, warp)
        for label, fn, ptrs, ce, warps in variants(arch, full):
            t0 = time.perf_counter()
            src = ASTSource(fn=fn, signature=_signature(fn, ptrs, ce), constexprs=ce)
            kernel = triton.compile(src, target=target, options={"num_warps": warps})
            binary = kernel.asm.get("cubin") or kernel.asm.get("hsaco") or b""
            lines.append(f"compiled {label:34s} for {backend}:sm_{arch}: {len(binary):7d} bytes, "
                         f"{kernel.metadata.shared:6d} B smem, "
                         f"{time.perf_counter() - t0:5.2f} s")
    return lines


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="specguard-aot-"))
    full = "--full" in argv
    targets = []
    for spec in [a for a in argv if a != "--full"] or ["cuda:90", "cuda:80"]:
        backend, arch = spec.split(":")[:2]
        targets.append((backend, int(arch), 32))
    for line in compile_all(targets, full):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
