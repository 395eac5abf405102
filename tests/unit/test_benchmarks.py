"""Benchmarks: the FLOP formula against a hand count, top-k "gather" == "dense", and the
harness end to end on a micro model (results.json has every row)."""
import json
import math
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import flops as F
from benchmarks.workloads import random_params
from mta_jax import decoding
from mta_jax.errors import ConfigError
from mta_jax.models import mta as M
from mta_jax.models.t5 import T5, T5Config
from tests.helpers import TORCH_REASON

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# d_model 8, 2 heads of 4 (inner 8), d_ff 16, vocab 10, one block per stack, ReLU FFN.
HAND = T5Config(vocab_size=10, d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1,
                feed_forward_proj="relu")
B, S, T = 2, 4, 3  # batch, source length, target length


def test_flops_match_a_hand_count():
    # Encoder block, B*S = 8 tokens:
    #   q, k, v, o projections   4 * 2*8*8*8          = 4096
    #   scores q k^T, weights v  2 * 2*B*h*S*S*k = 2 * 2*2*2*4*4*4 = 1024
    #   FFN wi, wo               2 * 2*8*8*16         = 4096       -> 9216
    # Decoder block, B*T = 6 tokens:
    #   self q, k, v, o          4 * 2*6*8*8          = 3072
    #   self scores, values      2 * 2*2*2*3*3*4      = 576
    #   cross q, o (target)      2 * 2*6*8*8          = 1536
    #   cross k, v (8 source)    2 * 2*8*8*8          = 2048
    #   cross scores, values     2 * 2*2*2*3*4*4      = 768
    #   FFN                      2 * 2*6*8*16         = 3072       -> 11072
    # LM head                    2*6*8*10             = 960
    forward = 9216 + 11072 + 960
    assert F.forward_flops(HAND, B, S, T) == forward == 21248
    assert F.train_flops(HAND, B, S, T) == 3 * forward
    assert F.model_flops_per_step(HAND, B, S, T) == 3 * forward

    # Stage one, 5 FFN adapters in each stack's block: 4 more FFNs per block.
    mta = HAND.replace(ffn_plug=M.MTAConfig(encoder_layers="last", decoder_layers="last"))
    assert F.forward_flops(mta, B, S, T) == forward + 4 * 4096 + 4 * 3072 == 49920
    assert F.model_flops_per_step(mta, B, S, T) == 3 * 49920

    # Bottleneck adapters (width 6) beside the FFN: 5 * 2 * 2*tokens*8*6 per block.
    bottleneck = HAND.replace(ffn_plug=M.MTAConfig(
        adapter_kind="bottleneck", adapter_dim=6, encoder_layers="last", decoder_layers="last"))
    assert F.forward_flops(bottleneck, B, S, T) == forward + 5 * 192 * 8 + 5 * 192 * 6 == 34688
    assert F.model_flops_per_step(bottleneck, B, S, T) == 3 * 34688

    # Stage two, gathered top-2 + 1 shared adapter: 3 FFNs per block, plus the gate
    # (2 outputs of width 8 at the first position -> 4 hidden -> 2):
    #   2*B*16*4 + 2*B*4*2 = 256 + 32 = 288 per block.
    two = HAND.replace(ffn_plug=M.MTAConfig(
        encoder_layers="last", decoder_layers="last", top_k=2, num_shared_adapters=1,
        gate_hidden_dim=4, topk_compute="gather"))
    assert F.forward_flops(two, B, S, T) == forward + 2 * 4096 + 2 * 3072 + 2 * 288 == 36160
    assert F.model_flops_per_step(two, B, S, T) == 3 * 36160
    # The dense form computes all 5 task adapters (+ the shared one).
    dense_two = two.replace(ffn_plug=M.MTAConfig(
        encoder_layers="last", decoder_layers="last", top_k=2, num_shared_adapters=1,
        gate_hidden_dim=4))
    assert F.forward_flops(dense_two, B, S, T) == forward + 5 * 4096 + 5 * 3072 + 2 * 288


def test_frozen_backbone_backward_matches_a_hand_count():
    # Stage two of the hand model (gathered top-2 + 1 shared adapter, gate 16 -> 4 -> 2):
    # only the MTA blocks train. Backward products needed:
    # Encoder: attention below the MTA block carries no gradient                  0
    #   adapters' wi (3 of them) read the block's input: weight gradients only
    #   3 * 2*8*8*16 = 6144; wo: weights' and the hidden's gradients 2 * 6144 = 12288
    #   gate: both products of its 288                                             576 -> 19008
    # Decoder: self-attention (input: the frozen embeddings)                       0
    #   cross k, v on the 8 source tokens (the encoder output carries)  2 * 2*8*8*8 = 2048
    #   q k^T for the keys only, weights @ v for weights and values:
    #   3 * 2*B*h*T*S*k = 3 * 384 = 1152; o's input  2*6*8*8 = 768                 -> 3968
    #   adapters: every product both gradients  2 * 3 * (1536 + 1536) = 18432, gate 576
    #                                                                              -> 19008
    # LM head: the decoder output's gradient  2*6*8*10 = 960
    two = HAND.replace(ffn_plug=M.MTAConfig(
        encoder_layers="last", decoder_layers="last", top_k=2, num_shared_adapters=1,
        gate_hidden_dim=4, topk_compute="gather"))
    backward = 19008 + 3968 + 19008 + 960
    assert F.frozen_backbone_backward_flops(two, B, S, T) == backward == 42944
    assert F.train_flops(two, B, S, T, frozen_backbone=True) == 36160 + backward
    assert F.frozen_backbone_backward_flops(HAND, B, S, T) == 0  # nothing trains


