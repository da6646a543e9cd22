r"""The study end to end: LoRA fine-tune, attribute every test row with every method, score against ground truth.

    python -m experiments.attribute                                  # SmolLM2, built-in backdoor task, quick preset
    python -m experiments.attribute --data=../shared/paper_datasets/emotion --workdir=runs/emotion

The flags describe a `jaxinf.pipeline.StudyConfig` (`jaxinf.cli.define_study_flags`); the run is
`jaxinf.pipeline.run_study(config, --workdir)`: its stages are cached in --workdir, so an interrupted run
resumes. Outputs: results.json (each test row's top/bottom --top_k training rows per method), results.csv,
metrics.png, ground_truth.json, gt_agreement.png, report.html, the tables below on stdout, a progress line per
stage on stderr. One curvature (--curvature) and one damping per result set; --damping=0.01,0.1,1 sweeps in one
run (several values write --workdir/damping_<f>/results.*).
"""

import time

from absl import app, flags, logging

from jaxinf import cli, pipeline, runtime
from jaxinf.report import tables

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/attribute", "fine-tuning, gradients, scores and results go here")
cli.define_study_flags()


def main(argv):
    del argv
    start = time.perf_counter()
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    logging.set_verbosity(logging.WARNING)
    config = cli.study_config_from_flags()
    with cli.user_errors():  # bad data, a workdir made with other settings, a diverged fine-tune: one line
        result = pipeline.run_study(config, FLAGS.workdir)
    final = result.results["finetune"]
    loss = final["final_loss"] if final["final_loss"] is not None else float("nan")
    print(f"\n{result.title}; fine-tune loss {loss:.3f} after {final['steps']} steps")
    for result_set in result.sets:
        print(tables.method_table(result_set))
        if result_set["gt_kinds"]:
            print(tables.ground_truth_table(result_set))
    path = result.sets[-1]["report"]
    print(f"total {time.perf_counter() - start:.0f} s" + (f"; report: {path}" if path else ""))


if __name__ == "__main__":
    app.run(main)
