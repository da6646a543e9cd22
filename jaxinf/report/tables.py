"""The study's results for people and spreadsheets: text tables, results.csv, metrics.png and gt_agreement.png.

Nothing here computes a score or a metric; every function formats what `jaxinf.pipeline.run_study` returns.
"""

from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np

from jaxinf.workdir import write_text

METRICS = ("acc", "cover", "auc", "recall@10")


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """results.csv: one row per method, the columns of the first row (written atomically)."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _parse_cell(value: str):
    if value in ("True", "False"):
        return value == "True"
    try:
        return float(value)
    except ValueError:
        return value


def read_csv(path: str) -> list[dict]:
    """results.csv back as rows of numbers (floats, bools) and strings (method, curvature, lambda)."""
    with open(path) as f:
        return [{k: (_parse_cell(v) if k != "method" else v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_metrics(rows: Sequence[dict], path: str, title: str) -> None:
    """metrics.png: Acc, Cover and AUC per method with their bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, metric in zip(axes, ("acc", "cover", "auc")):
        vals = np.array([r[metric] for r in rows])
        lo = vals - np.array([r[f"{metric}_lo"] for r in rows])
        hi = np.array([r[f"{metric}_hi"] for r in rows]) - vals
        ax.barh(names, vals, xerr=[lo, hi], color="tab:blue", alpha=0.8)
        ax.set_xlim(0, 1)
        ax.set_title(metric.upper() if metric == "auc" else metric.capitalize())
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_agreement(rows: list, kinds: list, path: str, title: str) -> None:
    """One panel per ground truth: each method's agreement (LDS, or mean per-query Spearman) with its bootstrap
    interval. `rows`: dicts with "method", f"gt_{kind}", f"gt_{kind}_lo", f"gt_{kind}_hi"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds) + 1, 0.28 * len(rows) + 1.6), sharey=True,
                             squeeze=False)
    names = [r["method"] for r in rows]
    for ax, kind in zip(axes[0], kinds):
        vals = np.array([r.get(f"gt_{kind}", np.nan) for r in rows], float)
        lo = np.nan_to_num(vals - np.array([r.get(f"gt_{kind}_lo", np.nan) for r in rows], float))
        hi = np.nan_to_num(np.array([r.get(f"gt_{kind}_hi", np.nan) for r in rows], float) - vals)
        ax.barh(names, np.nan_to_num(vals), xerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)],
                color="tab:green", alpha=0.8)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_xlim(-1, 1)
        ax.set_title("LDS" if kind == "lds" else f"Spearman vs {kind}")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_table(result_set: dict) -> str:
    """The table the study binary prints for one damping value: metrics, agreement with exact, lambda, time."""
    rows, damping = result_set["rows"], result_set["results"]["damping"]
    lines = [f"\ncurvature {result_set['curvature']}, damping f={result_set['damping']:g} "
             f"({result_set['damping_scope']} scope): {damping['description']}",
             f"{'method':12s} {'Acc':>6s} {'Cover':>6s} {'AUC':>6s} {'R@10':>6s} {'rho_exact':>9s} {'lambda':>9s} "
             f"{'curv':>7s} {'s':>7s}"]
    for r in rows:
        flag = "" if r["converged"] else "  NOT CONVERGED"
        lines.append(f"{r['method']:12s} {r['acc']:6.3f} {r['cover']:6.3f} {r['auc']:6.3f} {r['recall@10']:6.3f} "
                     f"{r['spearman_vs_exact']:9.3f} {r['lambda']:>9s} {r['curvature']:>7s} {r['seconds']:7.1f}{flag}")
    for method, d in result_set["results"]["methods"].items():
        if "error" in d:
            lines.append(f"{method:12s} failed: {d['error']}")
    lines.append(f"rho_exact: mean Spearman correlation of each test row's scores with exact influence (method "
                 f"'exact': the damped {result_set['curvature']} inverted exactly in float64); for iHVP methods it "
                 "measures their approximation error. lambda: the absolute damping each method used (a range when "
                 "per block)")
    lines.append(f"results: {result_set['dir']}/results.json, results.csv, metrics.png")
    return "\n".join(lines)


def ground_truth_table(result_set: dict) -> str:
    """Every method's (and every ground truth's) agreement with each ground truth, and the ground truths' costs."""
    rows, kinds, facts = result_set["gt_rows"], result_set["gt_kinds"], result_set["gt_summary"]
    if not kinds:
        return ""
    lines = ["\nagreement with counterfactual ground truth (LDS for lds / lds_masked; mean per-query Spearman for the "
             "others; larger = better, 1 = perfect); every row of a column on the same queries (n); no interval "
             "from fewer than 8 queries", f"{'method':14s} " + " ".join(f"{k:>22s}" for k in kinds)]

    def cell(r, k):
        if f"gt_{k}" not in r or not np.isfinite(r[f"gt_{k}"]):
            return "-"
        lo, hi = r.get(f"gt_{k}_lo", np.nan), r.get(f"gt_{k}_hi", np.nan)
        ci = f"[{lo:5.2f},{hi:5.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "[no CI]"
        n = r.get(f"gt_{k}_n")
        return f"{r[f'gt_{k}']:6.3f} {ci}" + (f" n={n:g}" if n is not None and np.isfinite(n) else "")

    for r in rows:
        flag = "" if r.get("converged", True) else "  NOT CONVERGED"
        lines.append(f"{r['method']:14s} " + " ".join(f"{cell(r, k):>22s}" for k in kinds) + flag)
    lines.append("ground truths: " + "; ".join(f"{k} {v['seconds']:.0f} s" + (
        f" ({v['subsets']} subsets of {v['fraction']:.2f}"
        + (f", {len(v['seeds'])} seeds, seed-to-seed {v['seed_to_seed_spearman']:.2f}" if "seed_to_seed_spearman" in v
           else "") + ")" if "subsets" in v
        else f" ({len(v['queries'])} queries x {v['rows']} rows)") + (
        f", replay error {v['replay_error']:.1e}" if "replay_error" in v else "") + (
        "" if v.get("converged", True) else ", NOT CONVERGED") for k, v in facts.items()))
    paired = result_set.get("results", {}).get("paired") or {}
    for k, table in paired.items():
        cells = []
        for method, entry in table.items():
            d = entry.get("vs_grad_dot") or entry.get("vs_exact")
            which = "grad_dot" if "vs_grad_dot" in entry else "exact"
            if d is None or not np.isfinite(d["value"]):
                continue
            lo, hi = d["ci"]
            ci = f" [{lo:.2f},{hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
            cells.append(f"{method}-{which} {d['value']:+.3f}{ci}")
        first = next((d for entry in table.values() for d in entry.values()), None)
        if cells and first is not None:
            lines.append(f"paired {k} ({first['n_queries']} queries; difference [95% interval]): " + "; ".join(cells))
    lines.append(f"ground truth: {result_set['dir']}/ground_truth.json (value, lo, hi per method, ground truths "
                 "included), gt_agreement.png")
    return "\n".join(lines)


