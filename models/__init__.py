"""Models: presets, the generated dataset, the tokenizer, training and the ModelBundle."""

import os

# Nothing here may fetch weights or data from a hub: make any accidental attempt fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers.utils import logging as _hf_logging  # noqa: E402

# Our progress bars and one-line errors are the interface; transformers' load bars are noise.
_hf_logging.disable_progress_bar()
_hf_logging.set_verbosity_error()
