"""Bytes of an adapter artifact against the training checkpoints it comes from, from shapes alone.

    python -m benchmarks.artifact_sizes

For configs/demo.py and for configs/default.py (T5-base, MTA in block 11 of each stack, the
released recipe): each stage's checkpoint (parameters + optimizer state, as the stage's
optimizer and freezing labels make it) and the artifact's tensors (the MTA parameters of
stage two), from `jax.eval_shape`; nothing is allocated. The artifact adds a safetensors
header and mta_config.json of a few KiB; `--full`'s backbone is the plain T5's parameters.
"""
from __future__ import annotations

import jax

from mta_jax import build, hf, optim
from mta_jax.models import t5 as t5_lib

# The models' vocabularies: the byte tokenizer's 384 ids (a multiple of 128), T5's 32128.
RUNS = {"demo (configs/demo.py)": ("demo", 384), "T5-base, MTA in block 11": ("default", 32128)}


def stage_bytes(config, stage: str, vocab_size: int) -> dict[str, int]:
    """Bytes of one stage's params, opt_state, MTA leaves, and of the plain T5 (the backbone)."""
    config.model.vocab_size = vocab_size
    model = t5_lib.T5(build.model_config(config, build.ffn_plug(config, stage), vocab_size, None))
    params = hf.abstract_params(model)
    stage_cfg = config[stage]
    labels = optim.param_labels(params, stage_cfg.trainable)
    tx, _ = optim.make_optimizer(stage_cfg, stage_cfg.num_train_steps, labels)
    mta = {k: v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
           if "mta" in jax.tree_util.keystr(k)}
    plain = t5_lib.T5(model.config.replace(ffn_plug=None))
    return {"params": optim.tree_bytes(params),
            "opt_state": optim.tree_bytes(jax.eval_shape(tx.init, params)),
            "mta": optim.tree_bytes(list(mta.values())),
            "backbone": optim.tree_bytes(hf.abstract_params(plain))}


def main() -> None:
    import importlib

    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    print("| model | stage-one checkpoint | stage-two checkpoint | artifact tensors | "
          "artifact / stage-two checkpoint | `--full` backbone |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, (name, vocab) in RUNS.items():
        config = importlib.import_module(f"configs.{name}").get_config()
        one, two = (stage_bytes(config, s, vocab) for s in build.STAGES)
        ckpt = {s: b["params"] + b["opt_state"] for s, b in (("stage1", one), ("stage2", two))}
        print(f"| {label} | {mib(ckpt['stage1'])} ({mib(one['params'])} params) | "
              f"{mib(ckpt['stage2'])} ({mib(two['params'])} params) | {mib(two['mta'])} | "
              f"{two['mta'] / ckpt['stage2']:.3f} | {mib(two['backbone'])} |")


if __name__ == "__main__":
    main()
