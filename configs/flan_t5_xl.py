"""Flan-T5-XL (2.85B parameters, T5 v1.1 XL shapes) on the tfds mixture of t5_base.py.

MTA in block 11 of each stack, as the T5-large recipe. Even split over a whole slice the
parameters and Adam moments take 16 bytes each, so the recommended mesh is fsdp across the
slice with rematerialised blocks (README, "Compile for a TPU slice"). Compiled for a v5e-8 at
batch 64 (512/64 tokens), stage one needs 16.3 GiB a chip, just over a v5e's 16; with
--config.train.grad_accum_steps=2 (the compile's own suggestion) 15.17 GiB, which fits with
little headroom; stage two needs 9.10 GiB (--config.mesh.tensor=2 fits both stages without
accumulation, stage one with 0.18 GiB to spare). On a v4-8 (32 GiB) both stages fit at batch
32. On a v5e-32 (batch 256) run stage one under --config.mesh.fsdp=8 --config.mesh.tensor=4
(12.97 GiB; fsdp=32 with grad_accum_steps=2 needs 15.29 GiB, its roofline bound 10% shorter),
then stage two on its own, shortest under data=4 x fsdp=8 (190 ms against 352 and 1.19 s for
the other two, roofline bounds): --config.stages="('stage2',)" --config.mesh.data=-1
--config.mesh.fsdp=8 --config.mesh.tensor=1 (a checkpoint restores under another mesh).
"""
from configs import t5_base


def get_config():
    config = t5_base.get_config()
    config.init_from = "google/flan-t5-xl"
    config.model.remat = True
    config.mesh.data, config.mesh.fsdp = 1, -1
    return config
