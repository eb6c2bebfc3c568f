"""SpecGuard's math, with no vLLM import: steps, selector, confidence, grounding, decision.

Small pure functions over tensors, each tested against a slow obvious version.
The reference decoder and the vLLM plugin both call these, so they agree by
construction on what a step is and when it is accepted.
"""

from specguard_vllm.core.confidence import lpbv_normalised, segment_min, token_logprobs
from specguard_vllm.core.decision import StepDecision, decide_steps, ensemble_score
from specguard_vllm.core.grounding import rollout_grounding, step_attention_stats, step_grounding
from specguard_vllm.core.selector import select_candidate, select_candidates, similarity
from specguard_vllm.core.steps import StepSegmenter

__all__ = [
    "StepDecision",
    "StepSegmenter",
    "decide_steps",
    "ensemble_score",
    "lpbv_normalised",
    "rollout_grounding",
    "segment_min",
    "select_candidate",
    "select_candidates",
    "similarity",
    "step_attention_stats",
    "step_grounding",
    "token_logprobs",
]
