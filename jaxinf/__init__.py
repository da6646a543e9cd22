"""jaxinf: influence functions for JAX/Flax language models (see README.md)."""

import os as _os

# jaxinf uses transformers only for its Flax models, configs and tokenizers, but `import transformers` also imports
# torch whenever torch is installed: about 0.5 GB of resident memory for nothing. USE_TORCH=0 (transformers' own
# switch, read once when transformers is first imported) avoids that; set USE_TORCH=1 before importing jaxinf to
# keep torch (e.g. a local model folder with PyTorch .bin weights; .safetensors need no torch).
_os.environ.setdefault("USE_TORCH", "0")
