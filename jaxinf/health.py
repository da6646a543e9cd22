"""Training health: a machine-readable summary of a convergence log, and the warnings a researcher must see.

``summarize(log, init_norm)`` reads the per-step rows that ``jaxinf.training.train`` writes (loss, grad_norm,
dist_from_init, ...). With W = max(1, S // 5) steps per window over S logged steps:

* ``loss_not_decreasing``: mean loss of the last W steps >= mean loss of the first W steps (S >= 2);
* ``vanishing_gradient``: max gradient norm of the last W steps <= ``VANISH`` x the run's largest gradient
  norm (e.g. a learning rate of 1e9 saturates the softmax: gradient exactly 0 from step 3 on);
* ``far_from_init``: the adapters moved more than ``FAR`` times the norm of their initial values
  (``init_norm``; ||theta_S - theta_0|| / ||theta_0||), the other symptom of that saturation.

A non-finite loss is not a warning: ``train`` stops at once (``nonfinite_message``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

VANISH = 1e-6
FAR = 1e3


def summarize(log: list[dict], init_norm: Optional[float] = None) -> dict:
    """Health summary (JSON-ready) of a convergence log; ``warnings`` lists one sentence per problem found."""
    if not log:
        return {"steps": 0, "ok": True, "warnings": []}
    loss = np.array([r["loss"] for r in log], np.float64)
    grad = np.array([r["grad_norm"] for r in log], np.float64)
    w = max(1, len(log) // 5)
    first_loss, last_loss = float(loss[:w].mean()), float(loss[-w:].mean())
    dist = float(log[-1]["dist_from_init"])
    out = {"steps": int(log[-1]["step"]), "window": w, "first_loss": first_loss, "last_loss": last_loss,
           "max_grad_norm": float(grad.max()), "last_grad_norm": float(grad[-1]), "dist_from_init": dist,
           "init_norm": None if init_norm is None else float(init_norm)}
    flags = {
        "loss_not_decreasing": len(log) >= 2 and last_loss >= first_loss,
        "vanishing_gradient": float(grad[-w:].max()) <= VANISH * float(grad.max()),
        "far_from_init": init_norm is not None and init_norm > 0 and dist > FAR * init_norm,
    }
    messages = {
        "loss_not_decreasing": f"the training loss did not decrease (mean of the first {w} steps {first_loss:.4g}, "
                               f"of the last {w} {last_loss:.4g}): lower --lr, train longer, or check the data",
        "vanishing_gradient": f"the gradient norm vanished ({float(grad[-w:].max()):.3g} in the last {w} steps, "
                              f"{float(grad.max()):.3g} at most): the model is likely saturated (learning rate "
                              "too high?), so gradients and influence scores are meaningless",
        "far_from_init": f"the adapters moved {dist:.3g} from their start, {dist / (init_norm or 1):.3g} times their "
                         "initial norm: the learning rate is likely far too high",
    }
    out.update(flags)
    out["warnings"] = [messages[k] for k, v in flags.items() if v]
    out["ok"] = not out["warnings"]
    return out


def nonfinite_message(row: dict, last_good: Optional[int], workdir: str) -> str:
    """One line: the step whose loss or gradient norm is not finite, and the last good checkpoint."""
    bad = ", ".join(f"{k}={row[k]}" for k in ("loss", "grad_norm") if not math.isfinite(row[k]))
    good = (f"the last good checkpoint is step {last_good} in {workdir}/checkpoints" if last_good is not None
            else "no checkpoint was saved")
    return (f"non-finite training at step {row['step']} ({bad}, lr={row['lr']:.3g}); stopped, {good}; lower --lr "
            "(or set --max_grad_norm) and rerun in a new --workdir, or check the data for empty targets")


def report(workdir: str, log: list[dict], init_norm: Optional[float] = None) -> dict:
    """``summarize``, logged (one warning per problem) and written to ``workdir/health.json``; returns it."""
    import os

    from jaxinf.progress import warn
    from jaxinf.workdir import write_json

    summary = summarize(log, init_norm)
    for message in summary["warnings"]:
        warn(f"training health ({workdir}): {message}")
    write_json(os.path.join(workdir, "health.json"), summary)
    return summary


def read(workdir: str) -> Optional[dict]:
    """The summary ``report`` wrote in ``workdir`` (None if training never finished a call there)."""
    import json
    import os

    path = os.path.join(workdir, "health.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
