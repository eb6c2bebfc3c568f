"""ABGV statistics captured during the target's own verification forward.

The attention backend has just written this step's keys into the paged cache
when its ``impl.forward`` runs, so for the target's last ``grounding_layers``
layers we read the step rows' queries and the paged K cache right there and
reduce them to the two per-layer statistics of SPECGUARD.md section 3 (prefix
mass, in-step block) with ``kernels.dispatch`` (Triton on CUDA, PyTorch on CPU).
No attention map is stored. The verifier rolls the layers out afterwards.

Under tensor parallelism a rank holds only some of each layer's heads, and the sparsity
threshold applies to the average over all of them, so the layers write their heads'
share of each step row's average instead (:class:`TensorParallelRows`), which the
verifier sums over the TP group once per forward before thresholding.

The hook finds the capture on the grounding layers' own ``Attention`` objects (vLLM
passes the layer to ``impl.forward``), so it needs no global and never looks at the
draft's layers or the target's other layers.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import torch

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# The attention backends whose paged K cache kernels.kv_layout reads (patches.py hooks them).
GROUNDING_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")
CAPTURE_ATTRIBUTE = "specguard_grounding_capture"  # set on each grounding layer's Attention
FP32_BYTES = 4
logger = logging.getLogger("vllm.specguard")


def grounding_layer_names(attention_layer_names, num_layers: int) -> dict[str, int]:
    """Names of the target's last ``num_layers`` attention layers -> position among them.

    Draft-model layers (prefix ``draft_model.``) are never grounding layers.
    """
    indexed = []
    for name in attention_layer_names:
        if name.startswith("draft_model."):
            continue
        match = LAYER_INDEX.search(name)
        if match:
            indexed.append((int(match.group(1)), name))
    indexed.sort()
    if len(indexed) < num_layers:
        raise ValueError(
            f"specguard.grounding_layers is {num_layers} but the target has only "
            f"{len(indexed)} attention layers")
    chosen = indexed[-num_layers:]
    return {name: i for i, (_, name) in enumerate(chosen)}


@dataclass
class StepBatch:
    """Which query rows of the current verification forward are drafted step tokens."""

    num_draft_tokens: list[int]
    prefix_mass: list[torch.Tensor | None] = field(default_factory=list)  # per grounding layer
    block: list[torch.Tensor | None] = field(default_factory=list)
    head_shares: list[torch.Tensor | None] = field(default_factory=list)  # TP > 1 instead

    @property
    def total(self) -> int:
        return sum(self.num_draft_tokens)


def tensor_parallel_rank_and_size() -> tuple[int, int]:
    """This process's (rank, world size) in vLLM's TP group; (0, 1) outside a vLLM worker."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        return 0, 1
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


