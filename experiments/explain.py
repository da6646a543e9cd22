r"""Which training rows made the fine-tuned model say this? Top-k rows per query and method, and an HTML report.

    python -m experiments.explain --workdir=runs/attribute --prompt="..." --completion="..."
    python -m experiments.explain --workdir=runs/attribute --prompt="..."            # the model's greedy answer
    python -m experiments.explain --workdir=runs/attribute --queries=queries.jsonl   # {"prompt", "response"}

The workdir is a study run's (`experiments.attribute`): its fine-tuned adapters, cached training gradients and
K-FAC factors are reused, and the methods are the study's (same preconditioners, same damping). A workdir
without a study is fine-tuned first with --model/--data/--preset. Prints each query's top-k and bottom-k
training rows per method (index, group, score, text) and writes <out_dir>/report.html (self-contained; tokens
shaded by their contribution, which sums to the row's score) and <out_dir>/explanations.json.
Score: larger = the training row helps the query more (lowers its loss); the lowest are the most harmful.
"""

import json
import os
import time

from absl import app, flags, logging

from jaxinf import api, runtime, study
from jaxinf.models import DEFAULT_MODEL

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/attribute", "a study workdir (experiments.attribute), or a new one to fine-tune")
flags.DEFINE_multi_string("prompt", [], "query prompt (repeat the flag for several queries)")
flags.DEFINE_multi_string("completion", [], "the completion to explain, one per --prompt; omit all of them to "
                          "explain the fine-tuned model's own greedy completions")
flags.DEFINE_string("queries", None, "JSONL file of queries: one {\"prompt\": ..., \"response\": ...} per line "
                    "(response omitted or null = greedy completion)")
flags.DEFINE_list("methods", ["grad_dot", "exact", "ekfac", "tracin"], f"comma list from {list(study.METHODS)}")
flags.DEFINE_integer("k", 5, "top-k (most helpful) and bottom-k (most harmful) rows per query and method")
flags.DEFINE_string("out_dir", None, "where report.html and explanations.json go (default: <workdir>/explain)")
flags.DEFINE_bool("per_token", True, "compute per-token contributions (one forward-mode pass per shown row set)")
flags.DEFINE_float("damping", None, "relative damping of the methods (default: the study preset's)")
flags.DEFINE_enum("damping_scope", "global", list(study.DAMPING_SCOPES), "as experiments.attribute's flag")
flags.DEFINE_enum("curvature", "fisher", list(study.CURVATURES), "as experiments.attribute's flag")
flags.DEFINE_string("model", DEFAULT_MODEL, "only for a workdir without a study: the model to fine-tune")
flags.DEFINE_string("data", "backdoor", "only for a workdir without a study: the training data")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "only for a workdir without a study: the preset")


def _queries() -> list:
    if FLAGS.queries and FLAGS.prompt:
        raise app.UsageError("pass queries either with --queries=<file.jsonl> or with --prompt, not both")
    if FLAGS.queries:
        if not os.path.exists(FLAGS.queries):
            raise app.UsageError(f"--queries={FLAGS.queries}: no such file")
        out = []
        with open(FLAGS.queries) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise app.UsageError(f"--queries={FLAGS.queries} line {i + 1}: not JSON ({err})")
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise app.UsageError(f"--queries={FLAGS.queries} line {i + 1}: needs a string field 'prompt' "
                                         "(and optionally 'response')")
                out.append({"prompt": rec["prompt"], "response": rec.get("response", rec.get("completion"))})
        return out
    if not FLAGS.prompt:
        raise app.UsageError("no query: pass --prompt=... [--completion=...] or --queries=<file.jsonl>")
    if FLAGS.completion and len(FLAGS.completion) != len(FLAGS.prompt):
        raise app.UsageError(f"{len(FLAGS.prompt)} --prompt but {len(FLAGS.completion)} --completion flags: give one "
                             "--completion per --prompt, or none for the model's greedy completions")
    completions = FLAGS.completion or [None] * len(FLAGS.prompt)
    return [{"prompt": p, "response": c} for p, c in zip(FLAGS.prompt, completions)]


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    start = time.perf_counter()
    logging.set_verbosity(logging.WARNING)
    unknown = [m for m in FLAGS.methods if m not in study.METHODS]
    if unknown:
        raise app.UsageError(f"unknown --methods {unknown}; choose from {list(study.METHODS)}")
    if FLAGS.k < 1:
        raise app.UsageError(f"--k={FLAGS.k}: must be >= 1")
    queries = _queries()
    settings = None
    if not os.path.exists(os.path.join(FLAGS.workdir, api.SETTINGS)):
        settings = {"model": FLAGS.model, "data": FLAGS.data, "preset": FLAGS.preset}
    result = api.explain(FLAGS.workdir, queries, methods=FLAGS.methods, k=FLAGS.k, out_dir=FLAGS.out_dir,
                         settings=settings, per_token=FLAGS.per_token, damping=FLAGS.damping,
                         damping_scope=FLAGS.damping_scope, curvature=FLAGS.curvature)
    for i, ex in enumerate(result.explanations):
        q = ex["query"]
        print(f"\nquery {i + 1}: {_short(q['prompt'], 120)!r} -> {_short(q['response'], 120)!r}")
        for method, res in ex["methods"].items():
            for which, label in (("top", "most helpful"), ("bottom", "most harmful")):
                print(f"  {method} - {label}:")
                for r in res[which]:
                    print(f"    #{r['index']:<5d} {r['group']:>12.12s} {r['score']:+11.4g}  "
                          f"{_short(r['prompt'], 50)!r} -> {_short(r['response'], 40)!r}")
    print(f"\n{len(queries)} queries x {len(FLAGS.methods)} methods in {time.perf_counter() - start:.1f} s")
    print(f"report: {result.report}\nscores and tokens: {result.json_path}")


if __name__ == "__main__":
    app.run(main)
