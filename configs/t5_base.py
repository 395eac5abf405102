"""T5-base on a tensorflow-datasets mixture (SST-2, TREC, SNLI, SQuAD question generation).

    python -m mta_jax.main --config=configs/t5_base.py --workdir=runs/t5_base

Needs the tfds data prepared as array_record (`tfds build ...` once, or
--config.data.tfds_download=True with network) and the checkpoint in the Hugging Face cache or
a local folder (--config.init_from=/path/to/t5-base). The other Hugging Face configs import
this one and change a few fields. This is not the authors' recipe (they trained on their own
JSON lines): that is `configs/alter.py:released` (docs/method.md).
"""
from configs import default


def get_config():
    config = default.get_config()
    config.init_from = "t5-base"
    config.data.source = "tfds"
    config.data.mixture = "temperature"
    config.data.mixture_temperature = 2.0
    config.mta.encoder_layers = config.mta.decoder_layers = "11"  # the last block of T5-base
    # Accelerators: bfloat16 activations (float32 parameters and optimizer state), and dropout
    # bits from XLA's RngBitGenerator (README "Compile for TPU" has the figures).
    config.model.dtype = "bfloat16"
    config.train.rng_impl = "rbg"
    return config
