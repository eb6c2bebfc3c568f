"""SpecGuard's math, with no vLLM import: steps, selector, confidence, grounding, decision.

Small pure functions over tensors, each tested against a slow obvious version.
The reference decoder, the vLLM plugin and the kernels' PyTorch references all
call these, so they agree by construction on what a step is, what its scores
are and when it is accepted. Nothing here imports ``specguard_vllm.kernels``.
"""

from specguard_vllm.core.confidence import lpbv_normalised, min_logprob_per_step, token_logprobs
from specguard_vllm.core.decision import StepDecision, decide_steps, ensemble_score
from specguard_vllm.core.grounding import (
    rollout_grounding,
    rollout_grounding_min,
    step_attention_stats,
)
from specguard_vllm.core.selector import select_candidate, similarity
from specguard_vllm.core.steps import StepSegmenter

__all__ = [
    "StepDecision",
    "StepSegmenter",
    "decide_steps",
    "ensemble_score",
    "lpbv_normalised",
    "min_logprob_per_step",
    "rollout_grounding",
    "rollout_grounding_min",
    "select_candidate",
    "similarity",
    "step_attention_stats",
    "token_logprobs",
]
