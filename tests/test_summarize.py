"""experiments.summarize: the eight-dataset tables mark unconverged solvers and carry ground-truth agreement."""

import json
import os
import subprocess
import sys


def _method(acc, cover, auc, **extra):
    return {"acc": {"value": acc, "ci": [acc, acc]}, "cover": {"value": cover, "ci": [cover, cover]},
            "auc": {"value": auc}, "vs_exact": {"spearman": 1.0}, "seconds": 1.0, **extra}


def test_summarize_marks_unconverged_and_tables_ground_truth(tmp_path):
    for name, cg_converged in (("backdoor", False), ("emotion", True)):
        os.makedirs(tmp_path / "runs" / name)
        res = {"model": "m", "preset": "quick", "seed": 0, "loss_on": "response", "repsim_pooling": "prompt_end",
               "n_train": 40, "n_test": 10, "ground_truth": {"trajectory": {}, "lds": {}},
               "methods": {"grad_dot": _method(0.8, 0.7, 0.6, ground_truth={"trajectory": {"value": 0.31},
                                                                           "lds": {"value": -0.12}}),
                           "cg": _method(0.5, 0.4, 0.3, converged=cg_converged,
                                         ground_truth={"trajectory": {"value": 0.55}, "lds": {"value": 0.25}})}}
        with open(tmp_path / "runs" / name / "results.json", "w") as f:
            json.dump(res, f)
    out = str(tmp_path / "out" / "table")
    subprocess.run([sys.executable, "-m", "experiments.summarize", f"--runs={tmp_path / 'runs'}", f"--out={out}"],
                   check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    md = open(out + ".md").read()
    assert "| backdoor (40/10) | 0.80 | 0.50* |" in md  # Acc, CG flagged
    assert "| emotion (40/10) | 0.80 | 0.50 |" in md
    assert "trajectory influence" in md and "| backdoor (40/10) | 0.31 | 0.55* |" in md
    assert "LDS" in md and "| emotion (40/10) | -0.12 | 0.25 |" in md
    assert "did not converge" in md
    rows = open(out + ".csv").read().splitlines()
    assert rows[0].endswith("converged,gt_trajectory,gt_lds")
    assert any(r.startswith("backdoor,40,10,cg,") and ",False,0.55,0.25" in r for r in rows)
