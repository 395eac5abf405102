"""The authors' JSON-lines data (ALTER), T5-base by default, the released recipe.

    python -m mta_jax.main --config=configs/alter.py --workdir=runs/alter \
        --config.data.train_path=train.jsonl --config.data.eval_path=shared/data/alter/english_val.jsonl

`configs/alter.py:tiny` swaps in a tiny random T5 and the byte tokenizer for a CPU smoke run.
Task types come from each line's `type` field.
"""
from configs import default


def get_config(arg: str = ""):
    config = default.get_config()
    config.init_from = "t5-base"
    config.data.source = "jsonl"
    config.data.train_path = ""  # set on the command line
    config.data.eval_path = ""  # set on the command line
    if arg == "tiny":
        config.init_from = ""
        m = config.model
        m.d_model, m.d_kv, m.d_ff, m.num_heads, m.num_layers = 64, 16, 128, 4, 2
        m.feed_forward_proj, m.tie_word_embeddings, m.dropout_rate = "gated-gelu", False, 0.0
        config.mta.encoder_layers = config.mta.decoder_layers = "last"
        config.data.tokenizer = "byt5"
        # Byte-level: SQuAD-style contexts need the full 512 bytes, questions up to 64.
        config.data.max_source_length = 512
        config.data.max_target_length = 64
        config.stage1.num_train_steps, config.stage2.num_train_steps = 200, 100
        config.stage1.learning_rate = config.stage2.learning_rate = 1e-3
        config.train.batch_size = 16
        config.eval.decode, config.eval.max_decode_length, config.eval.batch_size = "greedy", 64, 50
        config.data.eval_max_examples = 50
        config.checkpoint_every_steps = config.eval_every_steps = 100
        config.log_every_steps = 10
    elif arg:
        raise ValueError(f"configs/alter.py takes '' or 'tiny', got {arg!r}")
    return config
