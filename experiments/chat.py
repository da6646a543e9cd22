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
    runtime.setup()  # compilation cache + cheaper CPU compilation (see jaxinf.runtime)
    logging.set_verbosity(logging.WARNING)
    model = load_model(FLAGS.model)
    fns = LMFunctions(model)
    chat = getattr(model.tokenizer, "chat_template", None) is not None  # a base model (Gemma 3 270M) continues text
    if not chat:
        print(f"({model.name} has no chat template: its greedy continuation of each prompt)")
    bos = "" if chat else (model.tokenizer.bos_token or "")  # a plain continuation starts at <bos>, as in training
    for prompt in FLAGS.prompt:
        answer = greedy_generate(fns, model.params, prompt if chat else bos + prompt,
                                 max_new_tokens=FLAGS.max_new_tokens, chat=chat)
        print(f"> {prompt}\n{answer}\n")


if __name__ == "__main__":
    app.run(main)