class TensorParallelRows:
    """Exact grounding under tensor parallelism: each step row's head-average share, per layer.

    Summing the ranks' thresholded statistics would be wrong (the threshold applies to the
    average over all heads), so every grounding layer writes its heads' share of each step
    row's average over every key into one ``[layers, rows, keys]`` fp32 buffer, and the
    verifier sums it over the TP group in a single all_reduce per forward, then thresholds
    (``core.grounding.ragged_step_stats``). The buffer grows with the batch, never shrinks,
    and is bounded by layers x (most step rows in a forward) x max_model_len x 4 bytes.
    """

    def __init__(self, num_layers: int, world_size: int, max_rows: int, max_keys: int,
                 device: torch.device):
        self.num_layers = num_layers
        self.world_size = world_size
        self.max_rows, self.max_keys = max_rows, max_keys
        self._storage = torch.empty(0, dtype=torch.float32, device=device)
        self.rows: torch.Tensor | None = None  # [layers, T, K] of this forward
        self.prefix_lens: torch.Tensor | None = None  # [T] |S| of each row's request
        self.step_index: torch.Tensor | None = None  # [T] each row's position in its step
        self.max_step_len = 0

    @property
    def bound_bytes(self) -> int:
        return self.num_layers * self.max_rows * self.max_keys * FP32_BYTES

    @classmethod
    def for_runner(cls, runner, num_layers: int) -> TensorParallelRows | None:
        """None at TP=1 (the fused per-layer statistics need no reduction)."""
        _, world_size = tensor_parallel_rank_and_size()
        if world_size == 1:
            return None
        spec_tokens = runner.speculative_config.num_speculative_tokens
        max_rows = min(runner.max_num_tokens, runner.max_num_reqs * spec_tokens)
        rows = cls(num_layers, world_size, max_rows, runner.max_model_len, runner.device)
        logger.info(
            "SpecGuard: tensor parallel size %d: grounding rows are summed over the TP group "
            "once per verification forward; their buffer grows with the batch up to %.1f MiB "
            "(%d layers x %d step rows x %d keys x %d B)", world_size, rows.bound_bytes / 2**20,
            num_layers, max_rows, rows.max_keys, FP32_BYTES)
        return rows

    def begin(self, cu: torch.Tensor, n: torch.Tensor, seq_lens: torch.Tensor,
              num_draft_tokens: list[int], widest_step_context: int | None) -> None:
        """Size this forward's buffer and each row's (|S|, position in step), once per forward.

        ``cu`` / ``n``: the step rows' offsets and counts (``[B + 1]``, ``[0, n_0, ...]``,
        already on the device); ``widest_step_context``: an upper bound, known on the host,
        of the longest context among the requests with drafts (a long prefill without drafts
        adds none), so the buffer is sized without reading the device; None: read it."""
        device = self._storage.device
        total = sum(num_draft_tokens)
        n = n[1:].to(device=device, dtype=torch.int64)
        seq = seq_lens.to(device=device, dtype=torch.int64)
        keys = min(self.max_keys, widest_step_context) if widest_step_context is not None \
            else int(torch.where(n > 0, seq, 0).max())
        need = self.num_layers * total * keys
        if need > self._storage.numel():
            # Doubling keeps regrowth rare as contexts lengthen; the bound caps it.
            bound = self.bound_bytes // FP32_BYTES
            size = max(need, min(2 * self._storage.numel(), bound))
            self._storage = torch.empty(size, dtype=torch.float32, device=device)
            logger.info("SpecGuard: TP grounding buffer grown to %.1f MiB (bound %.1f MiB)",
                        size * FP32_BYTES / 2**20, self.bound_bytes / 2**20)
        self.rows = self._storage[:need].view(self.num_layers, total, keys)
        self.prefix_lens = torch.repeat_interleave(seq - n, n, output_size=total)
        starts = torch.repeat_interleave(cu[:-1].to(device, torch.int64), n, output_size=total)
        self.step_index = torch.arange(total, device=device) - starts
        self.max_step_len = max(num_draft_tokens)

    def clear(self) -> None:
        self.rows = self.prefix_lens = self.step_index = None


@dataclass(frozen=True)
class GroundingTiming:
    """Host seconds plus the (start, end) CUDA events of each grounding layer's launches.

    Read :attr:`seconds` only after a host read that waited for the device (the verifier's
    one ``verify_results`` read): by then every event has completed, so no event is
    synchronised here (a ``cudaEventSynchronize`` before the decision kernels are queued
    would idle the device, and the sync-debug mode does not see it)."""

    cpu_seconds: float
    events: list

    @property
    def seconds(self) -> float:
        return self.cpu_seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1e3


