"""google/flan-t5-base on a tensorflow-datasets mixture (SST-2, TREC, SNLI, SQuAD question generation).

    python -m mta_jax.main --config=configs/flan_t5_base.py --workdir=runs/flan_t5_base

Needs the tfds data prepared as array_record (`tfds build ...` once, or
--config.data.tfds_download=True with network) and the checkpoint in the Hugging Face cache
or a local folder (--config.init_from=/path/to/flan-t5-base).
"""
from configs import default


def get_config():
    config = default.get_config()
    config.init_from = "google/flan-t5-base"  # v1.1 shapes: gated-GELU, untied head
    config.data.source = "tfds"
    config.data.mixture = "temperature"
    config.data.mixture_temperature = 2.0
    config.mta.encoder_layers = config.mta.decoder_layers = "11"
    config.stage1.learning_rate = config.stage2.learning_rate = 1e-4
    config.train.batch_size = 4
    return config
