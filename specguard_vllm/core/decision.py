"""The ensemble score and the whole-step accept/reject rule, per request."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specguard_vllm.core.confidence import lpbv_normalised


@dataclass(frozen=True)
class StepDecision:
    """Everything the verifier decided about one step, for traces and metrics."""

    lpbv: float  # L_min, the raw minimum log-prob
    abgv: float | None  # G_min, in [0, 1]; None where the engine skipped grounding (beta = 1)
    score: float
    accepted: bool


def ensemble_score(
    l_min: torch.Tensor, g_min: torch.Tensor, beta: torch.Tensor | float, lpbv_floor: float
) -> torch.Tensor:
    """``beta * LPBV_norm + (1 - beta) * ABGV_norm`` (batched; beta per request or shared)."""
    beta_t = torch.as_tensor(beta, dtype=torch.float32, device=l_min.device)
    return beta_t * lpbv_normalised(l_min.float(), lpbv_floor) + (1.0 - beta_t) * g_min.float()


def decide_steps(
    l_min: torch.Tensor,
    g_min: torch.Tensor,
    *,
    tau: torch.Tensor | float,
    beta: torch.Tensor | float,
    lpbv_floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(score [B], accepted [B] bool)``; accept when ``score >= tau``.

    ``tau > 1`` can never be met (score <= 1), so it rejects every step;
    ``tau = 0`` accepts every step.
    """
    score = ensemble_score(l_min, g_min, beta, lpbv_floor)
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=score.device)
    return score, score >= tau_t
