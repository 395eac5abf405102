"""Every field of an mta-jax run, with its default. Other configs import this and change a few.

The defaults follow the authors' released recipe (docs/method.md): T5-base, 5 full-FFN adapters
in block 11 of each stack, Softmax-T with T = 0.1, biased initialisation 0.20/0.22, Adam 1e-4,
batch 4, source/target lengths 512/64, seed 42, top-2 and one shared adapter in stage two,
beam 4 / length penalty 0.6 for decoding. Where the released code does something else (its
stage-two gate and selection, the `<e>` decoder start in training, its length cuts, anaphora
scored as classify), docs/method.md says why; `configs/alter.py:released` reproduces it.
"""
import ml_collections

from mta_jax.data.config import get_data_config
from mta_jax.sharding import default_mesh_config
from mta_jax.task_types import TASK_TYPES


def stage_config(num_train_steps: int, learning_rate: float, trainable: str):
    s = ml_collections.ConfigDict()
    s.num_train_steps = num_train_steps  # optimizer steps in this stage
    s.learning_rate = learning_rate  # peak learning rate
    s.optimizer = "adamw"  # "adamw" | "adafactor"
    s.schedule = "constant"  # "constant" | "linear" | "cosine" | "rsqrt" (after warm-up)
    s.warmup_steps = 0  # linear warm-up from 0, in steps
    s.weight_decay = 0.0  # decoupled weight decay (AdamW); 0 = Adam, as released
    s.b1 = 0.9  # Adam beta1
    s.b2 = 0.999  # Adam beta2
    s.eps = 1e-8  # Adam epsilon
    s.grad_clip_norm = 0.0  # clip gradients to this global norm (0 = no clipping)
    s.trainable = trainable  # regex on parameter paths: matching leaves train, the rest freeze
    s.init_checkpoint = ""  # stage two: stage-one checkpoint folder ("" = <workdir>/stage1/checkpoints)
    return s


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 42  # parameter init, dropout and data order
    config.stages = ("stage1", "stage2")  # stages to run, in order
    # FFN variant: mta | mta_stage1 | dense | shared_adapter | switch_moe | task_moe
    config.variant = "mta"
    config.init_from = "t5-base"  # Hugging Face folder or hub name; "" = random init from config.model

    m = config.model = ml_collections.ConfigDict()  # used when init_from is "" (random init)
    m.vocab_size = 0  # 0 = the tokenizer's size rounded up to a multiple of 128
    m.d_model = 768  # hidden width
    m.d_kv = 64  # width of one attention head
    m.d_ff = 3072  # FFN width
    m.num_layers = 12  # encoder blocks
    m.num_decoder_layers = 0  # decoder blocks (0 = num_layers)
    m.num_heads = 12  # attention heads
    m.feed_forward_proj = "relu"  # "relu" (T5 v1.0) | "gated-gelu" (v1.1, Flan)
    m.tie_word_embeddings = True  # LM head = shared embedding, output scaled by d_model**-0.5
    m.relative_attention_num_buckets = 32  # relative-position buckets
    m.relative_attention_max_distance = 128  # positions beyond share the last bucket
    m.dropout_rate = 0.1  # dropout everywhere T5 applies it (also overrides init_from's)
    m.dtype = "float32"  # computation dtype: "float32" | "bfloat16"
    m.param_dtype = "float32"  # parameter storage dtype
    m.remat = False  # rematerialise each block in the backward pass (memory for compute)

    t = config.mta = ml_collections.ConfigDict()
    t.enabled = True  # False: plain T5 multi-task fine-tuning (the dense baseline)
    t.num_adapters = 5  # parallel task adapters E
    t.adapter_kind = "ffn"  # "ffn": FFN copies replace the FFN | "bottleneck": added beside it
    t.adapter_dim = 384  # bottleneck width (adapter_kind = "bottleneck")
    t.encoder_layers = "11"  # encoder blocks with MTA: "all" | "last" | "none" | "11" | "3,7,-1"
    t.decoder_layers = "11"  # decoder blocks with MTA, same syntax
    t.selector = "task"  # "task": logit table by task type | "start_token": reads a [START] token
    t.temperature = 0.1  # Softmax-T temperature
    t.init_base = 0.20  # selector logits start at init_base ...
    t.init_bias = 0.02  # ... plus init_bias for a task's own adapters {t, t+1} mod E
    t.top_k = 2  # stage two: adapters kept per example (stage one keeps all)
    t.renormalize = False  # stage two: renormalise the kept top-k weights (released: no)
    t.stage2_selection = "top_k"  # stage two: keep the "top_k" largest | "own": task t's {t, t+1}
    # stage two: "dense" runs every adapter, unkept weights zero | "gather": only the k kept
    t.topk_compute = "dense"
    t.num_shared_adapters = 1  # stage two: adapters shared by every task, mixed by the gate
    t.gate_hidden_dim = 128  # stage two: hidden width of the gate network (0 = d_model, released)
    t.gate_bias = True  # stage two: biases in the gate's two layers (released: none)
    t.task_types = TASK_TYPES  # selector rows / task ids, in this order (mta_jax/task_types.py)
    t.selector_loss_weight = 0.0  # start_token: weight of the task-type loss on the selector

    # Baseline variants (models/variants.py); they sit in the mta.*_layers blocks.
    o = config.moe = ml_collections.ConfigDict()
    o.num_experts = 5  # switch_moe: FFN experts per MoE block (task_moe: one per mta.task_types)
    o.capacity_factor = 1.25  # switch_moe: expert slots = ceil(factor * sequence tokens / experts), training
    o.eval_capacity_factor = 2.0  # switch_moe: the same factor at evaluation (deterministic)
    o.load_balance_weight = 0.01  # switch_moe: weight of the load-balancing loss (1.0 when balanced)
    o.z_loss_weight = 0.001  # switch_moe: weight of the router z-loss (mean squared logsumexp)
    o.router_init_std = 0.02  # switch_moe: std of the router kernel's normal initialisation
    o.adapter_dim = 384  # shared_adapter: bottleneck width of the one shared adapter

    config.stage1 = stage_config(num_train_steps=10000, learning_rate=1e-4, trainable=".*")
    config.stage2 = stage_config(num_train_steps=5000, learning_rate=1e-4, trainable="mta")

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 4  # global batch, examples per optimizer step
    config.train.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)
    # Dropout keys: "threefry2x32" (the same masks on every platform) | "rbg" | "unsafe_rbg"
    # (XLA's RngBitGenerator: on TPU far cheaper to compile and run; README "Compile for TPU")
    config.train.rng_impl = "threefry2x32"
    # Resume with a data iterator started over (e.g. after changing the batch size or host count)
    config.train.reset_data_iterator = False

    e = config.eval = ml_collections.ConfigDict()
    e.batch_size = 16  # examples per decoding batch
    e.decode = "beam"  # "beam" | "greedy"
    e.beam_size = 4  # beams (decode = "beam")
    e.max_decode_length = 128  # generated tokens, EOS included (not the start token, as HF counts)
    e.length_penalty = 0.6  # beam score = log-prob / length**length_penalty
    e.pool_anaphora = False  # score anaphora_resolution inside classify, as the released eval.py

    config.checkpoint_every_steps = 1000  # save params, optimizer and data state every N steps
    config.keep_checkpoints = 3  # latest checkpoints kept per stage (plus the best by eval/score)
    config.eval_every_steps = 1000  # decode and score the eval set every N steps (and at the end)
    config.log_every_steps = 50  # write metrics.jsonl / TensorBoard rows every N steps
    config.progress_bar = True  # a progress bar with throughput and ETA on stderr

    config.data = get_data_config()  # fields documented in mta_jax/data/config.py
    config.data.source = "jsonl"
    config.data.tokenizer = ""  # "" = the tokenizer saved with init_from
    config.data.max_source_length = 512
    config.data.max_target_length = 64
    config.mesh = default_mesh_config()  # fields documented in mta_jax/sharding.py
    return config
