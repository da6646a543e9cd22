r"""Collect results.json of several attribute runs into one CSV and Markdown tables (Acc, Cover, AUC, and each
ground truth's agreement when the runs computed one). A solver that did not converge (CG at its iteration limit)
is marked with `*` in every table and `converged=False` in the CSV.

    python -m experiments.summarize --runs=runs/study --out=results/study_quick
"""

import csv
import glob
import io
import json
import os

from absl import app, flags

from jaxinf.study import ALL_METHODS
from jaxinf.workdir import write_text

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "runs/study", "folder whose subfolders hold results.json")
flags.DEFINE_string("out", "results/study_quick", "output prefix: <out>.csv and <out>.md")

STUDY_ORDER = ("mixedS", "mixedL", "emotion", "grammars", "math", "backdoor", "multibackdoor", "multibackdoor5")


def _load(runs_dir):
    found = {}
    for path in glob.glob(os.path.join(runs_dir, "*", "results.json")):
        with open(path) as f:
            found[os.path.basename(os.path.dirname(path))] = json.load(f)
    order = [d for d in STUDY_ORDER if d in found] + sorted(d for d in found if d not in STUDY_ORDER)
    return [(d, found[d]) for d in order]


GT_TITLES = {"trajectory": "Spearman with trajectory influence (the exact derivative of the fine-tuning run)",
             "lds": "LDS (Spearman, across retrained subsets, of summed scores with the retrained query loss)",
             "loo": "Spearman with leave-one-out retraining", "pbrf": "Spearman with the PBRF"}


def _value(d, metric):
    """A method's metric: d[metric]["value"] for Acc/Cover/AUC, d["ground_truth"][kind]["value"] for gt_<kind>."""
    if metric.startswith("gt_"):
        return d.get("ground_truth", {}).get(metric[3:], {}).get("value")
    return d.get(metric, {}).get("value")


def _cell(d, metric):
    if "error" in d:
        return "failed"
    v = _value(d, metric)
    if v is None:
        return ""
    return f"{v:.2f}" + ("*" if d.get("converged") is False else "")


def _table(runs, metric, methods):
    head = "| data (train/test) | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 1)]
    for name, res in runs:
        cells = [_cell(res["methods"].get(m, {}), metric) for m in methods]
        lines.append(f"| {name} ({res['n_train']}/{res['n_test']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    runs = _load(FLAGS.runs)
    if not runs:
        raise app.UsageError(f"no */results.json under {FLAGS.runs}: run experiments.attribute first")
    methods = [m for m in ALL_METHODS if any(m in r["methods"] for _, r in runs)]
    kinds = [k for k in GT_TITLES if any(k in r.get("ground_truth", {}) for _, r in runs)]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["data", "n_train", "n_test", "method", "acc", "acc_lo", "acc_hi", "cover", "cover_lo",
                     "cover_hi", "auc", "spearman_vs_exact", "seconds", "lambda", "converged",
                     *[f"gt_{k}" for k in kinds]])
    for name, res in runs:
        for m in methods:
            d = res["methods"].get(m)
            if not d or "error" in d:
                continue
            writer.writerow([name, res["n_train"], res["n_test"], m, d["acc"]["value"], *d["acc"]["ci"],
                             d["cover"]["value"], *d["cover"]["ci"], d["auc"]["value"],
                             d["vs_exact"]["spearman"], d["seconds"], d.get("lambda", ""),
                             d.get("converged", ""), *[_value(d, f"gt_{k}") for k in kinds]])
    write_text(FLAGS.out + ".csv", buf.getvalue())
    first = runs[0][1]
    parts = [f"Model {first['model']}, preset {first['preset']}, seed {first['seed']}, loss on "
             f"{first['loss_on']}, RepSim pooling {first['repsim_pooling']}. Bootstrap 95% intervals in "
             f"{os.path.basename(FLAGS.out)}.csv.",
             "\n**Acc** (top-1 training row in the test row's group)\n", _table(runs, "acc", methods),
             "\n**Cover** (fraction of the top-c rows in the group, c = group size)\n", _table(runs, "cover", methods),
             "\n**ROC-AUC** (same-group rows ranked above the rest)\n", _table(runs, "auc", methods)]
    for kind in kinds:
        parts += [f"\n**{GT_TITLES[kind]}**\n", _table(runs, f"gt_{kind}", methods)]
    if any(d.get("converged") is False for _, r in runs for d in r["methods"].values()):
        parts.append("\n`*` did not converge (CG reached its iteration limit above its tolerance; see "
                     "relative_residual in results.json).")
    write_text(FLAGS.out + ".md", "\n".join(parts) + "\n")
    print("\n".join(parts))


if __name__ == "__main__":
    app.run(main)
