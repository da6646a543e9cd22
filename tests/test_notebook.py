"""The quickstart notebook runs top to bottom (its code cells, in order, in one namespace) through jaxinf.api."""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    with open(os.path.join(ROOT, "experiments", "quickstart.ipynb")) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    namespace = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    study, ex = namespace["study"], namespace["ex"]
    table = {r["method"]: r for r in study.table}
    assert set(table) == {"grad_dot", "exact", "cg", "lissa", "datainf", "repsim"}
    # CG to tolerance reproduces the exact damped-Fisher ranking of every test row (up to near-tied rows, which
    # float32 rounding may swap on another CPU)
    assert float(table["cg"]["spearman_vs_exact"]) > 0.99
    assert len(study.top_rows["exact"]) == study.results["n_test"] and study.report.endswith("report.html")
    assert os.path.exists(study.report) and study.plots
    rows = ex.explanations[0]["methods"]["exact"]["top"]
    assert ex.explanations[0]["query"]["response"]  # the greedy completion
    for r in rows:
        assert abs(sum(r["token_scores"]) - r["score"]) <= 1e-4 * max(abs(x["score"]) for x in rows)
