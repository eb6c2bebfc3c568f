"""K-cache readers: one strided view per vLLM 0.32 attention backend.

Every kernel and reference here reads K through one canonical *view*,
``k[num_blocks, block_size, num_kv_heads, head_size]`` with arbitrary strides,
so the backend's own cache is read in place and never copied. Only the view
differs per backend (checked against vLLM 0.32.0's sources):

* ``FLASH_ATTN``, ``TRITON_ATTN``, ``FLASHINFER`` (CUDA): the per-layer tensor is
  the logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` with K in
  the first ``head_size`` channels (``v1/kv_cache_layout.py``, RFC #42082). Its
  physical order is one of ``KVCacheLayout`` (LBNHC = "NHD", the default on
  Hopper; LBHNC = "HND", FlashInfer on Blackwell; BL.. = layer-interleaved);
  all of them are plain strides of that logical tensor, and the backends read
  K as ``kv_cache.transpose(1, 2).split(head_size, -1)[0]`` (flash_attn.py,
  triton_attn.py, flashinfer.py). So is this reader.
* ``CPU_ATTN``: same logical shape (LBHNC only), but the C++ kernels store, in
  each (block, kv head) run of ``2 * block_size * head_size`` elements, K
  transposed as ``[head_size, block_size]`` followed by V as
  ``[block_size, head_size]`` (ISAs ``vec``/``vec16``; measured with
  ``cpu_attn_reshape_and_cache``). The view is built with ``as_strided``.
  The ``amx`` and ``neon`` ISAs were not checked: use :func:`check_k_view`.
"""

from __future__ import annotations

import torch

GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")
BACKENDS = ("CPU_ATTN", *GPU_BACKENDS)


def k_cache_view(kv_cache: torch.Tensor, backend: str, head_size: int) -> torch.Tensor:
    """The K half of one layer's paged cache as ``[blocks, block_size, kv_heads, head_size]``.

    Args:
        kv_cache: the ``kv_cache`` tensor the backend's ``impl.forward`` receives:
            logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
        backend: the backend's ``get_name()``: one of :data:`BACKENDS`.
        head_size: the layer's head size.

    Returns:
        A view (no copy) whose element ``[b, t, h, d]`` is component d of the key
        of kv head h stored in slot t of block b.
    """
    if kv_cache.dim() != 4:
        raise ValueError(
            "kv_cache must be the logical [num_blocks, num_kv_heads, block_size, 2*head_size] "
            f"tensor of one layer, got shape {tuple(kv_cache.shape)}"
        )
    num_blocks, num_kv_heads, block_size, channels = kv_cache.shape
    if channels != 2 * head_size:
        raise ValueError(f"last dim {channels} != 2 * head_size ({2 * head_size}); "
                         "quantised or per-token-head caches are not supported")
    if backend in GPU_BACKENDS:
        return kv_cache.transpose(1, 2)[..., :head_size]
    if backend == "CPU_ATTN":
        s_block, s_head, s_slot, s_chan = kv_cache.stride()
        if s_chan != 1 or s_slot != channels:
            raise ValueError("CPU_ATTN cache must be contiguous inside each (block, kv head)")
        # K[d, t] of a (block, head) lives at d * block_size + t.
        return kv_cache.as_strided(
            (num_blocks, block_size, num_kv_heads, head_size),
            (s_block, 1, s_head, block_size),
            kv_cache.storage_offset(),
        )
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def gather_keys(k_view: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Keys ``[seq_len, num_kv_heads, head_size]`` of one request, copied out of the cache.

    The PyTorch references use this; the Triton kernels read ``k_view`` in place.
    """
    block_size = k_view.shape[1]
    num_used = -(-seq_len // block_size)
    blocks = k_view[block_row[:num_used].long()]  # [used, block_size, kv_heads, d]
    return blocks.reshape(num_used * block_size, *k_view.shape[2:])[:seq_len]


def check_k_view(k_view: torch.Tensor, keys: torch.Tensor, slot_mapping: torch.Tensor) -> float:
    """Max abs difference between ``keys [T, kv_heads, d]`` and what ``k_view`` holds at their slots.

    A start-up self-check for the plugin: after the backend wrote ``keys`` into
    the cache at ``slot_mapping`` (slot = block * block_size + offset), the reader
    must return them. Non-zero means the backend's layout is not the one assumed.
    """
    block_size = k_view.shape[1]
    slots = slot_mapping.long()
    read = k_view[slots // block_size, slots % block_size]
    return (read.float() - keys.float()).abs().max().item()
