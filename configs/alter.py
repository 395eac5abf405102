"""The authors' JSON-lines data (ALTER), T5-base by default.

    python -m mta_jax.main --config=configs/alter.py --workdir=runs/alter \
        --config.data.train_path=train.jsonl --config.data.eval_path=shared/data/alter/english_val.jsonl

`configs/alter.py:tiny` swaps in a tiny random T5 and the byte tokenizer for a CPU smoke run.
Task types come from each line's `type` field.

`configs/alter.py:released,train=train.jsonl,eval=val.jsonl` is the authors' released code as
released (EasyNLP `examples/mta`; docs/method.md has the table of what differs from the
defaults and why): Adam 1e-4 at batch 4 on T5-base, `<e>` as the decoder's first input in
training, inputs cut at 512 tokens in training and 768 at inference, labels of 63 tokens,
127 new tokens when decoding, anaphora resolution scored as classify, and a stage two as its
`MTA_sharemoe4` class (each task's own adapters {t, t+1}, 3 shared adapters, a bias-free gate
of width d_model). More options after `released`, comma-separated:

    train=PATH    the training file; its line count sets the steps (`epochs` passes over it)
    eval=PATH     the evaluation file
    epochs=N      passes over the training file per stage (T5-base 1: train.py's default;
                  T5-large 10: train.sh)
    steps=N       steps per stage instead (no training file needed at config time)
    model=NAME    t5-base (default) | t5-large (Adam 3e-5 at batch 1, as train.sh)

Steps computed here can still be overridden: --config.stage1.num_train_steps=...
"""
import math

from configs import default

# The released recipe of each backbone: (learning rate, batch size, epochs).
RELEASED = {"t5-base": (1e-4, 4, 1), "t5-large": (3e-5, 1, 10)}


def get_config(arg: str = ""):
    config = default.get_config()
    config.init_from = "t5-base"
    config.data.source = "jsonl"
    config.data.train_path = ""  # set on the command line
    config.data.eval_path = ""  # set on the command line
    name, *options = arg.split(",")
    if name == "tiny" and not options:
        _tiny(config)
    elif name == "released":
        _released(config, dict(_option(o) for o in options))
    elif arg:
        raise ValueError(f"configs/alter.py takes '', 'tiny' or 'released[,key=value...]', "
                         f"got {arg!r}")
    return config


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or key not in ("train", "eval", "epochs", "steps", "model"):
        raise ValueError(f"configs/alter.py:released takes train=, eval=, epochs=, steps=, "
                         f"model= options; got {text!r}")
    return key, value


def _tiny(config) -> None:
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


def _released(config, options: dict) -> None:
    model = options.get("model", "t5-base")
    if model not in RELEASED:
        raise ValueError(f"configs/alter.py:released model= must be one of {sorted(RELEASED)}; "
                         f"got {model!r}")
    lr, batch, epochs = RELEASED[model]
    config.init_from = model
    config.model.remat = model == "t5-large"  # activation memory; the numbers are the same
    # Adam (no weight decay), constant learning rate, no clipping: the stage defaults.
    config.stage1.learning_rate = config.stage2.learning_rate = lr
    config.train.batch_size = batch
    config.data.train_path = options.get("train", "")
    config.data.eval_path = options.get("eval", "")

    d = config.data
    d.train_decoder_start = "<e>"  # train.py: decoder inputs [<e>, t1, ...]; generate starts at pad
    d.max_source_length = 512  # train.py: source_max_len, EOS included
    d.eval_max_source_length = 768  # predict.py / forward_val.py: max_length=768
    d.max_target_length = 63  # train.py: max_length = 64 - 1, so labels are 62 tokens + EOS
    e = config.eval
    e.max_decode_length = 127  # generate(max_length=128) counts the start token
    e.decode, e.beam_size, e.length_penalty = "beam", 4, 0.6
    e.pool_anaphora = True  # script/eval.py scores anaphora_resolution inside classify

    t = config.mta  # stage two as MTA_sharemoe4 (the released stage-two classes were never trained)
    t.stage2_selection, t.top_k, t.renormalize = "own", 2, False
    t.num_shared_adapters, t.gate_hidden_dim, t.gate_bias = 3, 0, False

    if "steps" in options:
        steps = int(options["steps"])
    elif d.train_path:
        steps = int(options.get("epochs", epochs)) * math.ceil(_lines(d.train_path) / batch)
    else:
        raise ValueError("configs/alter.py:released needs train=<file> (its line count sets the "
                         "steps) or steps=<N>")
    config.stage1.num_train_steps = config.stage2.num_train_steps = steps


def _lines(path: str) -> int:
    """Examples in a JSON-lines file: its non-blank lines."""
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise ValueError(f"configs/alter.py:released train={path}: {e.strerror}") from None
