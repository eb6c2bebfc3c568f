"""The bench's markdown table and PNG plots (accuracy vs latency; acceptance and accuracy vs tau)."""

from __future__ import annotations

import math
from pathlib import Path

from specguard_vllm.evaluation.bench_metrics import COST_RATIOS


def _fmt(value, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:{spec}}{suffix}"


def markdown_table(rows: list[dict]) -> str:
    """One table per mode; ratios are against `target` / `sd` of the same mode and run."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        out.append(f"**{mode}**\n")
        speed_cols = " | ".join(f"speedup c={c:g}" for c in COST_RATIOS)
        out.append(
            "| config | n | accuracy (95% CI) | latency s/problem | tok/s | tok/s ÷ target | "
            "TPOT ms | step acc. | draft share | scorer | target fwd | draft fwd | tok/target fwd "
            f"| ÷ sd | {speed_cols} |")
        out.append("|" + "---|" * (14 + len(COST_RATIOS)))
        for r in (r for r in rows if r["mode"] == mode):
            low, high = r["accuracy_ci95"]
            speed = " | ".join(_fmt(r["modelled_speedup"].get(f"{c:g}"), ".2f", suffix="x")
                               for c in COST_RATIOS)
            out.append(
                f"| {r['config']} | {r['n']} | {_fmt(r['accuracy'], '.1f', 100, '%')} "
                f"({_fmt(low, '.0f', 100)}-{_fmt(high, '.0f', 100)}) | "
                f"{_fmt(r['latency_s_per_problem'], '.2f')} | {_fmt(r['tokens_per_s'], '.1f')} | "
                f"{_fmt(r['tokens_per_s_vs_target'], '.2f', suffix='x')} | "
                f"{_fmt(r['tpot_s'], '.1f', 1000)} | {_fmt(r['step_acceptance'], '.1f', 100, '%')} | "
                f"{_fmt(r['draft_token_share'], '.1f', 100, '%')} | "
                f"{_fmt(r['scorer_overhead'], '.1f', 100, '%')} | {_fmt(r['target_forwards'], '.0f')} | "
                f"{_fmt(r['draft_forwards'], '.0f')} | {_fmt(r['tokens_per_target_forward'], '.2f')} | "
                f"{_fmt(r['tokens_per_target_forward_vs_sd'], '.2f', suffix='x')} | {speed} |")
        out.append("")
    return "\n".join(out)


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Annotate points, stacking the labels of points that sit close together."""
    xs = [p[0] for p in points] or [0.0]
    ys = [p[1] for p in points] or [0.0]
    dx = (max(xs) - min(xs)) * 0.06 or 1.0
    dy = (max(ys) - min(ys)) * 0.06 or 1.0
    placed: list[tuple[float, float]] = []
    for x, y, label in sorted(points):
        crowd = sum(1 for px, py in placed if abs(px - x) < dx and abs(py - y) < dy)
        placed.append((x, y))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 3 + 9 * crowd),
                    fontsize=7, arrowprops=None)


def plot_accuracy_vs_latency(rows: list[dict], path: Path) -> Path:
    """Offline rows: accuracy against latency and against committed tokens per target forward;
    served rows: output tokens/s per configuration and concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offline = [r for r in rows if r["mode"] == "offline" and not math.isnan(r["accuracy"])]
    served = [r for r in rows if r["mode"] != "offline"]
    panels = 3 if served else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5))
    for ax, x_key, label in (
        (axes[0], "latency_s_per_problem", "latency per problem (s, this machine, one at a time)"),
        (axes[1], "tokens_per_target_forward", "committed tokens per target forward"),
    ):
        points = []
        for r in offline:
            x, y = r.get(x_key), 100 * r["accuracy"]
            if x is None:
                continue
            low, high = r["accuracy_ci95"]
            colour = {"baseline": "tab:gray", "specguard": "tab:red"}.get(r["group"], "tab:blue")
            ax.errorbar(x, y, yerr=[[y - 100 * low], [100 * high - y]], fmt="o", color=colour,
                        capsize=3, alpha=0.7)
            points.append((x, y, r["config"]))
        _label_points(ax, points)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%, 95% CI)")
        ax.grid(alpha=0.3)
    if served:
        ax = axes[2]
        modes = list(dict.fromkeys(r["mode"] for r in served))
        configs = list(dict.fromkeys(r["config"] for r in served))
        width = 0.8 / len(modes)
        for m, mode in enumerate(modes):
            values = [next((r["tokens_per_s"] or 0.0 for r in served
                            if r["mode"] == mode and r["config"] == c), 0.0) for c in configs]
            ax.bar([i + m * width for i in range(len(configs))], values, width, label=mode)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(configs))])
        ax.set_xticklabels(configs, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("output tokens/s (vllm serve, this machine)")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("SpecGuard vs target-only and vLLM SD: accuracy, latency and target work")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tau_sweep(rows: list[dict], path: Path) -> Path | None:
    """Step acceptance and accuracy against tau (offline rows of the base k and beta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r["mode"] == "offline" and r["group"] in ("tau", "specguard")]
    if len(sweep) < 2:
        return None
    sweep.sort(key=lambda r: r["params"]["tau"])
    taus = [r["params"]["tau"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(taus, [100 * (r["step_acceptance"] or 0) for r in sweep], "o-", label="step acceptance")
    ax.plot(taus, [100 * r["accuracy"] for r in sweep], "s-", label="accuracy")
    target = next((r for r in rows if r["mode"] == "offline" and r["config"] == "target"), None)
    if target:
        ax.axhline(100 * target["accuracy"], color="gray", ls="--", label="target-only accuracy")
    ax.set_xlabel("tau")
    ax.set_ylabel("%")
    ax.set_title("Acceptance and accuracy vs tau")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput_vs_concurrency(rows: list[dict], path: Path) -> Path | None:
    """Served rows: output tokens/s against client concurrency, one line per configuration
    (log-scaled x), and each configuration's ratio to vLLM SD's at the same concurrency."""
    served = [r for r in rows if r["mode"].startswith("server-c") and r.get("tokens_per_s")]
    levels = sorted({int(r["mode"].removeprefix("server-c")) for r in served})
    if len(levels) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in served))
    at = {(r["config"], int(r["mode"].removeprefix("server-c"))): r["tokens_per_s"] for r in served}
    fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in configs:
        xs = [c for c in levels if (name, c) in at]
        ax.plot(xs, [at[name, c] for c in xs], "o-", label=name)
        if name != "sd" and any(("sd", c) in at for c in xs):
            both = [c for c in xs if ("sd", c) in at]
            ratio_ax.plot(both, [at[name, c] / at["sd", c] for c in both], "o-", label=name)
    for axis in (ax, ratio_ax):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_xlabel("concurrent requests (OpenAI client)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    ax.set_ylabel("output tokens/s (vllm serve, this machine)")
    ratio_ax.axhline(1.0, color="gray", ls="--")
    ratio_ax.set_ylabel("tokens/s / vLLM SD's")
    fig.suptitle("Served throughput vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: list[dict], out_dir: Path, *, plots: bool = True, title: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.md"]
    written[0].write_text((f"# {title}\n\n" if title else "") + markdown_table(rows) + "\n")
    if plots:
        written.append(plot_accuracy_vs_latency(rows, out_dir / "accuracy_vs_latency.png"))
        for extra in (plot_tau_sweep(rows, out_dir / "tau_sweep.png"),
                      plot_throughput_vs_concurrency(rows, out_dir / "throughput_vs_concurrency.png")):
            if extra:
                written.append(extra)
    return written
