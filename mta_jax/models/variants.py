"""Which FFN plug a run uses: the MTA block, or one of the baselines it is compared with.

`config.variant` picks one; each variant is a small module beside mta.py implementing the
FfnPlug protocol of models.t5 (name, replaces_dense, applies_to, make).
"""
from __future__ import annotations

from typing import Optional


def ffn_plug(config, stage: str) -> Optional[object]:
    """The FfnPlug for `stage` of this config (None: the plain dense T5)."""
    from mta_jax import train  # the config -> MTAConfig translation lives with the driver

    if not config.mta.enabled:
        return None
    return train.mta_config(config, stage)
