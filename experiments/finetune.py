r"""LoRA fine-tuning of a causal LM on an attribution task, with checkpoints and a convergence log.

    python -m experiments.finetune --model=tiny-llama --data=backdoor --steps=20 --checkpoint_every=5 --workdir=/tmp/ft

Re-running with the same flags resumes from the last checkpoint and ends with the same parameters and log.
"""

from absl import app, flags, logging

from jaxinf import cli, recipes, runtime, training
from jaxinf.models import DEFAULT_MODEL, LoraConfig, load_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "tiny-llama | tiny-mistral | tiny-gpt2 | smollm2-135m-instruct | local HF dir")
flags.DEFINE_string("workdir", "runs/finetune", "checkpoints/, convergence.jsonl and run_config.json go here")
flags.DEFINE_integer("steps", None, "optimiser steps (or set --epochs)")
flags.DEFINE_float("epochs", None, "epochs over the training rows (or set --steps)")
flags.DEFINE_integer("batch_size", 8, "rows per optimiser step")
flags.DEFINE_integer("grad_accum", 1, "micro-batches per step (batch_size must divide by it)")
flags.DEFINE_float("lr", 1e-3, "peak AdamW learning rate (the study used 5e-5 on 7B models)")
flags.DEFINE_integer("warmup_steps", 0, "linear warm-up steps before linear decay")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay")
flags.DEFINE_integer("lora_rank", 4, "LoRA rank r")
flags.DEFINE_float("lora_alpha", 32.0, "LoRA alpha (scale alpha / r)")
flags.DEFINE_float("lora_dropout", 0.0, "dropout on the LoRA input (the study used 0.1)")
flags.DEFINE_list("lora_targets", ["q_proj", "v_proj"], "target projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
flags.DEFINE_integer("checkpoint_every", 10, "save a checkpoint every N steps (all are kept)")
flags.DEFINE_integer("seed", 0, "seed for data order, adapter init and dropout")
flags.DEFINE_integer("stop_after", None, "stop after this many steps in total, as an interruption would")
cli.define_data_flags()  # --data, --test_data/--test_fraction, columns, --template (chat), --max_length (128), limits


def main(argv):
    del argv
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.steps is None and FLAGS.epochs is None:
        FLAGS.epochs = 1.0
    data = cli.task_config_from_flags(seed=FLAGS.seed, template="chat", max_length=128)
    model = load_model(FLAGS.model, seed=FLAGS.seed)
    task = cli.load_task(model, data)
    lora = LoraConfig(rank=FLAGS.lora_rank, alpha=FLAGS.lora_alpha, dropout=FLAGS.lora_dropout,
                      targets=tuple(FLAGS.lora_targets))
    config = training.TrainConfig(
        steps=FLAGS.steps, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, grad_accum=FLAGS.grad_accum,
        lr=FLAGS.lr, warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay,
        checkpoint_every=FLAGS.checkpoint_every, seed=FLAGS.seed)
    with cli.user_errors():  # a workdir made with other settings, a non-finite loss: one line, not a traceback
        _, log = recipes.finetune_lora(
            model, lora, task, config, FLAGS.workdir,
            run_config={"data": FLAGS.data, "template": data.template, "max_length": data.max_length,
                        "loss_on": data.loss_on, "limit_train": data.limit_train, **cli.data_settings(data)},
            stop_after=FLAGS.stop_after)
    if log:
        last = log[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, grad norm {last['grad_norm']:.4f}, "
              f"distance from init {last['dist_from_init']:.4f}")
    print(f"checkpoints: {training.checkpoint_steps(FLAGS.workdir)} in {FLAGS.workdir}/checkpoints")


if __name__ == "__main__":
    app.run(main)
