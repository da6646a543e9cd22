"""A researcher's mistakes end in one line (file, row, field, fix) and lose nothing; training health is reported.

The binary cases run experiments.finetune's main in ONE subprocess (a driver script below: one JAX import, one
compiled train step) against one workdir that first holds a real 2-step run, and check after every bad input
that main raised app.UsageError with a one-line message and that every file in the workdir is byte-identical.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxinf import cli, health

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- health summary on hand-made logs ----------------------------------------------------------

def _log(losses, grads, dist=0.1):
    return [{"step": i + 1, "loss": l, "grad_norm": g, "dist_from_init": dist} for i, (l, g) in
            enumerate(zip(losses, grads))]


def test_health_summary_flags_each_problem():
    good = health.summarize(_log(np.linspace(3.0, 1.0, 10), np.full(10, 0.5)), init_norm=1.0)
    assert good["ok"] and good["warnings"] == [] and good["window"] == 2
    assert good["first_loss"] == pytest.approx(np.mean(np.linspace(3.0, 1.0, 10)[:2]))
    flat = health.summarize(_log([2.0, 2.1, 2.0, 2.2, 2.1], [1.0] * 5), init_norm=1.0)
    assert flat["loss_not_decreasing"] and not flat["vanishing_gradient"] and not flat["ok"]
    assert "did not decrease" in flat["warnings"][0]
    # the lr=1e9 run: loss at log(vocab), gradient exactly 0 after step 2, adapters 4e10 from their start
    sat = health.summarize(_log([5.579, 5.56] + [5.565] * 6, [0.16, 0.23] + [0.0] * 6, dist=4.2e10), init_norm=2.0)
    assert sat["vanishing_gradient"] and sat["far_from_init"] and not sat["ok"]
    assert any("saturated" in w for w in sat["warnings"]) and any("2.1e+10 times" in w for w in sat["warnings"])
    assert health.summarize([])["ok"]


def test_nonfinite_message_names_step_and_last_good_checkpoint():
    row = {"step": 7, "loss": float("nan"), "grad_norm": 1.0, "lr": 1e9}
    msg = health.nonfinite_message(row, 5, "/w")
    assert "step 7 (loss=nan, lr=1e+09)" in msg and "last good checkpoint is step 5 in /w/checkpoints" in msg
    assert "\n" not in msg


def test_user_errors_become_one_line_usage_errors():
    from absl import app
    with pytest.raises(app.UsageError) as e:
        with cli.user_errors():
            raise ValueError("a.jsonl:3: bad\n  thing")
    assert str(e.value) == "a.jsonl:3: bad thing"
    with pytest.raises(KeyError):  # a bug is not a user mistake: it keeps its traceback
        with cli.user_errors():
            raise KeyError("x")


# --- the binary: every listed bad input is one line and loses nothing ----------------------------

DRIVER = textwrap.dedent(r'''
    import hashlib, json, os, sys
    from absl import app, flags
    sys.argv = ["finetune"]
    import experiments.finetune as ft
    FLAGS = flags.FLAGS
    work, cases = json.loads(os.environ["CASES"])

    def snapshot(d):
        out = {}
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        return out

    def run(args):
        FLAGS.unparse_flags()
        FLAGS(["finetune", "--model=tiny-llama", "--steps=2", "--batch_size=4", "--checkpoint_every=1",
               "--max_length=96", *args])
        ft.main([])

    run([f"--workdir={work}", "--data=backdoor", "--limit_train=8"])  # something computed to keep
    before = snapshot(work)
    report = {"files": sorted(before)}
    for name, args in cases.items():
        try:
            run([f"--workdir={work}", *args])
            report[name] = {"error": None}
        except app.UsageError as e:
            report[name] = {"error": str(e)}
        except Exception as e:
            report[name] = {"error": None, "other": f"{type(e).__name__}: {e}"}
        report[name]["kept"] = snapshot(work) == before or sorted(set(before) - set(snapshot(work)))
    json.dump(report, open(os.environ["REPORT"], "w"))
''')


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _rows(n, groups=("x", "y"), **extra):
    return [{"prompts": f"q{i}?", "response": f"a{i}", "variation": groups[i % len(groups)], **extra}
            for i in range(n)]


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    work = str(d / "work")
    plain = _jsonl(d / "rows.jsonl", _rows(12))
    malformed = d / "malformed.jsonl"
    malformed.write_text("".join(json.dumps(r) + "\n" for r in _rows(4)) + '{"prompts": "q", "response"\n')
    solo = _jsonl(d / "solo.jsonl", _rows(12) + [{"prompts": "alone?", "response": "yes", "variation": "solo"}])
    unseen = _jsonl(d / "unseen.jsonl", [{"prompts": "new?", "response": "r", "variation": "z"}])
    empty = _jsonl(d / "empty.jsonl", _rows(12)[:6] + [{"prompts": "q?", "response": " ", "variation": "x"}])
    long = _jsonl(d / "long.jsonl", _rows(12) + [{"prompts": "q?", "response": "w" * 300, "variation": "x"}])
    dup = _jsonl(d / "dup.jsonl", _rows(3))
    other_cols = _jsonl(d / "cols.jsonl", [{"prompt": r["prompts"], "response": r["response"],
                                            "variation": r["variation"]} for r in _rows(12)])
    cases = {
        "no_split": [f"--data={plain}"],
        "malformed": [f"--data={malformed}", "--test_fraction=0.25"],
        "one_row_group": [f"--data={solo}", "--test_fraction=0.25"],
        "unseen_group": [f"--data={plain}", f"--test_data={unseen}"],
        "empty_response": [f"--data={empty}", "--test_fraction=0.5"],
        "longer_than_context": [f"--data={long}", "--test_fraction=0.25", "--max_length=400"],
        "duplicate": [f"--data={plain}", f"--test_data={dup}"],
        "prompt_column_hint": [f"--data={other_cols}", "--test_fraction=0.25"],
        "other_settings": ["--data=backdoor", "--limit_train=8", "--lr=0.5"],
        "nonfinite": ["--data=backdoor", "--limit_train=8", "--lr=inf", "--workdir=" + str(d / "nan")],
        "saturated": ["--data=backdoor", "--limit_train=8", "--lr=1e9", "--steps=4", "--workdir=" + str(d / "sat")],
    }
    report_path = d / "report.json"
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", CASES=json.dumps([work, cases]),
                                   REPORT=str(report_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(report_path) as f:
        report = json.load(f)
    with open(d / "sat" / "health.json") as f:
        report["saturated"]["health"] = json.load(f)
    return report


EXPECTED = {  # each message names the file and line/row, the field and the fix
    "no_split": r"rows.jsonl has no splits.*--test_data=FILE.*--test_fraction=0.2",
    "malformed": r"malformed.jsonl:5: malformed JSON \(.*\); fix line 5",
    "one_row_group": r"solo.jsonl:13: group 'solo' \(--group_column\) has one row.*add rows of that group",
    "unseen_group": r"unseen.jsonl:1: test group 'z' \(--group_column\) has no training row.*add training rows",
    "empty_response": r"empty.jsonl:7: the response \(--response_column\) is empty.*fill it in or drop the row",
    "longer_than_context": r"long.jsonl:13: the row is \d+ tokens .* longer than the model's context of 256; "
                           r"pass --max_length=256",
    "duplicate": r"dup.jsonl:1: 3 test row\(s\) have the same prompt and response as a training row "
                 r"\(this one equals .*rows.jsonl:1\).*--allow_overlap",
    "prompt_column_hint": r"cols.jsonl: missing column 'prompts'.*--prompt_column=<one of those>",
    "other_settings": r"holds a run made with other settings .*lr",
    "nonfinite": r"non-finite training at step 2 \(loss=nan.*last good checkpoint is step 0 in .*nan/checkpoints",
}


def test_binary_reports_a_saturated_run_in_health_json(binary_report):
    """The issue's lr=1e9 fine-tune: it runs to the end (no error) but health.json flags the vanished gradient and
    the adapters' distance from init (before, nothing warned)."""
    got = binary_report["saturated"]
    assert got["error"] is None and got.get("other") is None, got
    h = got["health"]
    assert h["vanishing_gradient"] and h["far_from_init"] and not h["ok"], h
    # saturation makes the gradient (close to) zero; exactly 0.0 or a denormal depends on flush-to-zero settings
    assert h["last_grad_norm"] < 1e-30 and h["dist_from_init"] > 1e6 * h["init_norm"]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_binary_bad_input_is_one_usage_line_and_keeps_the_workdir(binary_report, case):
    import re
    got = binary_report[case]
    assert got["error"] is not None, got  # an app.UsageError, not a traceback or a silent run
    assert "\n" not in got["error"] and re.search(EXPECTED[case], got["error"]), got["error"]
    assert got["kept"] is True, got["kept"]
    assert any(f.startswith("checkpoints") for f in binary_report["files"])
