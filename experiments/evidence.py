r"""The evidence job: every dataset x fine-tuning seed as a study with real-retrain LDS, then pooled paired verdicts.

    python -m experiments.evidence --workdir=runs/evidence --out=results/evidence        # SmolLM2, 3 datasets, 2 seeds
    python -m experiments.evidence --model=tiny-llama --datasets=backdoor --limit_train=16 --limit_test=10 --subsets=8

The run is `jaxinf.evidence.run(EvidenceConfig, --workdir, --out)` (what it computes: that module's docstring).
Each (dataset, seed) study is a resumable workdir, so the job can run over several sittings; progress and an
estimate of the time left go to stderr. Outputs: evidence.json (with this command, the git commit and the machine),
evidence.csv, evidence.png in --out.
"""

import dataclasses
import sys

from absl import app, flags, logging

from jaxinf import cli, evidence, runtime

FLAGS = flags.FLAGS
_D = evidence.EvidenceConfig()
flags.DEFINE_string("model", _D.study.model, "a model name (jaxinf.models) or a local Hugging Face folder")
flags.DEFINE_string("preset", "quick", "fine-tuning sizes and settings (jaxinf.study.PRESETS)")
flags.DEFINE_list("methods", list(_D.study.methods), "methods scored in every run")
flags.DEFINE_integer("limit_train", None, "training rows per run (default: the preset's; 0 = all)")
flags.DEFINE_integer("limit_test", None, "test rows per run (default: the preset's; 0 = all); LDS uses all")
flags.DEFINE_list("datasets", list(_D.datasets), "dataset folders under --data_root (or generator names)")
flags.DEFINE_string("data_root", _D.data_root, "the study's paper_datasets folder")
flags.DEFINE_list("seeds", [str(s) for s in _D.seeds], "fine-tuning seeds (one study per dataset and seed)")
flags.DEFINE_list("dampings", [f"{d:g}" for d in _D.dampings], "relative damping values of the sweep")
flags.DEFINE_integer("queries", _D.queries, "trajectory-influence test rows per run (spread over the test set)")
flags.DEFINE_integer("subsets", _D.subsets, "LDS subsets per run")
flags.DEFINE_float("fraction", _D.fraction, "fraction of the training rows each subset keeps")
flags.DEFINE_bool("stratify", _D.stratify, "subsets keep that fraction of every group")
flags.DEFINE_integer("lds_seeds", _D.lds_seeds, "seeds each subset is retrained from scratch with")
flags.DEFINE_integer("query_chunk", _D.query_chunk, "trajectory queries per adjoint pass (memory grows with it)")
flags.DEFINE_integer("convergence_checkpoints", _D.convergence_checkpoints, "checkpoints of the convergence run "
                     "with ground truth, per dataset (0 = skip)")
flags.DEFINE_integer("bootstrap", _D.bootstrap, "bootstrap resamples of every interval")
flags.DEFINE_string("workdir", "runs/evidence", "one study workdir per dataset and seed")
flags.DEFINE_string("out", None, "where evidence.json / .csv / .png go (default: --workdir)")


def main(argv):
    del argv
    runtime.setup()
    logging.set_verbosity(logging.WARNING)
    with cli.user_errors():
        data = dataclasses.replace(_D.study.data, limit_train=FLAGS.limit_train, limit_test=FLAGS.limit_test)
        study = dataclasses.replace(_D.study, model=FLAGS.model, preset=FLAGS.preset, methods=tuple(FLAGS.methods),
                                    data=data)
        config = evidence.EvidenceConfig(
            study=study, datasets=tuple(FLAGS.datasets), data_root=FLAGS.data_root,
            seeds=tuple(int(s) for s in FLAGS.seeds), dampings=tuple(float(d) for d in FLAGS.dampings),
            queries=FLAGS.queries, subsets=FLAGS.subsets, fraction=FLAGS.fraction, stratify=FLAGS.stratify,
            lds_seeds=FLAGS.lds_seeds, query_chunk=FLAGS.query_chunk,
            convergence_checkpoints=FLAGS.convergence_checkpoints, bootstrap=FLAGS.bootstrap).validate()
        results = evidence.run(config, FLAGS.workdir, FLAGS.out, provenance=runtime.provenance(sys.argv))
    for row in evidence.evidence_rows(results):
        if row["method"] == "grad_dot":
            continue
        print(f"{row['dataset']:10s} f={row['damping']:<7g} {row['ground_truth']:11s} {row['method']:14s} "
              f"{row['value']:+.3f} [{row['lo']:+.2f},{row['hi']:+.2f}] n={row['n_queries']:<3d} vs grad_dot "
              f"{row['vs_grad_dot']:+.3f} [{row['vs_grad_dot_lo']:+.2f},{row['vs_grad_dot_hi']:+.2f}] "
              f"{row['verdict_vs_grad_dot']}")
    print(f"results: {FLAGS.out or FLAGS.workdir}/evidence.json, evidence.csv, evidence.png "
          f"({results['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    app.run(main)