class GroundingCapture:
    """Armed by the runner for one target forward; filled by the attention hook.

    Nothing here waits for the GPU: the per-forward index tensors are built once
    (on the first grounding layer) and copied without a sync, each layer writes
    into its own persistent ``GroundingWorkspace``, and the scorer's time is
    taken with CUDA events that are read only when the verifier asks for it.
    """

    def __init__(self, layer_positions: dict[str, int], sparsity: float, backend_name: str,
                 tensor_parallel: TensorParallelRows | None = None):
        self.layer_positions = layer_positions
        self.tensor_parallel = tensor_parallel  # None at TP=1
        self.sparsity = sparsity
        self.backend_name = backend_name
        self.batch: StepBatch | None = None
        self.armed = False
        self.workspaces: dict[int, object] = {}  # grounding layer position -> GroundingWorkspace
        self._indices: tuple | None = None  # (cu, query_start, seq_lens, block_table) this forward
        self.widest_step_context: int | None = None  # host bound, this forward (see arm)
        self._cpu_seconds = 0.0
        self._events: list[tuple] = []  # (start, end) CUDA events of each layer's launches
        self.layout_checked = False  # grounding_selfcheck, once per engine
        self.kernel_checked = False

    def take_timing(self) -> GroundingTiming:
        """The grounding time of the layers captured since the last take (the scorer's
        overhead), to be read once the device has run them; starts a new count."""
        timing = GroundingTiming(self._cpu_seconds, self._events)
        self._cpu_seconds, self._events = 0.0, []
        return timing

    def arm(self, num_draft_tokens: list[int], widest_step_context: int | None = None) -> None:
        """For the coming forward: each request's drafted rows and, known on the host, an
        upper bound of the longest context among the requests with drafts (sizes the TP
        buffer without a device read; None: read from the device)."""
        self.widest_step_context = widest_step_context
        m = len(self.layer_positions)
        self.batch = StepBatch(list(num_draft_tokens), [None] * m, [None] * m, [None] * m)
        self.armed = sum(num_draft_tokens) > 0
        self._indices = None
        if self.tensor_parallel is not None:
            self.tensor_parallel.clear()

    def disarm(self) -> None:
        self.armed = False

    def clear(self) -> None:
        self.batch = None
        self.armed = False
        self._indices = None
        if self.tensor_parallel is not None:
            self.tensor_parallel.clear()

    def complete_for(self, num_draft_tokens: list[int]) -> bool:
        b = self.batch
        if b is None or b.num_draft_tokens != list(num_draft_tokens):
            return False
        layers = b.prefix_mass if self.tensor_parallel is None else b.head_shares
        return all(x is not None for x in layers)

    def _forward_indices(self, attn_metadata, device: torch.device) -> tuple:
        """cu_step_lens, query_start, seq_lens, block_table of this forward, built once."""
        if self._indices is None:
            n_list = self.batch.num_draft_tokens
            num_reqs = len(n_list)
            cu_host = [0]
            for n in n_list:
                cu_host.append(cu_host[-1] + n)
            host = torch.tensor([cu_host, [0, *n_list]], dtype=torch.int32,
                                pin_memory=device.type == "cuda")
            cu, n = host.to(device, non_blocking=True).unbind(0)
            # Request b's step is the last n_b of its query rows.
            qsl = attn_metadata.query_start_loc[1: num_reqs + 1]
            query_start = qsl.to(device) - n[1:].to(qsl.dtype)
            table = (attn_metadata.block_table if hasattr(attn_metadata, "block_table")
                     else attn_metadata.block_table_tensor)
            self._indices = (cu, query_start, attn_metadata.seq_lens[:num_reqs], table[:num_reqs])
            if self.tensor_parallel is not None:
                self.tensor_parallel.begin(cu, n, self._indices[2], n_list,
                                           self.widest_step_context)
        return self._indices

    def _workspace(self, position: int, num_heads: int, step: int, device: torch.device):
        """This layer's persistent workspace, regrown (never shrunk) when a batch outgrows it."""
        from specguard_vllm.kernels import GroundingWorkspace
        from specguard_vllm.kernels.step_grounding import default_num_splits

        batch = len(self.batch.num_draft_tokens)
        rows = batch * step
        splits = default_num_splits(batch, device)
        ws = self.workspaces.get(position)
        if ws is not None and ws.num_heads == num_heads and ws.fits(rows, splits, batch, step):
            return ws
        if ws is not None:
            rows_cap, step = max(rows, ws.max_tokens), max(step, ws.max_step_len)
            capacity, batch = max(rows * splits, ws.split_capacity), max(batch, ws.max_batch)
        else:
            rows_cap, capacity = rows, rows * splits
        ws = GroundingWorkspace.allocate(rows_cap, num_heads, step,
                                         max_splits=-(-capacity // rows_cap), device=device,
                                         max_batch=batch)
        self.workspaces[position] = ws
        return ws

    def on_attention(self, layer_name: str, impl, query: torch.Tensor, kv_cache: torch.Tensor,
                     attn_metadata, key: torch.Tensor | None = None, layer=None) -> None:
        position = self.layer_positions.get(layer_name)
        if position is None or not self.armed or attn_metadata is None or self.batch is None:
            return
        from specguard_vllm.kernels.dispatch import k_cache_view
        from specguard_vllm.plugin import grounding_selfcheck

        on_gpu = query.is_cuda
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            started = time.perf_counter()
        k_view = k_cache_view(kv_cache, self.backend_name, impl.head_size)
        if not self.layout_checked:
            self.layout_checked = grounding_selfcheck.check_cache_layout(
                k_view, key, attn_metadata, self.backend_name, layer)
        cu, query_start, seq_lens, block_table = self._forward_indices(attn_metadata, query.device)
        args = (query, k_view, block_table, seq_lens, cu)
        if self.tensor_parallel is None:
            self._layer_statistics(position, args, float(impl.scale), query_start)
        else:
            from specguard_vllm.kernels.dispatch import step_head_share_rows

            self._head_shares(position, args, float(impl.scale), query_start)
        if on_gpu:
            end.record()
            self._events.append((start, end))
        else:
            self._cpu_seconds += time.perf_counter() - started

    def _layer_statistics(self, position: int, args: tuple, scale: float,
                          query_start: torch.Tensor) -> None:
        """TP=1: this layer's prefix mass and block, thresholded in the fused kernel."""
        from specguard_vllm.kernels.dispatch import step_grounding_stats, use_triton
        from specguard_vllm.plugin import grounding_selfcheck

        batch = self.batch
        query = args[0]
        step = max(max(batch.num_draft_tokens), 1)
        ws = self._workspace(position, query.shape[1], step, query.device)
        kw = {"scale": scale, "sparsity": self.sparsity, "max_step_len": step,
              "query_start": query_start}
        checking = not self.kernel_checked and use_triton(query)
        prefix_mass, block = step_grounding_stats(*args, workspace=ws, **kw)
        if checking:
            from specguard_vllm.kernels.step_grounding_ref import step_grounding_stats_ref

            self.kernel_checked = True
            reference = step_grounding_stats_ref(*args, **kw)
            if not grounding_selfcheck.check_kernel((prefix_mass, block), reference,
                                                    batch.total, step):
                rows = batch.total
                prefix_mass[:rows].copy_(reference[0][:rows])
                block[:rows, :step].copy_(reference[1][:rows])
        batch.prefix_mass[position] = prefix_mass
        batch.block[position] = block

    def _head_shares(self, position: int, args: tuple, scale: float,
                     query_start: torch.Tensor) -> None:
        """TP > 1: this rank's heads' share of each step row's head average, unthresholded
        (summed over the TP group by the verifier); the kernel is checked against its
        reference on the first use, as at TP = 1."""
        from specguard_vllm.kernels.dispatch import step_head_share_rows, use_triton
        from specguard_vllm.plugin import grounding_selfcheck

        query, tp = args[0], self.tensor_parallel
        step = max(tp.max_step_len, 1)
        kw = {"scale": scale, "total_heads": query.shape[1] * tp.world_size,
              "max_step_len": step, "query_start": query_start}
        checking = not self.kernel_checked and use_triton(query)
        out = step_head_share_rows(*args, out=tp.rows[position], **kw,
                                   workspace=self._workspace(position, query.shape[1], step,
                                                             query.device))
        if checking:
            from specguard_vllm.kernels.step_grounding_ref import step_head_share_rows_ref

            self.kernel_checked = True
            reference = step_head_share_rows_ref(*args, out=torch.empty_like(out), **kw)
            if not grounding_selfcheck.check_head_share_kernel(out, reference, self.batch.total):
                out.copy_(reference)
        self.batch.head_shares[position] = out

    def attach_to(self, layers) -> None:
        """Make this capture reachable from the grounding layers' ``Attention`` objects."""
        for layer in layers:
            setattr(layer, CAPTURE_ATTRIBUTE, self)


def capture_of(layer) -> GroundingCapture | None:
    """The capture a grounding layer carries (None for every other layer)."""
    return getattr(layer, CAPTURE_ATTRIBUTE, None)
