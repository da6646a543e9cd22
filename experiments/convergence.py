r"""Attribution, optimisation state and curvature at every checkpoint of one fine-tuning run (the second explanation).

    python -m experiments.convergence --data=../shared/paper_datasets/backdoor --workdir=runs/convergence/backdoor

The run is `jaxinf.explanations.convergence.run` (what it measures: its docstring); convergence.json and
convergence.png go to --workdir, every checkpoint is cached there (an interrupted run resumes).
"""

from absl import app, flags, logging

from jaxinf import cli, runtime, study
from jaxinf.explanations import convergence
from jaxinf.models import DEFAULT_MODEL

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m-instruct | tiny-llama | tiny-mistral | tiny-gpt2 | local HF dir")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "sizes and optimiser settings (jaxinf.study.PRESETS)")
flags.DEFINE_string("workdir", "runs/convergence", "fine-tuning, per-checkpoint measurements and results go here")
flags.DEFINE_integer("seed", 0, "seed for subsampling, data order, adapter init and Lanczos starts")
flags.DEFINE_float("epochs", 10.0, "fine-tuning epochs (run past convergence)")
flags.DEFINE_integer("checkpoints", 5, "number of evaluated checkpoints after step 0 (evenly spaced)")
flags.DEFINE_list("methods", ["grad_dot", "datainf", "exact", "ekfac"], "jaxinf.study methods scored per checkpoint")
flags.DEFINE_float("damping", None, "relative damping f (lambda = f x mean Fisher eigenvalue); default: the preset's")
flags.DEFINE_integer("spectrum_rows", 8, "training rows in the Hessian / GGN operators for Lanczos (0 = skip)")
flags.DEFINE_integer("lanczos_iters", 12, "Lanczos steps per operator and checkpoint")
flags.DEFINE_integer("ground_truth_queries", 0, "test rows for trajectory ground truth (0 = skip; costs one reverse "
                     "pass through the whole run per checkpoint)")
cli.define_data_flags()


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    logging.set_verbosity(logging.WARNING)
    study_config = cli.study_config_from_flags()  # --model, --preset, --seed, --damping and the data flags
    with cli.user_errors():  # a bad setting, bad data, a workdir made with other settings: one line
        config = convergence.ConvergenceConfig(
            study_config, epochs=FLAGS.epochs, checkpoints=FLAGS.checkpoints, methods=tuple(FLAGS.methods),
            spectrum_rows=FLAGS.spectrum_rows, lanczos_iters=FLAGS.lanczos_iters,
            ground_truth_queries=FLAGS.ground_truth_queries).validate()
        results = convergence.run(config, FLAGS.workdir)
    print(f"{results['model']}: {results['steps']} steps, {results['n_train']} train, {results['n_test']} test")
    for rec in results["checkpoints"]:
        print(convergence.summary_line(rec, results["methods"]))
    print(f"results: {FLAGS.workdir}/convergence.json, convergence.png")


if __name__ == "__main__":
    app.run(main)
