"""Which FFN plug a run uses: the MTA block, or one of the baselines it is compared with.

`config.variant` picks one; each variant other than dense is a small module beside mta.py
implementing the FfnPlug protocol of models.t5 (name, replaces_dense, applies_to, make), all
placed in the MTA blocks (`config.mta.encoder_layers` / `decoder_layers`):

    dense           plain T5 multi-task fine-tuning (no plug)
    shared_adapter  one bottleneck adapter shared by all tasks, added to the FFN  (adapters.py)
    switch_moe      Switch top-1 token routing over FFN experts, replacing the FFN (moe.py)
    task_moe        one FFN expert per task type, hard routing by task id          (moe.py)
    mta_stage1      MTA stage one only
    mta             MTA, both stages (the only variant with a stage two)
"""
from __future__ import annotations

from typing import Optional

VARIANTS = ("dense", "shared_adapter", "switch_moe", "task_moe", "mta_stage1", "mta")


def variant_of(config) -> str:
    variant = config.get("variant", "mta")
    if variant not in VARIANTS:
        from mta_jax import train
        raise train.ConfigError(f"config.variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    return variant


def stages_for(variant: str) -> tuple[str, ...]:
    """The stages a variant trains: only `mta` has a stage two."""
    return ("stage1", "stage2") if variant == "mta" else ("stage1",)


def ffn_plug(config, stage: str) -> Optional[object]:
    """The FfnPlug for `stage` of this config (None: the plain dense T5)."""
    from mta_jax import train  # the config -> MTAConfig translation lives with the driver
    from mta_jax.models import adapters, moe

    variant = variant_of(config)
    if variant == "mta":
        if not config.mta.enabled:
            return None
        return train.mta_config(config, stage)
    if "stage2" in tuple(config.stages) or stage != "stage1":
        raise train.ConfigError(
            f"config.stages must be ('stage1',) for config.variant={variant!r} (only 'mta' has a "
            f"stage two); got {tuple(config.stages)!r}")
    if variant == "mta_stage1":
        return train.mta_config(config, stage) if config.mta.enabled else None
    if variant == "dense":
        return None
    t, o = config.mta, config.moe
    placement = dict(encoder_layers=train._layers(t.encoder_layers),
                     decoder_layers=train._layers(t.decoder_layers),
                     task_types=tuple(t.task_types))
    if variant == "shared_adapter":
        return adapters.SharedAdapterConfig(adapter_dim=o.adapter_dim, **placement)
    if variant == "switch_moe":
        return moe.SwitchConfig(
            num_experts=o.num_experts, capacity_factor=o.capacity_factor,
            eval_capacity_factor=o.eval_capacity_factor,
            load_balance_weight=o.load_balance_weight, z_loss_weight=o.z_loss_weight,
            router_init_std=o.router_init_std, **placement)
    assert variant == "task_moe", variant
    return moe.TaskMoEConfig(**placement)


def configure(config, variant: str, total_steps: Optional[int] = None):
    """A copy of `config` set up for `variant` with `total_steps` optimizer steps in all.

    MTA splits the steps between its stages in the config's stage1 : stage2 ratio; the other
    variants spend them all in stage one. None: the config's stage1 + stage2 steps (MTA's total),
    so every variant sees the same number of batches.
    """
    from mta_jax import train
    if variant not in VARIANTS:
        raise train.ConfigError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    s1, s2 = config.stage1.num_train_steps, config.stage2.num_train_steps
    total = s1 + s2 if total_steps is None else int(total_steps)
    if total < (2 if variant == "mta" else 1):
        raise train.ConfigError(f"total steps must be >= 2 for 'mta' (one per stage), else >= 1; "
                                f"got {total}")
    out = config.copy_and_resolve_references()
    out.variant = variant
    out.stages = stages_for(variant)
    if variant == "mta":
        first = min(max(1, round(total * s1 / (s1 + s2))), total - 1)
        out.stage1.num_train_steps, out.stage2.num_train_steps = first, total - first
    else:
        out.stage1.num_train_steps = total
    return out
