"""The evidence job at tiny size: every run writes both LDS kinds and the paired differences, every row of a table
is scored on the same queries, the pooled findings carry intervals and verdicts, evidence.json records its command,
commit and machine, and a rerun resumes."""

import json
import os

import numpy as np
import pytest

from jaxinf import evidence, pipeline


@pytest.fixture(scope="module")
def tiny_evidence(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("evidence"))
    base = pipeline.StudyConfig(model="tiny-llama", data=pipeline.DataConfig(limit_train=12, limit_test=8),
                                methods=("grad_dot", "tracin_adam", "exact"), report=pipeline.ReportConfig(queries=0))
    config = evidence.EvidenceConfig(study=base, datasets=("backdoor",), data_root=os.path.join(workdir, "none"),
                                     seeds=(0,), dampings=(0.1,), queries=8, subsets=8, lds_seeds=2, bootstrap=100,
                                     query_chunk=8,
                                     convergence_checkpoints=2, convergence_methods=("grad_dot", "exact"))
    return config, workdir, evidence.run(config, workdir)


def test_each_run_has_both_lds_kinds_paired_differences_and_one_query_set_per_table(tiny_evidence):
    config, workdir, _ = tiny_evidence
    with open(os.path.join(workdir, "backdoor_s0", "results.json")) as f:
        results = json.load(f)
    assert set(results["ground_truth"]) == {"trajectory", "lds", "lds_masked"}
    assert results["ground_truth"]["lds"]["seeds"] == [0, 1]
    assert results["ground_truth"]["lds"]["retrain"].startswith("from scratch")
    for kind, queries in results["ground_truth_queries"].items():
        assert queries == list(range(8))  # 8 trajectory queries of 8 test rows: every table on all of them
        for method in config.study.methods:
            assert results["methods"][method]["ground_truth"][kind]["queries"] == queries
    paired = results["paired"]["lds"]["exact"]["vs_grad_dot"]
    assert paired["n_queries"] == 8 and paired["n_subsets"] == 8 and np.all(np.isfinite(paired["ci"]))
    assert paired["ci"][0] <= paired["value"] <= paired["ci"][1]


def test_pooled_findings_have_intervals_verdicts_and_files(tiny_evidence):
    config, workdir, results = tiny_evidence
    facts = results["findings"]["backdoor"]["0.1"]["lds"]
    exact = facts["methods"]["exact"]
    assert exact["agreement"]["n_queries"] == 8 and np.all(np.isfinite(exact["agreement"]["ci"]))
    assert exact["verdict_vs_grad_dot"] in ("better", "worse", "open")
    assert "gt:trajectory" in facts["methods"]  # the ground truth scored as a method, on the same queries
    checks = results["findings"]["backdoor"]["checks"]
    assert -1 <= checks["masked_vs_retrain_spearman"] <= 1 and -1 <= checks["retrain_seed_to_seed_spearman"] <= 1
    curve = results["findings"]["backdoor"]["convergence"]
    assert len(curve) >= 2 and all(np.isfinite(c["methods"]["exact"]["trajectory_spearman"]) for c in curve)
    for name in ("evidence.json", "evidence.csv", "evidence.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    provenance = results["provenance"]  # default: this process's command, the checkout's commit, the machine
    assert provenance["command"].strip() and set(provenance) == {"command", "commit", "machine"}
    assert provenance["machine"]["cpus"] >= 1 and provenance["machine"]["jax"]
    with open(os.path.join(workdir, "evidence.json")) as f:
        assert json.load(f)["provenance"] == provenance
    given = {"command": "python -m experiments.evidence --datasets=backdoor", "commit": None, "machine": {}}
    again = evidence.run(config, workdir, provenance=given)  # every stage from its cache: the same numbers
    assert again["findings"] == results["findings"] and again["provenance"] == given


def test_evidence_refuses_too_few_queries_and_a_missing_dataset(tmp_path):
    with pytest.raises(ValueError, match="at least 8"):
        evidence.EvidenceConfig(queries=4).validate()
    with pytest.raises(ValueError, match=r"not found at .*nowhere.*data_root"):
        evidence.EvidenceConfig(datasets=("nowhere",), data_root=str(tmp_path)).validate()
