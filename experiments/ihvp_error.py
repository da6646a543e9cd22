r"""Each iHVP solver's error against the exact damped inverse, and its attribution (the first explanation).

    python -m experiments.ihvp_error --data=../shared/paper_datasets/backdoor --workdir=runs/ihvp_error/backdoor

The run is `jaxinf.explanations.ihvp_error.run` (what it measures: its docstring); ihvp_error.json and
ihvp_error.png go to --workdir, with the fine-tuning and gradients it caches.
"""

from absl import app, flags, logging

from jaxinf import cli, runtime, study
from jaxinf.explanations import ihvp_error
from jaxinf.models import DEFAULT_MODEL

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m-instruct | tiny-llama | tiny-mistral | tiny-gpt2 | local HF dir")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "fine-tuning sizes and settings (jaxinf.study.PRESETS)")
flags.DEFINE_string("workdir", "runs/ihvp_error", "fine-tuning, gradients and results go here")
flags.DEFINE_integer("seed", 0, "seed for subsampling, fine-tuning and solvers")
flags.DEFINE_list("curvatures", ["fisher", "ggn", "hessian"], "fisher | ggn | hessian")
flags.DEFINE_list("dampings", ["0.1", "1", "10"], "relative dampings f (lambda = f x mean eigenvalue)")
flags.DEFINE_list("model_dampings", None, "dampings for ggn/hessian (default: --dampings); model products are costly")
flags.DEFINE_integer("queries", 4, "test rows used as queries")
flags.DEFINE_integer("rows", 8, "training rows in the GGN / Hessian operators")
flags.DEFINE_list("cg_iters", ["2", "8", "32"], "CG budgets (C-products)")
flags.DEFINE_list("lissa_depths", ["16", "64", "256"], "LiSSA depths (C-products)")
flags.DEFINE_list("lanczos_iters", ["8", "32"], "Lanczos steps (C-products)")
flags.DEFINE_integer("ref_iters", 200, "products for the iterative reference when D > --dense_max")
flags.DEFINE_integer("dense_max", 2000, "form C densely (float64 eigendecomposition) when D is at most this")
flags.DEFINE_integer("trace_probes", 8, "Hutchinson probes for tr(C) (GGN, Hessian)")
cli.define_data_flags()


def _numbers(name, kind, example):
    try:
        return tuple(kind(v) for v in FLAGS[name].value)
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise app.UsageError(f"--{name}={','.join(FLAGS[name].value)}: give {what}, e.g. {example}") from None


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    logging.set_verbosity(logging.WARNING)
    study_config = cli.study_config_from_flags()  # --model, --preset, --seed and the data flags
    with cli.user_errors():  # a bad setting, bad data, a workdir made with other settings: one line
        config = ihvp_error.IhvpErrorConfig(
            study_config, curvatures=tuple(FLAGS.curvatures), dampings=_numbers("dampings", float, "0.1,1"),
            model_dampings=_numbers("model_dampings", float, "0.1,1") if FLAGS.model_dampings else None,
            queries=FLAGS.queries, rows=FLAGS.rows, cg_iters=_numbers("cg_iters", int, "8,32"),
            lissa_depths=_numbers("lissa_depths", int, "16,64"), lanczos_iters=_numbers("lanczos_iters", int, "8,32"),
            ref_iters=FLAGS.ref_iters, dense_max=FLAGS.dense_max, trace_probes=FLAGS.trace_probes).validate()
        results = ihvp_error.run(config, FLAGS.workdir)
    for ref in results["references"]:
        solved = [r for r in results["solvers"]
                  if r["curvature"] == ref["curvature"] and r["damping_fraction"] == ref["damping_fraction"]]
        print(f"{ref['curvature']} f={ref['damping_fraction']:g}: exact Cover {ref['metrics']['cover']:.2f}; " + ", ".join(
            f"{r['solver']}({r['budget']}) " + ("failed" if "error" in r else f"error {r['param_error']:.2g}")
            for r in solved))
    print(f"results: {FLAGS.workdir}/ihvp_error.json, ihvp_error.png")


if __name__ == "__main__":
    app.run(main)