def test_tpu_table_meshes_and_grid():
    from benchmarks import tpu_compile as TC
    flags = lambda mesh, tensor: [f.split("=")[1] for f in TC.mesh_flags(mesh, tensor)]
    assert flags("data", 2) == ["-1", "1", "1"] and flags("fsdp", 2) == ["1", "-1", "1"]
    assert flags("fsdp_tensor", 4) == ["1", "-1", "4"] and flags("data_fsdp", 4) == ["-1", "8", "1"]
    # data x fsdp=8 only where a slice has more than 8 chips; the default grid leaves it out.
    assert TC.grid(["v5e-8", "v4-8", "v5e-32"], ["base"], ["data_fsdp"], ["stage1"]) == [
        ("v5e-32", "base", "data_fsdp", "stage1")]
    assert len(TC.grid(list(TC.SLICES), list(TC.MODELS), TC.GRID_MESHES, TC.STAGES)) == 72
    # A cell over the chip's HBM by less than 0.05 GiB keeps two decimals; a second is a second.
    def cell(total_gib, fits, step_s=0.5):
        return {"hbm_bytes": 16 * TC.GiB, "steps": [{
            "fits": fits, "memory": {"total": total_gib * TC.GiB}, "cost": {"hbm_bytes": 1},
            "roofline": {"step_s": step_s, "bound": "hbm", "mfu": 0.5}}]}
    assert TC._cell_text(cell(16.04, False)) == "**does not fit**: 16.04 GiB (compiled)"
    assert TC._cell_text(cell(34.72, False)) == "**does not fit**: 34.7 GiB (compiled)"
    assert TC._cell_text(cell(15.93, True, 1.1907)) == "15.93 GiB, 1.19 s (HBM), 50%"
    assert TC._cell_text(cell(9.1, True, 0.2374)) == "9.10 GiB, 237 ms (HBM), 50%"


def test_mfu_uses_the_formula_and_the_device_peak():
    from benchmarks import gpu
    assert F.peak_flops_per_second("NVIDIA H100 80GB HBM3") == 989e12
    assert F.peak_flops_per_second("NVIDIA H100 PCIe") == 756e12
    assert F.peak_flops_per_second("cpu") is None
    assert F.peak_flops_per_second("TPU v5 lite") == F.TPU_CHIPS["v5e"].peak_bf16 == 197e12
    # 63744 model FLOPs (the hand count above) in 1 us on a 100 GFLOP/s device: 63.744%.
    assert gpu.mfu(F.model_flops_per_step(HAND, B, S, T), 1e-6, 100e9) == pytest.approx(0.63744)
    assert gpu.mfu(63744, 1e-6, None) is None


