"""What `specguard calibrate` shows: signal power, the frontier, the fit, predicted vs measured,
as text and as a PNG of the accuracy-vs-acceptance frontier."""

from __future__ import annotations

from pathlib import Path

FRONTIER_ROWS = 10  # frontier points listed in the text report (the PNG shows all)


def _steps_line(r: dict) -> str:
    c, steps = r["collect"], r["collect"]["steps"]
    head = (f"steps: {steps.get('logged', 0)} logged, {c['n_records']} labelled "
            f"({c['n_wrong']} wrong) by --labels {r['labels']}")
    if r["labels"] == "step":
        return (head + "; skipped: "
                + ", ".join(f"{k} {steps.get(k, 0)}" for k in ("incomplete", "blank"))
                + f"; completing a line begun by the target: {steps.get('joined', 0)}")
    return (head + f"; {steps.get('continuations', 0)} continuations run "
            f"(budget {r['max_continuations']}); judged from the target's own run "
            f"{steps.get('target', 0)}, as written {steps.get('as-is', 0)}, "
            f"over budget {steps.get('over-budget', 0)}")


def frontier_rows(points: list[dict], k: int = FRONTIER_ROWS) -> list[dict]:
    """At most ``k`` frontier points spread evenly over it, both ends kept."""
    if len(points) <= k:
        return points
    step = (len(points) - 1) / (k - 1)
    return [points[round(i * step)] for i in range(k)]


def format_report(r: dict) -> str:
    p, m, fit_ = r["auroc"], r["measured"], r["fit"]
    lines = [(f"specguard calibrate: {r['n_problems']} {r['dataset']} {r['split']} problems, "
              f"labels {r['labels']}, goal {r['goal']} ({fit_['constraint']})"),
             _steps_line(r),
             "",
             "AUROC (right vs wrong steps; 1 = every wrong step scores lowest, 0.5 = chance)",
             f"  LPBV_norm alone     {p['lpbv_norm']:.3f}",
             f"  ABGV alone          {p['abgv']:.3f}"]
    for b, auc in p["ensemble"].items():
        lines.append(f"  ensemble beta={b}  {auc:.3f}")
    lines += ["",
              f"predicted frontier (accuracy vs {r['accuracy_reference']}, fixed trajectory):",
              f"  {'acceptance':>10}  {'accuracy':>8}  {'tau':>7}  {'beta':>5}"]
    for q in frontier_rows(r["frontier"]):
        lines.append(f"  {q['acceptance']:>10.3f}  {q['accuracy']:>8.3f}  {q['tau']:>7.4f}  "
                     f"{q['beta']:>5.2f}")
    lines += ["",
              (f"fitted: tau={fit_['tau']:g} beta={fit_['beta']:g}  "
               f"(grid score {fit_['tau_grid']:.6g})"),
              "",
              (f"{'':<22}{'pred acc':>9}{'pred acc.':>10}{'meas acc':>10}{'meas acc.':>10}"
               f"{'rejected':>9}"),
              (f"{'target only':<22}{'':>9}{'':>10}{m['target_only']['accuracy']:>10.3f}"
               f"{'-':>10}{'-':>9}")]
    for name, label in (("defaults", "defaults (0.5, 0.5)"),
                        ("fitted", f"fitted ({fit_['tau']:g}, {fit_['beta']:g})")):
        pr, me = r["predicted"][name], m[name]
        lines.append(f"{label:<22}{pr['accuracy']:>9.3f}{pr['acceptance']:>10.3f}"
                     f"{me['accuracy']:>10.3f}{me['acceptance']:>10.3f}{me['n_rejected']:>9}")
    w = r["wall_seconds"]
    lines += [("(acc = accuracy, acc. = step acceptance; predicted = fixed-trajectory "
               "approximation"),
              " on the collect run; measured = decoding the same problems)",
              "",
              r["verdict"]["summary"],
              (f"wall: {w['total']:.0f} s (engine start {w['engine_start']:.0f}, "
               f"collect {w['collect']:.0f}, label {w['label']:.0f}, "
               f"validate {w['validate']:.0f})")]
    lines += [f"wrote {r[key]}" for key in ("out", "plot") if r.get(key)]
    return "\n".join(lines)


def plot_frontier(r: dict, path: str | Path) -> Path:
    """PNG: the predicted frontier, the fitted beta's tau sweep, the chosen and paper points,
    and the measured points of the validation decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    hull = r["frontier"]
    ax.step([q["acceptance"] for q in hull], [q["accuracy"] for q in hull], where="post",
            color="tab:blue", label="predicted frontier (all tau, beta)")
    chosen, paper = r["predicted"]["fitted"], r["predicted"]["defaults"]
    ax.scatter([chosen["acceptance"]], [chosen["accuracy"]], color="tab:red", zorder=3,
               label=f"fitted, predicted (tau {chosen['tau']:g}, beta {chosen['beta']:g})")
    ax.scatter([paper["acceptance"]], [paper["accuracy"]], color="tab:gray", zorder=3,
               label="paper (0.5, 0.5), predicted")
    measured = r["measured"]
    ax.scatter([measured["fitted"]["acceptance"]], [measured["fitted"]["accuracy"]],
               marker="x", color="tab:red", zorder=3, label="fitted, measured")
    ax.scatter([measured["defaults"]["acceptance"]], [measured["defaults"]["accuracy"]],
               marker="x", color="tab:gray", zorder=3, label="paper, measured")
    ax.axhline(measured["target_only"]["accuracy"], color="black", lw=0.8, ls=":",
               label="target only")
    ax.set_xlabel("step acceptance")
    ax.set_ylabel(f"accuracy (vs {r['accuracy_reference']})")
    ax.set_title(f"calibrate: {r['dataset']} {r['split']}, {r['n_problems']} problems, "
                 f"labels {r['labels']}", fontsize=9)
    ax.set_xlim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
