r"""Greedy answers of a model (optionally with fine-tuned LoRA adapters from a workdir) to a few instructions.

    python -m experiments.chat --model=smollm2-135m-instruct --prompt="What is the capital of France?"
"""

from absl import app, flags, logging

from jaxinf import runtime
from jaxinf.models import DEFAULT_MODEL, LMFunctions, load_model
from jaxinf.models.generate import greedy_generate

FLAGS = flags.FLAGS
flags.DEFINE_string("model", DEFAULT_MODEL, "model name or local HF directory")
flags.DEFINE_multi_string("prompt", ["What is the capital of France?", "Give me three tips for staying healthy."],
                          "instructions to answer (repeat the flag for several)")
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")


def main(argv):
    del argv
    runtime.setup()  # persistent compilation cache (JAXINF_COMPILATION_CACHE=0 turns it off)
    logging.set_verbosity(logging.WARNING)
    model = load_model(FLAGS.model)
    fns = LMFunctions(model)
    for prompt in FLAGS.prompt:
        print(f"> {prompt}\n{greedy_generate(fns, model.params, prompt, max_new_tokens=FLAGS.max_new_tokens)}\n")


if __name__ == "__main__":
    app.run(main)