def plot_paired(rows: Sequence[dict], path: str, title: str, *, against: str = "grad_dot") -> None:
    """evidence.png: each method's paired difference against `against` with its 95% interval, one panel per
    dataset and ground truth, at the first damping value of each (rows: `jaxinf.evidence.evidence_rows`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["ground_truth"]) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, kind) in zip(axes[0], panels):
        mine = [r for r in rows if (r["dataset"], r["ground_truth"]) == (name, kind)]
        first = min(r["damping"] for r in mine)
        mine = [r for r in mine if r["damping"] == first and r["method"] != against
                and np.isfinite(r[f"vs_{against}"])]
        vals = np.array([r[f"vs_{against}"] for r in mine])
        lo = np.array([r[f"vs_{against}_lo"] for r in mine])
        hi = np.array([r[f"vs_{against}_hi"] for r in mine])
        ok = np.isfinite(lo) & np.isfinite(hi)
        err = np.where(ok, [vals - np.where(ok, lo, vals), np.where(ok, hi, vals) - vals], 0.0)
        colors = ["tab:green" if o and l > 0 else "tab:red" if o and h < 0 else "tab:gray"
                  for o, l, h in zip(ok, lo, hi)]
        ax.barh([r["method"] for r in mine], vals, xerr=err, color=colors, alpha=0.85)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_title(f"{name}: {kind} (damping {first:g})", fontsize=9)
        ax.set_xlabel(f"minus {against}")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
