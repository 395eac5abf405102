"""A shrunk demo config shared by the training tests: seconds per stage on 2 CPU cores."""
import os
import subprocess
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OVERRIDES = {
    "model.d_model": 32, "model.d_kv": 8, "model.d_ff": 64, "model.num_heads": 4,
    "model.num_layers": 1, "model.num_decoder_layers": 1, "model.dropout_rate": 0.1,
    "mta.gate_hidden_dim": 16,
    "data.synthetic_train_size": 400, "data.synthetic_eval_size": 40,
    "data.max_source_length": 32, "data.max_target_length": 12, "data.eval_max_examples": 3,
    "stage1.num_train_steps": 12, "stage2.num_train_steps": 6,
    "stage1.learning_rate": 3e-3, "stage2.learning_rate": 3e-3,
    "train.batch_size": 8, "eval.batch_size": 12, "eval.max_decode_length": 8,
    "checkpoint_every_steps": 4, "eval_every_steps": 6, "log_every_steps": 2,
    "progress_bar": False,
}


def tiny_config(**changes) -> ml_collections.ConfigDict:
    """configs/demo.py with OVERRIDES and `changes` ('a.b' keys) applied, as in-process."""
    sys.path.insert(0, ROOT)
    from configs import demo
    config = demo.get_config()
    for key, value in {**OVERRIDES, **changes}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def cli_args(workdir, **changes) -> list[str]:
    """The same config as command-line flags of `python -m mta_jax.main`."""
    args = [sys.executable, "-m", "mta_jax.main", "--config=configs/demo.py", f"--workdir={workdir}"]
    for key, value in {**OVERRIDES, **changes}.items():
        args.append(f"--config.{key}={value}")
    return args


# Unoptimised XLA CPU code for the runs the tests start: the demo-shaped run compiled and ran
# in 29.8 s against 63.4 s with the default flags (cold cache, 2 cores), with the same scores.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=FAST_XLA_FLAGS)


def run_main(workdir, timeout=600, **changes) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(workdir, **changes), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)
