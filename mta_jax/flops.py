"""Analytic FLOPs of a T5 encoder-decoder step, with or without MTA blocks.

Only matrix products count (2 FLOPs per multiply-add); norms, softmax, activations and the
optimizer are left out, as model-FLOPs-utilisation conventions do. A training step costs
3 x the forward pass (the backward pass computes two products per forward product: one for
the activations' gradient, one for the weights'). Shapes:

    B batch, S source length, T target length, d d_model, h heads, k d_kv (inner = h * k),
    f d_ff, V vocabulary, E adapters, a bottleneck width.

Per encoder block:  attention projections 4 * 2BSd*inner, scores + values 2 * 2BhS^2k,
                    FFN 2BSdf * (2, or 3 when gated).
Per decoder block:  the same on T, plus cross-attention: q, o on T (2 * 2BTd*inner), k, v on
                    the encoder's S tokens (2 * 2BSd*inner), scores + values 2 * 2BhTSk.
LM head:            2BTdV.
An MTA block replaces (`ffn` adapters) or joins (`bottleneck`) the FFN with the adapters it
computes: all E in stage one, the k kept ones with `topk_compute="gather"`, plus the shared
adapters and the gate network (read at the first position) in stage two.

Stage two trains the MTA blocks only: `train_flops(..., frozen_backbone=True)` counts the
backward products that still have a gradient to carry (`frozen_backbone_backward_flops`).

`model_flops_per_step` says the same with parameter counts (6 x parameters x tokens), the
form MFU is usually quoted in; the unit test checks both against a count written out by hand.
`TPU_CHIPS` holds the published per-chip figures (HBM, bf16 peak, HBM and ICI bandwidth) that
`mta_jax.compile` sets a compiled step against; `peak_flops_per_second` reads TPUs from it.
"""
from __future__ import annotations

import dataclasses


def _ffn(tokens: int, d: int, f: int, gated: bool) -> int:
    """Forward FLOPs of one dense FFN on `tokens` rows."""
    return 2 * tokens * d * f * (3 if gated else 2)


def _attention(q_tokens: int, kv_tokens: int, q_len: int, kv_len: int, batch: int, d: int,
               h: int, k: int) -> tuple[int, int]:
    """(projection FLOPs, score + value FLOPs) of one attention sub-layer."""
    inner = h * k
    proj = 2 * 2 * q_tokens * d * inner + 2 * 2 * kv_tokens * d * inner  # q, o | k, v
    core = 2 * 2 * batch * h * q_len * kv_len * k  # q k^T and weights @ v
    return proj, core


def _computed_adapters(plug) -> int:
    """Adapters an MTA block computes per token: all E, or the k kept ones when gathered."""
    gathered = plug.top_k is not None and getattr(plug, "topk_compute", "dense") == "gather"
    return (plug.top_k if gathered else plug.num_adapters) + plug.num_shared_adapters


def _mta_parts(config, tokens: int, batch: int) -> tuple[int, int]:
    """(adapter FLOPs incl. a kept dense FFN, selector + gate FLOPs) of one MTA FFN sub-layer."""
    plug = config.ffn_plug
    d, f, gated = config.d_model, config.d_ff, config.is_gated
    n = _computed_adapters(plug)
    if plug.adapter_kind == "ffn":
        adapters = n * _ffn(tokens, d, f, gated)
    else:  # the pretrained FFN stays; ReLU bottlenecks are added beside it
        adapters = _ffn(tokens, d, f, gated) + n * _ffn(tokens, d, plug.adapter_dim, False)
    extra = 2 * batch * d * plug.num_adapters if plug.selector == "start_token" else 0
    if plug.num_shared_adapters:
        n_out, g = 1 + plug.num_shared_adapters, plug.gate_width(d)
        extra += 2 * batch * (n_out * d) * g + 2 * batch * g * n_out
    return adapters, extra


def forward_flops(config, batch: int, source_length: int, target_length: int,
                  breakdown: bool = False):
    """Forward matmul FLOPs of `models.t5.T5(config)` on [batch, source] -> [batch, target].

    config: a models.t5.T5Config (its ffn_plug None or an mta.MTAConfig).
    """
    c = config
    B, S, T = batch, source_length, target_length
    d, h, k = c.d_model, c.num_heads, c.d_kv
    plug = c.ffn_plug
    parts = {"attention_proj": 0, "attention_core": 0, "cross_kv": 0, "ffn": 0, "lm_head": 0}
    for stack, layers, tokens in (("encoder", c.num_layers, B * S),
                                  ("decoder", c.num_layers_of("decoder"), B * T)):
        for i in range(layers):
            length = S if stack == "encoder" else T
            proj, core = _attention(tokens, tokens, length, length, B, d, h, k)
            parts["attention_proj"] += proj
            parts["attention_core"] += core
            if stack == "decoder":
                inner = h * k
                parts["attention_proj"] += 2 * 2 * B * T * d * inner  # cross q, o
                parts["cross_kv"] += 2 * 2 * B * S * d * inner  # cross k, v on encoder tokens
                parts["attention_core"] += 2 * 2 * B * h * T * S * k
            if plug is not None and i in plug.layer_indices(stack, layers):
                parts["ffn"] += sum(_mta_parts(c, tokens, B))
            else:
                parts["ffn"] += _ffn(tokens, d, c.d_ff, c.is_gated)
    parts["lm_head"] = 2 * B * T * d * c.vocab_size
    total = sum(parts.values())
    return (total, parts) if breakdown else total


