"""Models: presets, the generated dataset, the tokenizer, training and the ModelBundle."""

import os

# Nothing here may fetch weights or data from a hub: make any accidental attempt fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
