"""A tiny random T5 on the embedded synthetic mixture, both stages, minutes on 2 CPU cores.

    python -m mta_jax.main --config=configs/demo.py --workdir=/tmp/mta_demo
"""
from configs import default


def get_config():
    config = default.get_config()
    config.init_from = ""
    m = config.model
    m.d_model, m.d_kv, m.d_ff, m.num_heads = 128, 32, 256, 4
    m.num_layers, m.num_decoder_layers = 2, 2
    m.feed_forward_proj = "gated-gelu"
    m.tie_word_embeddings = False
    m.dropout_rate = 0.0
    config.mta.encoder_layers = "last"
    config.mta.decoder_layers = "last"
    config.data.source = "synthetic"
    config.data.tokenizer = "byt5"
    config.data.max_source_length = 48
    config.data.max_target_length = 16
    config.stage1.num_train_steps = 600
    config.stage1.learning_rate = 1e-3
    config.stage2.num_train_steps = 200
    config.stage2.learning_rate = 1e-3
    config.train.batch_size = 32
    config.eval.decode = "greedy"
    config.eval.batch_size = 100
    config.eval.max_decode_length = 16
    config.data.eval_max_examples = 100
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 300
    config.log_every_steps = 20
    return config