def train_flops(config, batch: int, source_length: int, target_length: int,
                frozen_backbone: bool = False) -> int:
    """Training-step FLOPs: forward + backward.

    Every weight trained: 3 x forward. `frozen_backbone`: only the MTA blocks train (stage
    two's `trainable="mta"`), so the backward pass is `frozen_backbone_backward_flops`.
    """
    forward = forward_flops(config, batch, source_length, target_length)
    if not frozen_backbone:
        return 3 * forward
    return forward + frozen_backbone_backward_flops(config, batch, source_length, target_length)


def frozen_backbone_backward_flops(config, batch: int, source_length: int,
                                   target_length: int) -> int:
    """Backward FLOPs when only the MTA blocks' weights train (the backbone frozen).

    A backward product is needed for a trained weight's gradient, or for the gradient of an
    activation that a trained weight influences (the gradient has somewhere to go). Below the
    lowest MTA block of a stack nothing carries a gradient; above it every activation does, so
    a frozen product costs one product (its input's gradient) and attention's scores and
    values two. In an MTA block every adapter product has its weight gradient; the adapters'
    hidden activations carry one; the block's input only when an MTA block lies below it. The
    decoder's cross-attention keys and values carry gradients when the encoder holds an MTA
    block, its queries when the decoder's residual stream does (above a decoder MTA block).
    A test compiles such steps and finds these products in the program to the FLOP.
    """
    c, plug = config, config.ffn_plug
    if plug is None:
        return 0
    B, S, T = batch, source_length, target_length
    d, h, k, f, gated = c.d_model, c.num_heads, c.d_kv, c.d_ff, c.is_gated
    inner = h * k

    def ffn_sublayer(tokens: int, plugged: bool, carries: bool) -> int:
        if not plugged:  # a frozen FFN passes its output's gradient down when that is needed
            return _ffn(tokens, d, f, gated) if carries else 0
        n = _computed_adapters(plug)
        width = f if plug.adapter_kind == "ffn" else plug.adapter_dim
        reads_input = n * 2 * tokens * d * width * (2 if gated and plug.adapter_kind == "ffn" else 1)
        reads_hidden = n * 2 * tokens * width * d
        total = reads_input * (2 if carries else 1) + 2 * reads_hidden
        if plug.adapter_kind != "ffn" and carries:  # the frozen FFN beside the bottlenecks
            total += _ffn(tokens, d, f, gated)
        if plug.selector == "start_token":  # its kernel reads the block's input, first position
            total += 2 * B * d * plug.num_adapters * (2 if carries else 1)
        if plug.num_shared_adapters:  # the gate reads the adapters' outputs: both products
            n_out, g = 1 + plug.num_shared_adapters, plug.gate_width(d)
            total += 2 * (2 * B * (n_out * d) * g + 2 * B * g * n_out)
        return total

    def self_attention(tokens: int, length: int, carries: bool) -> int:
        proj, core = _attention(tokens, tokens, length, length, B, d, h, k)
        return proj + 2 * core if carries else 0

    total, carries = 0, False
    for i in range(c.num_layers):
        total += self_attention(B * S, S, carries)
        plugged = i in plug.layer_indices("encoder", c.num_layers)
        total += ffn_sublayer(B * S, plugged, carries)
        carries = carries or plugged
    encoder_carries, carries = carries, False
    half_core = 2 * B * h * T * S * k  # one of cross-attention's two score/value products
    for i in range(c.num_layers_of("decoder")):
        total += self_attention(B * T, T, carries)
        q_or_o, k_or_v = 2 * B * T * d * inner, 2 * B * S * d * inner
        total += (q_or_o + half_core) * carries  # the queries' gradient: q k^T, projection
        total += (2 * k_or_v + 2 * half_core) * encoder_carries  # the keys' and values'
        total += (q_or_o + half_core) * (carries or encoder_carries)  # o's input, the weights'
        carries = carries or encoder_carries
        plugged = i in plug.layer_indices("decoder", c.num_layers_of("decoder"))
        total += ffn_sublayer(B * T, plugged, carries)
        carries = carries or plugged
    return total + 2 * B * T * d * c.vocab_size * carries  # LM head: the logits' gradient


