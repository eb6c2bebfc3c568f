"""One-time checks, on the engine's first verification forward, that grounding reads the truth.

Two things cannot be known before a backend has written a real cache: that our
reader of its K layout (``kernels.kv_layout``) matches what it wrote (the CPU
backend's AMX/NEON ISAs, say, were never checked by hand), and that the Triton
kernel agrees with its PyTorch reference on this GPU (the interpreter runs
programs one after another, so it cannot catch a cross-program ordering bug).
A wrong layout has no fallback: the engine stops with a message naming the
backend. A kernel that disagrees is switched off for the process and the
reference used instead, so no request is lost or scored wrongly.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm.specguard")

KERNEL_TOLERANCE = 1e-3  # fp32 statistics from the same bf16/fp16 inputs agree to ~1e-6


def check_cache_layout(k_view: torch.Tensor, key: torch.Tensor | None, attn_metadata,
                       backend: str, layer) -> bool:
    """Raise if the keys this forward wrote are not where ``k_view`` reads them.

    Returns False when this forward cannot tell (no key tensor or slot mapping), so
    the caller tries again on the next one.
    """
    from specguard_vllm.kernels.kv_layout import check_k_view

    slots = getattr(attn_metadata, "slot_mapping", None)
    num = getattr(attn_metadata, "num_actual_tokens", None)
    if key is None or slots is None or not num:
        return False
    keys = key[:num].reshape(num, k_view.shape[2], k_view.shape[3])
    written = slots[:num] >= 0  # padded tokens carry slot -1
    if not bool(written.any()):
        return False
    expected = keys[written].to(k_view.dtype)
    err = check_k_view(k_view, expected, slots[:num][written])
    if err != 0.0:
        isa = getattr(layer, "isa", None)
        raise RuntimeError(
            f"SpecGuard: the {backend} KV cache"
            + (f" (ISA {isa!r})" if isa else "")
            + f" is not laid out as kernels/kv_layout.py reads it (keys differ by {err:.3g} at "
            "the slots just written), so grounding would read wrong keys. This backend/ISA is "
            "not supported; choose another with --attention-backend.")
    logger.info("SpecGuard: %s KV layout self-check passed on %d written keys", backend,
                int(written.sum()))
    return True


def kernel_difference(result: tuple[torch.Tensor, torch.Tensor],
                      reference: tuple[torch.Tensor, torch.Tensor], rows: int, step: int) -> float:
    """Largest difference between the kernel's and the reference's statistics."""
    (pm, blk), (pr, br) = result, reference
    if rows == 0:
        return 0.0
    return max((pm[:rows] - pr[:rows]).abs().max().item(),
               (blk[:rows, :step] - br[:rows, :step]).abs().max().item())


def check_kernel(result, reference, rows: int, step: int) -> bool:
    """True if the Triton result matches; otherwise switch this process to the reference."""
    return _accept_kernel(kernel_difference(result, reference, rows, step))


def check_head_share_kernel(result: torch.Tensor, reference: torch.Tensor, rows: int) -> bool:
    """:func:`check_kernel` for tensor parallelism's head-share rows (``[rows, keys]``)."""
    err = (result[:rows] - reference[:rows]).abs().max().item() if rows else 0.0
    return _accept_kernel(err)


def _accept_kernel(err: float) -> bool:
    from specguard_vllm.kernels.dispatch import disable_triton

    if err <= KERNEL_TOLERANCE:
        logger.info("SpecGuard: Triton grounding kernel matches its reference on this device "
                    "(max difference %.2e)", err)
        return True
    reason = (f"the Triton grounding kernel differs from its PyTorch reference by {err:.3g} on "
              f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'this device'}")
    logger.error("SpecGuard: %s; using the PyTorch reference from now on (correct, slower). "
                 "Please report this with the output of `make gpu-check`.", reason)
    disable_triton(reason)
    return False
