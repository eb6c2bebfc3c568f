"""The engine step's host <-> device traffic, in one place.

``rows_to_device`` / ``array_to_device``: the per-request facts the step knows only on the host (request knobs,
step lengths, modes), built as one pinned tensor and copied ``non_blocking``: one launch,
never a stall (on CUDA a pageable copy is a synchronous one).

``read_to_host`` / ``waits_for_device``: the few places where the step *must* wait for the
device (the verifier's one read of the step's results, the committed tokens the step table
needs before drafting, the drafted rows the scheduler needs, the lagged early-stop flags of
step ends and stopped tails; with ``SPECGUARD_DECISION_LOG`` set, a debugging aid, also the
logged drafts, "decision_log"). Each is named and counted in ``HOST_READS``, and is exempt from
``torch.cuda.set_sync_debug_mode``, so a test can run the engine step under "error": any
*other* sync raises, and the named ones are held to their count per step.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence

import numpy as np
import torch

HOST_READS: collections.Counter[str] = collections.Counter()


def rows_to_device(rows: Sequence[Sequence[float | int | bool]], dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor:
    """``rows`` (equal-length host lists) as one ``[len(rows), B]`` tensor on ``device``."""
    device = torch.device(device)
    host = torch.tensor(rows, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def array_to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A host NumPy array on ``device``, copied as :func:`rows_to_device` copies (pinned on
    CUDA, ``non_blocking``); on CPU the tensor shares the array's memory."""
    device = torch.device(device)
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@contextlib.contextmanager
def waits_for_device(site: str, device: torch.device):
    """A sanctioned wait for ``device`` at ``site`` (counted; allowed under sync debug mode)."""
    HOST_READS[site] += 1
    mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if not mode:
        yield
        return
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def read_to_host(tensor: torch.Tensor, site: str) -> list:
    """``tensor.tolist()``, as the sanctioned read named ``site``."""
    with waits_for_device(site, tensor.device):
        return tensor.tolist()


def copy_to_host(tensor: torch.Tensor, site: str) -> torch.Tensor:
    """``tensor`` as a CPU tensor, as the sanctioned read named ``site`` (for readers that
    want tensor ops on the host too, not only lists)."""
    with waits_for_device(site, tensor.device):
        return tensor.cpu()