def matmul_params(config) -> dict[str, int]:
    """Parameters that multiply activations, grouped by the tokens they see.

    encoder: every encoder matrix (attention, FFN / MTA adapters computed);
    decoder_target: decoder matrices applied to target tokens (self-attention, cross q/o, FFN);
    cross_kv: cross-attention k, v (applied to the encoder's tokens); lm_head: d x V.
    Embedding look-ups, norms and relative-position tables multiply nothing and are left out.
    """
    c = config
    d, f, inner = c.d_model, c.d_ff, c.num_heads * c.d_kv
    plug = c.ffn_plug

    def ffn_params(stack, i, layers):
        dense = d * f * (3 if c.is_gated else 2)
        if plug is None or not i in plug.layer_indices(stack, layers):
            return dense
        n = _computed_adapters(plug)
        return n * dense if plug.adapter_kind == "ffn" else dense + n * 2 * d * plug.adapter_dim

    enc = sum(4 * d * inner + ffn_params("encoder", i, c.num_layers) for i in range(c.num_layers))
    dec = sum(4 * d * inner + 2 * d * inner + ffn_params("decoder", i, c.num_layers_of("decoder"))
              for i in range(c.num_layers_of("decoder")))
    return {"encoder": enc, "decoder_target": dec,
            "cross_kv": c.num_layers_of("decoder") * 2 * d * inner, "lm_head": d * c.vocab_size}


def model_flops_per_step(config, batch: int, source_length: int, target_length: int) -> int:
    """Training FLOPs in the parameter form: 6 x encoder params x input tokens + 6 x decoder
    params x target tokens + 6 x cross-attention k/v params x input tokens + 6 x LM head x
    target tokens + 3 x attention scores and values (+ the small stage-two extras)."""
    p = matmul_params(config)
    B, S, T = batch, source_length, target_length
    c = config
    attention = sum(2 * 2 * B * c.num_heads * q * kv * c.d_kv for q, kv, n in (
        (S, S, c.num_layers), (T, T, c.num_layers_of("decoder")), (T, S, c.num_layers_of("decoder")))
        for _ in range(n))
    extras = 0  # selector read-out and gate network: they see one position per example
    plug = c.ffn_plug
    for stack, layers, tokens in (("encoder", c.num_layers, B * S),
                                  ("decoder", c.num_layers_of("decoder"), B * T)):
        for i in range(layers):
            if plug is not None and i in plug.layer_indices(stack, layers):
                extras += _mta_parts(c, tokens, B)[1]
    return (6 * p["encoder"] * B * S + 6 * p["decoder_target"] * B * T + 6 * p["cross_kv"] * B * S
            + 6 * p["lm_head"] * B * T + 3 * attention + 3 * extras)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip as JAX sees it (one device per chip; v4 and v5p as megacore)."""

    name: str  # the --topology prefix: v4, v5e, v5p, v6e
    device_kind: str  # jax Device.device_kind
    hbm_bytes: int
    peak_bf16: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, every link, both directions
    megacore: bool  # two TensorCores compiled as one device
    chips_per_host: tuple[int, int, int]


# Google's published per-chip figures (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
# Bandwidths in decimal GB/s as published; ICI is the "bidirectional inter-chip interconnect
# bandwidth per chip". The v4 page gives no per-chip ICI figure: ours is an estimate,
# 6 links x 2 directions x 50 GB/s (the v4 paper, Jouppi et al., ISCA 2023).
TPU_CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "TPU v4", 32 * 2**30, 275e12, 1200e9, 600e9, True, (2, 2, 1)),
    Chip("v5e", "TPU v5 lite", 16 * 2**30, 197e12, 819e9, 400e9, False, (2, 4, 1)),
    Chip("v5p", "TPU v5", 95 * 2**30, 459e12, 2765e9, 1200e9, True, (2, 2, 1)),
    Chip("v6e", "TPU v6 lite", 32 * 2**30, 918e12, 1638e9, 800e9, False, (2, 4, 1)),
)}

# GPU dense tensor-core peaks from the vendor datasheets; first match of the device kind wins.
_GPU_PEAKS = (
    ("h100 pcie", "bfloat16", 756e12), ("h100", "bfloat16", 989e12),  # SXM
    ("h200", "bfloat16", 989e12), ("a100", "bfloat16", 312e12),
    ("h100 pcie", "float32", 51e12), ("h100", "float32", 67e12),
    ("h200", "float32", 67e12), ("a100", "float32", 19.5e12),
)


def peak_flops_per_second(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense (no sparsity) peak of known accelerators; None when unknown (e.g. CPU).

    TPUs multiply float32 in bf16 passes at DEFAULT precision, so their bf16 peak serves both.
    """
    kind = device_kind.lower()
    for chip in TPU_CHIPS.values():
        if kind == chip.device_kind.lower():
            return chip.peak_bf16
    for name, dt, value in _GPU_PEAKS:
        if name in kind and dt == dtype:
            return value
    return None
