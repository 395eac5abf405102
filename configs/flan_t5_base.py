"""Flan-T5-base (v1.1 shapes: gated-GELU FFN, untied head) on the tfds mixture of t5_base.py."""
from configs import t5_base


def get_config():
    config = t5_base.get_config()
    config.init_from = "google/flan-t5-base"
    return config
