r"""Parameter change against behaviour change over LoRA data variants (the third explanation).

    python -m experiments.behaviour --data=../shared/paper_datasets/backdoor --workdir=runs/behaviour/backdoor

The run is `jaxinf.explanations.behaviour.run` (the variants and what it measures: its docstring); behaviour.json
and behaviour.png go to --workdir, every variant's fine-tuning and measurement is cached there (resumable).
"""

import json

from absl import app, flags, logging

from jaxinf import cli, runtime, study
from jaxinf.explanations import behaviour
from jaxinf.models import DEFAULT_MODEL

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m-instruct | tiny-llama | tiny-mistral | tiny-gpt2 | local HF dir")
flags.DEFINE_enum("preset", "quick", list(study.PRESETS), "fine-tuning sizes and settings (jaxinf.study.PRESETS)")
flags.DEFINE_string("workdir", "runs/behaviour", "variants' fine-tuning runs, measurements and results go here")
flags.DEFINE_list("seeds", ["0"], "seeds (subsample, adapter init, data order); every variant runs with each")
flags.DEFINE_list("fractions", ["0.1", "0.5"], "fractions of each trigger group to keep (backdoor data; 1 = full)")
flags.DEFINE_list("variants", None, "run only these variants (default: all), e.g. full,without_clean,trigger@0.1")
flags.DEFINE_float("epochs", None, "override the preset's fine-tuning epochs")
flags.DEFINE_integer("max_new_tokens", 8, "greedy tokens per test answer (a refusal shows in the first few)")
flags.DEFINE_integer("gen_batch", 16, "test prompts per generation batch")
cli.define_data_flags()


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    logging.set_verbosity(logging.WARNING)
    try:
        seeds = tuple(int(s) for s in FLAGS.seeds)
        fractions = tuple(float(f) for f in FLAGS.fractions)
    except ValueError as err:
        raise app.UsageError(f"--seeds must be integers and --fractions numbers in (0, 1]: {err}") from None
    study_config = cli.study_config_from_flags()  # --model, --preset, --epochs and the data flags
    with cli.user_errors():  # a bad setting, bad data, a workdir made with other settings: one line
        config = behaviour.BehaviourConfig(
            study_config, seeds=seeds, fractions=fractions,
            variants=tuple(FLAGS.variants) if FLAGS.variants else None, max_new_tokens=FLAGS.max_new_tokens,
            gen_batch=FLAGS.gen_batch).validate()
        results = behaviour.run(config, FLAGS.workdir)
    for r in results["rows"]:
        print(f"{r['variant']:28s} n={r['n_train']:4d} ||BA||={r['param_total']:.4f} behaviour={r['behaviour']:.3f} "
              f"distance to full={r['distance_to_full']:.4f}")
    print(json.dumps(results["summary"], indent=1, default=float))
    print(f"results: {FLAGS.workdir}/behaviour.json, behaviour.png")


if __name__ == "__main__":
    app.run(main)
