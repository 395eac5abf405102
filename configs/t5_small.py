"""T5-small (6 + 6 blocks) on the tfds mixture of configs/t5_base.py; MTA in the last block."""
from configs import t5_base


def get_config():
    config = t5_base.get_config()
    config.init_from = "t5-small"
    config.mta.encoder_layers = config.mta.decoder_layers = "last"
    return config
