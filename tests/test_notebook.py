"""The quickstart notebook runs top to bottom (its code cells, in order, in one namespace)."""

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
    assert set(namespace["scores"]) == {"exact", "cg", "lissa", "datainf", "gradient matching"}
    # CG to tolerance reproduces the exact damped-Fisher solve on every score
    np = namespace["np"]
    np.testing.assert_allclose(namespace["scores"]["cg"], namespace["scores"]["exact"], rtol=1e-3,
                               atol=1e-3 * np.abs(namespace["scores"]["exact"]).max())
