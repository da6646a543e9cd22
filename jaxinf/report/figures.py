"""The figures of the study's three explanations (`jaxinf.explanations`): convergence.png, ihvp_error.png and
behaviour.png, each drawn from the records its experiment writes to JSON.

Nothing here computes a measurement; matplotlib is imported inside each function (Agg backend), so importing this
module costs nothing.
"""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str, title: str) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_convergence(records: list, methods, path: str, title: str) -> None:
    """convergence.png: per checkpoint step, each method's Cover / AUC (and Spearman with the trajectory ground
    truth), the optimisation state, and the curvature's extreme Ritz values against the damping lambda."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, m in enumerate(methods):
        c = f"C{i}"
        axes[0].plot(steps, [r["methods"][m]["cover"] for r in records], "-o", color=c, label=f"{m} Cover")
        axes[0].plot(steps, [r["methods"][m]["auc"] for r in records], "--", color=c, label=f"{m} AUC")
        if "ground_truth_spearman" in records[0]["methods"][m]:
            axes[0].plot(steps, [r["methods"][m]["ground_truth_spearman"] for r in records], ":", color=c,
                         label=f"{m} rho(trajectory)")
    axes[0].set_ylabel("attribution metric")
    axes[0].legend(fontsize=6, ncol=2)
    for key, lab in (("loss", "train loss"), ("grad_norm", "gradient norm"), ("dist_from_init", "||theta-theta_0||")):
        axes[1].plot(steps, [r["optim"].get(key, np.nan) for r in records], "-o", label=lab)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    if "hessian" in records[0].get("spectrum", {}):
        sp = [r["spectrum"] for r in records]
        axes[2].plot(steps, [s["hessian"]["max"] for s in sp], "-o", label="Hessian top Ritz")
        axes[2].plot(steps, [s["ggn"]["max"] for s in sp], "-s", label="GGN top Ritz")
        axes[2].plot(steps, [max(-s["hessian"]["min"], 1e-12) for s in sp], "-v", label="-(Hessian bottom Ritz)")
        axes[2].plot(steps, [r["lambda"] for r in records], "k--", label="damping lambda")
        axes[2].set_yscale("log")
        ax2 = axes[2].twinx()
        # the |lambda|-weighted share: the eigenvalue count is dominated by LoRA's near-null bulk (analysis.spectrum)
        ax2.plot(steps, [s["hessian"]["negative_mass"] for s in sp], "r:", label="negative mass (SLQ)")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("sum |negative eigenvalues| / sum |eigenvalues| (Hessian)", color="r")
        axes[2].legend(fontsize=7, loc="lower left")
    for ax in axes:
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    _save(fig, plt, path, title)


def plot_ihvp_error(records: list, references: list, kinds, path: str, title: str) -> None:
    """ihvp_error.png: one column per curvature; each solver's parameter-space error, score Spearman with the
    exact inverse and Cover against its C-products per query, one line style per relative damping."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, len(kinds), figsize=(max(8.0, 5.5 * len(kinds)), 10.5), squeeze=False)
    colors = {"cg": "tab:blue", "lissa": "tab:orange", "lanczos": "tab:green", "grad_match": "k"}
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for j, kind in enumerate(kinds):
        recs = [r for r in records if r["curvature"] == kind]
        dampings = sorted({r["damping_fraction"] for r in recs})
        for di, f in enumerate(dampings):
            for name in colors:
                pts = sorted((max(r["products"], 0.5), r["param_error"], r["score_spearman"]) for r in recs
                             if r["solver"] == name and r["damping_fraction"] == f and r.get("param_error") is not None)
                if not pts:
                    continue
                x, e, s = zip(*pts)
                cover = [next(r["metrics"]["cover"] for r in recs if r["solver"] == name and r["damping_fraction"] == f
                              and max(r["products"], 0.5) == xi and r.get("param_error") is not None) for xi in x]
                kw = dict(color=colors[name], linestyle=styles[di % len(styles)], marker="o", ms=3)
                axes[0, j].plot(x, e, label=f"{name} f={f:g}", **kw)
                axes[1, j].plot(x, s, **kw)
                axes[2, j].plot(x, cover, **kw)
            ref = [r for r in references if r["curvature"] == kind and r["damping_fraction"] == f]
            if ref:  # the exact inverse's own Cover at this damping
                axes[2, j].axhline(ref[0]["metrics"]["cover"], color="r", linestyle=styles[di % len(styles)], lw=0.8,
                                   label=f"exact f={f:g}")
        axes[0, j].set_xscale("log")
        axes[0, j].set_yscale("log")
        axes[1, j].set_xscale("log")
        axes[0, j].set_title(kind)
        axes[0, j].set_ylabel("||x - x*|| / ||x*||")
        axes[1, j].set_ylabel("Spearman of scores with exact")
        axes[2, j].set_xscale("log")
        axes[2, j].set_ylabel("Cover of the solver's scores")
        axes[2, j].set_xlabel("C-products per query (grad_match at 0.5)")
        axes[0, j].legend(fontsize=6, ncol=2)
        axes[2, j].legend(fontsize=6, ncol=2)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    _save(fig, plt, path, title)


def plot_behaviour(rows: list, path: str, title: str, backdoor: bool) -> None:
    """behaviour.png: behaviour against parameter change per variant, and the change of behaviour and of test loss
    against the distance of the merged updates to the "full" variant."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ylab = "attack success rate (greedy)" if backdoor else "label accuracy (greedy)"
    for r in rows:
        axes[0].scatter(r["param_total"], r["behaviour"], color="tab:blue")
        axes[0].annotate(r["variant"], (r["param_total"], r["behaviour"]), fontsize=7)
        if r["name"] != "full":
            axes[1].scatter(r["distance_to_full"], r["abs_behaviour_change"], color="tab:red", marker="o")
            axes[1].scatter(r["distance_to_full"], r["abs_loss_change"], color="tab:green", marker="^")
            axes[1].annotate(r["variant"], (r["distance_to_full"], r["abs_behaviour_change"]), fontsize=7)
    axes[0].set_xlabel("parameter change  sqrt(sum_l ||(alpha/r) B_l A_l||_F^2)")
    axes[0].set_ylabel(ylab)
    axes[1].set_xlabel("distance of merged updates to 'full' (same seed)")
    axes[1].set_ylabel("|change| vs full: behaviour (o), mean test loss (^)")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, plt, path, title)
