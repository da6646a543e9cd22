"""jaxinf: influence functions for JAX/Flax language models (see README.md)."""

import os as _os

# jaxinf uses transformers only for configs and tokenizers, but `import transformers` also imports
# torch whenever torch is installed: about 0.5 GB of resident memory for nothing. USE_TORCH=0 (transformers' own
# switch, read once when transformers is first imported) avoids that; set USE_TORCH=1 before importing jaxinf to
# keep torch.
_os.environ.setdefault("USE_TORCH", "0")
