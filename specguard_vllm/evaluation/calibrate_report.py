"""The text report `specguard calibrate` prints: signal power, the fit, predicted vs measured."""

from __future__ import annotations


def format_report(r: dict) -> str:
    p, m, fit_ = r["auroc"], r["measured"], r["fit"]
    lines = [(f"specguard calibrate: {r['n_problems']} {r['split']} problems, goal {r['goal']} "
             f"({fit_['constraint']})"),
             f"steps: {r['collect']['steps'].get('logged', 0)} logged, "
             f"{r['collect']['n_records']} graded "
             f"({r['collect']['n_wrong']} wrong); skipped: "
             + ", ".join(f"{k} {r['collect']['steps'].get(k, 0)}"
                         for k in ("incomplete", "blank"))
             + "; completing a line begun by the target: "
             + str(r["collect"]["steps"].get("joined", 0)),
             "",
             "AUROC (right vs wrong steps; 1 = every wrong step scores lowest, 0.5 = chance)",
             f"  LPBV_norm alone     {p['lpbv_norm']:.3f}",
             f"  ABGV alone          {p['abgv']:.3f}"]
    for b, auc in p["ensemble"].items():
        lines.append(f"  ensemble beta={b}  {auc:.3f}")
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
    lines += [("(acc = accuracy, acc. = step acceptance; predicted = fixed-trajectory "
              "approximation"),
              " on the collect run; measured = decoding the same problems)",
              "",
              r["verdict"]["summary"],
              (f"wall: {r['wall_seconds']['total']:.0f} s (engine start "
              f"{r['wall_seconds']['engine_start']:.0f}, "
              f"collect {r['wall_seconds']['collect']:.0f}, "
              f"validate {r['wall_seconds']['validate']:.0f})")]
    if r.get("out"):
        lines.append(f"wrote {r['out']}")
    return "\n".join(lines)