@pytest.mark.slow  # trains two steps of each model, profiled
def test_gpu_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu.py end to end at the micro size: both rows, the formula's FLOPs, no MFU
    on a device without a known peak."""
    from benchmarks import gpu
    from benchmarks import workloads as W
    out = tmp_path / "gpu.json"
    result = gpu.main(["--size", "micro", "--batch", "2", "--source", "8", "--target", "4",
                       "--steps", "2", "--dtype", "float32", "--out", str(out), "--profile"])
    assert json.loads(out.read_text())["rows"][1]["name"] == "mta"
    assert [r["name"] for r in result["rows"]] == ["dense", "mta"]
    for row, plug in zip(result["rows"], (None, W.stage_one_plug())):
        config = W.t5_config("micro", plug, dtype="float32")
        assert row["model_flops"] == F.model_flops_per_step(config, 2, 8, 4)
        assert row["mfu"] is None and row["pass"] is None and math.isfinite(row["loss"])
        kinds = row["profile_top"]  # (kernel kind, seconds per step, share), largest first
        assert kinds and all(sec >= 0 for _, sec, _ in kinds)
        assert [sec for _, sec, _ in kinds] == sorted((sec for _, sec, _ in kinds), reverse=True)
    assert result["rows"][1]["model_flops"] > result["rows"][0]["model_flops"]


TINY = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                dropout_rate=0.0)


def _stage_two(compute, **changes):
    plug = M.MTAConfig(encoder_layers="all", decoder_layers=(-1,), top_k=2,
                       num_shared_adapters=1, gate_hidden_dim=8, topk_compute=compute, **changes)
    return plug


def _random(model, seed):
    params = flax.core.unfreeze(random_params(model, seed))
    for stack in ("encoder", "decoder"):
        for layer in params[stack].values():
            if "mta" in layer.get("ffn", {}):
                selector = layer["ffn"]["mta"]["selector"]
                selector["logits"] = jnp.asarray(np.random.default_rng(seed).normal(
                    size=selector["logits"].shape), jnp.float32)
    return params


@pytest.mark.parametrize("ffp,kind,renormalize", [
    ("relu", "ffn", False), ("gated-gelu", "ffn", True), ("relu", "bottleneck", False)])
@pytest.mark.slow  # over 3 s on 2 cores
def test_topk_gather_equals_dense(ffp, kind, renormalize):
    config = TINY.replace(feed_forward_proj=ffp)
    dense = T5(config.replace(ffn_plug=_stage_two("dense", adapter_kind=kind, adapter_dim=6,
                                                  renormalize=renormalize)))
    gather = T5(config.replace(ffn_plug=_stage_two("gather", adapter_kind=kind, adapter_dim=6,
                                                   renormalize=renormalize)))
    # Random weights everywhere (bottleneck up-projections too, zero at init) and random
    # selector logits, so that the kept pairs differ between task types.
    params = _random(dense, 0)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        _random(gather, 0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, 64, (5, 7)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, 64, (5, 4)), jnp.int32)
    task_ids = jnp.arange(5, dtype=jnp.int32)

    def loss(model, p):
        logits = model.apply({"params": p}, ids, dec, task_ids=task_ids)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3]), logits

    grad = lambda model: jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))
    (_, logits_d), g_d = grad(dense)(params)
    (_, logits_g), g_g = grad(gather)(params)
    np.testing.assert_allclose(logits_g, logits_d, atol=1e-5, rtol=1e-5)
    # Gradients too: the gathered matrices' gradients scatter back to the k kept adapters,
    # and the unkept adapters get exactly zero, as in the dense form.
    leaves = zip(jax.tree_util.tree_leaves_with_path(g_g), jax.tree_util.tree_leaves(g_d))
    for (path, a), b in leaves:
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # over 3 s on 2 cores
def test_topk_gather_decodes_like_dense():
    dense = T5(TINY.replace(ffn_plug=_stage_two("dense")))
    gather = T5(TINY.replace(ffn_plug=_stage_two("gather")))
    params = _random(dense, 1)
    ids = jnp.asarray(np.random.default_rng(1).integers(2, 64, (3, 6)), jnp.int32)
    task_ids = jnp.asarray([0, 3, 4], jnp.int32)
    a = decoding.greedy_decode(dense, params, ids, task_ids=task_ids, max_length=5)
    b = decoding.greedy_decode(gather, params, ids, task_ids=task_ids, max_length=5)
    np.testing.assert_array_equal(a, b)


def test_topk_compute_is_validated():
    with pytest.raises(ConfigError, match=r"mta\.topk_compute must be 'dense' or 'gather'"):
        M.MTAConfig(topk_compute="sparse")


EXPECTED_ROWS = [
    "mta_over_dense_step_time", "mta_over_dense_train_flops", "mta_overhead_over_flops",
    "mta_over_dense_step_time_bottleneck", "mta_overhead_over_flops_bottleneck",
    "mta_over_dense_step_time_all_layers", "mta_overhead_over_flops_all_layers",
    "mta_over_dense_peak_memory", "jax_speedup_vs_torch_dense_step",
    "jax_speedup_vs_torch_mta_step", "jax_speedup_vs_torch_mta_loop_step",
    "torch_mta_parity_max_abs_logit_diff", "stage2_over_stage1_step_time",
    "stage2_opt_state_bytes_over_2x_trainable_param_bytes",
    "stage2_topk_gather_over_dense_step_time", "decode_speedup_vs_hf_generate",
    "decode_token_agreement", "step_time_adapters_5", "step_time_source_16",
]


@pytest.mark.slow
def test_harness_writes_every_row(tmp_path):
    pytest.importorskip("torch", reason=TORCH_REASON)  # the PyTorch rows
    out = tmp_path / "results.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--micro", "--out", str(out)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| metric | value | target | pass/miss | shape |" in proc.stdout
    results = json.loads(out.read_text())
    rows = results["metrics"]["micro"]
    assert [k for k in EXPECTED_ROWS if k not in rows] == []
    for name, row in rows.items():
        assert math.isfinite(row["value"]), name
        assert set(row) >= {"value", "target", "pass", "shape"}
    # The same weights on both sides: PyTorch's MTA computes what ours does.
    assert rows["torch_mta_parity_max_abs_logit_diff"]["value"] < 1e-4
    assert rows["decode_token_agreement"]["value"] == 1.0
    # Adam holds two moments per trainable leaf and nothing for the frozen backbone.
    assert rows["stage2_opt_state_bytes_over_2x_trainable_param_bytes"]["pass"] is True
    meta = results["meta"]
    assert meta["threads"]["xla"] == meta["threads"]["torch"]
    assert meta["shapes"]["micro"] == {"batch": 2, "source": 16, "target": 8, "adapters": [5],
                                       "sources": [16]}
    assert set(results["timings_s"]["micro"]["pool_a"]) >= {"dense", "mta", "torch_dense"}
