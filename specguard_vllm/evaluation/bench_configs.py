"""Which configurations `specguard bench` compares, and which engine each runs on.

SpecGuard variants that differ only in per-request knobs (tau, beta, fallback) share one
engine and are selected per request through ``vllm_xargs``; k changes the proposer's batch
shape, so each k gets its own engine. The baselines use the same draft and the same
``num_speculative_tokens`` as SpecGuard; ``sd_ks`` adds vLLM's SD at other K (``sd-k4``...),
since SD's best K is often far below the longest step SpecGuard needs (docs/ENGINE.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from specguard_vllm.config import SpecGuardConfig

TAU_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
K_ABLATION = (1, 2, 4)
QUICK = ("target", "sd", "specguard", "specguard-fallback-*")


@dataclass(frozen=True)
class EngineSpec:
    """One engine process: the target and its speculative config (None: target-only)."""

    key: str
    speculative_config: dict | None


@dataclass(frozen=True)
class BenchConfig:
    name: str
    engine: str
    group: str  # baseline | specguard | fallback | ablation | k | tau
    overrides: dict = field(default_factory=dict)  # per-request vllm_xargs
    params: dict = field(default_factory=dict)  # the effective SpecGuard knobs, for the record


def _absolute_draft(config: SpecGuardConfig) -> SpecGuardConfig:
    """The draft path made absolute (engine processes run from the repo root)."""
    model = config.model
    if not os.path.isabs(model) and os.path.exists(model):
        return config.model_copy(update={"model": str(Path(model).resolve())})
    return config


def calibrated_config(base: SpecGuardConfig, other: SpecGuardConfig, name: str = "calibrated"):
    """A configuration for another config file that differs only in per-request knobs."""
    from specguard_vllm.config import OVERRIDABLE_KEYS

    mine, theirs = base.specguard.model_dump(), other.specguard.model_dump()
    differ = sorted(k for k in mine if mine[k] != theirs[k])
    fixed = [k for k in differ if k not in OVERRIDABLE_KEYS]
    if fixed or other.model != base.model or \
            other.num_speculative_tokens != base.num_speculative_tokens:
        raise ValueError(f"{name}: only {list(OVERRIDABLE_KEYS)} may differ from --config, but "
                         f"{fixed or ['model / num_speculative_tokens']} do")
    overrides = {k: theirs[k] for k in differ}
    knobs = {"k": theirs["num_candidates"], "tau": theirs["tau"], "beta": theirs["beta"],
             "fallback": theirs["fallback"]}
    return BenchConfig(name, f"specguard-k{base.specguard.num_candidates}", "calibrated",
                       overrides, knobs)


def build_matrix(config: SpecGuardConfig, *, quick: bool = False, only: list[str] | None = None,
                 calibrated: dict[str, SpecGuardConfig] | None = None,
                 sd_ks: list[int] | None = None,
                 ) -> tuple[list[EngineSpec], list[BenchConfig]]:
    """Engines and configurations for one bench run; ``only`` keeps the named ones.

    ``calibrated``: configs written by `specguard calibrate` (same models and k), by name,
    each run as one more configuration on the base engine.
    """
    calibrated = {name: _absolute_draft(c) for name, c in (calibrated or {}).items()}
    config = _absolute_draft(config)
    base = config.specguard
    k0 = base.num_candidates

    def sg_engine(k: int) -> EngineSpec:
        sg = config.model_copy(update={"specguard": base.model_copy(update={"num_candidates": k})})
        return EngineSpec(f"specguard-k{k}", sg.model_dump(mode="json", exclude_none=True))

    def params(**changes) -> dict:
        knobs = {"k": k0, "tau": base.tau, "beta": base.beta, "fallback": base.fallback}
        knobs.update(changes)
        return knobs

    other_fallback = "speculative" if base.fallback == "target" else "target"
    configs = [
        BenchConfig("target", "target", "baseline"),
        BenchConfig("sd", "sd", "baseline"),
        BenchConfig("specguard", f"specguard-k{k0}", "specguard", {}, params()),
        BenchConfig(f"specguard-fallback-{other_fallback}", f"specguard-k{k0}", "fallback",
                    {"fallback": other_fallback}, params(fallback=other_fallback)),
        BenchConfig("lpbv-only", f"specguard-k{k0}", "ablation", {"beta": 1.0}, params(beta=1.0)),
        BenchConfig("abgv-only", f"specguard-k{k0}", "ablation", {"beta": 0.0}, params(beta=0.0)),
    ]
    configs += [BenchConfig(f"k={k}", f"specguard-k{k}", "k", {}, params(k=k))
                for k in K_ABLATION if k != k0]
    configs += [BenchConfig(f"tau={tau:g}", f"specguard-k{k0}", "tau", {"tau": tau}, params(tau=tau))
                for tau in TAU_SWEEP if tau != base.tau]
    if quick:
        configs = [c for c in configs if c.name in QUICK or c.group == "fallback"]
    configs += [calibrated_config(config, other, name) for name, other in calibrated.items()]
    for sd_k in sd_ks or ():
        if sd_k < 1:
            raise ValueError(f"--sd-k: K must be >= 1, got {sd_k}")
        configs.append(BenchConfig(f"sd-k{sd_k}", f"sd-k{sd_k}", "sd-k", {},
                                   {"num_speculative_tokens": sd_k}))
    if only:
        unknown = sorted(set(only) - {c.name for c in configs})
        if unknown:
            raise ValueError(f"unknown bench configuration(s) {unknown}; choose from "
                             f"{[c.name for c in configs]}")
        configs = [c for c in configs if c.name in only]

    engines: dict[str, EngineSpec] = {}
    for c in configs:
        if c.engine in engines:
            continue
        if c.engine == "target":
            engines["target"] = EngineSpec("target", None)
        elif (sd_k := sd_num_spec(c, config.num_speculative_tokens)) is not None:
            engines[c.engine] = EngineSpec(c.engine, {
                "method": "draft_model", "model": config.model, "num_speculative_tokens": sd_k})
        else:
            engines[c.engine] = sg_engine(int(c.engine.rsplit("k", 1)[1]))
    return list(engines.values()), configs


def sd_num_spec(config: BenchConfig, default: int) -> int | None:
    """K of a vLLM SD configuration (``default`` for ``sd``); None for any other."""
    if config.engine == "sd":
        return default
    if config.group == "sd-k":
        return int(config.params["num_speculative_tokens"])
    return None
