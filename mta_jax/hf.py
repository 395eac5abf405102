"""Hugging Face T5 checkpoints (config.json + safetensors) <-> this project's parameter trees.

No PyTorch: safetensors files are read through numpy memory maps (bfloat16 via ml_dtypes), or
from a gs:// folder tensor by tensor, by byte range.
The raw config.json is read because transformers 5 rewrites `tie_word_embeddings`; the rule
(docs/method.md, "The backbone"): scale the decoder output iff `scale_decoder_outputs` (when present) else iff
`tie_word_embeddings`; the head is `lm_head.weight` when the file has it, else `shared.weight`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mta_jax import storage
from mta_jax.artifact_format import HF_COPIES
from mta_jax.errors import CheckpointFormatError
from mta_jax.models import ffn as ffn_lib
from mta_jax.models import t5 as t5_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# --------------------------------------------------------------------------- safetensors

class RemoteTensor:
    """One tensor of a remote safetensors file: shape and dtype from the header, the data
    fetched (one ranged read of its bytes) when it is converted with np.asarray."""

    def __init__(self, path: str, start: int, end: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.start, self.end = path, start, end
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)

    def __array__(self, dtype=None, copy=None):
        raw = storage.read_range(self.path, self.start, self.end)
        out = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)
        return out if dtype is None else out.astype(dtype)


def read_safetensors(path: str) -> dict[str, np.ndarray | RemoteTensor]:
    """Every tensor of one .safetensors file: a local file as memory-mapped numpy arrays, a
    remote one (gs://) as RemoteTensors, read tensor by tensor when used, never as a whole."""
    path = os.fspath(path)
    try:
        (header_len,) = struct.unpack("<Q", storage.read_range(path, 0, 8))
        header = json.loads(storage.read_range(path, 8, 8 + header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e
    data = None if storage.is_remote(path) else np.memmap(
        path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if data is None:
            out[name] = RemoteTensor(path, 8 + header_len + start, 8 + header_len + end, dtype,
                                     info["shape"])
        else:
            out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _ST_NAMES:
            raise CheckpointFormatError(f"tensor {name}: dtype {arr.dtype} cannot be saved")
        blob = arr.tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data on 8 bytes
    with storage.open_atomic(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def read_weights(folder: str) -> tuple[dict[str, np.ndarray | RemoteTensor], dict[str, str]]:
    """All tensors of a folder (single file or sharded index) and the file each came from."""
    index_path = storage.path(folder) / INDEX_FILE
    single = storage.path(folder) / WEIGHTS_FILE
    if index_path.exists():
        try:
            weight_map = storage.read_json(index_path)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(f"{index_path}: not a safetensors index ({e!r})") from e
        files = sorted(set(weight_map.values()))
    elif single.exists():
        files = [WEIGHTS_FILE]
    else:
        raise CheckpointFormatError(
            f"{folder}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found (PyTorch .bin checkpoints "
            "are not read: convert them with save_pretrained(..., safe_serialization=True))")
    tensors, origin = {}, {}
    for name in files:
        path = storage.path(folder) / name
        if not path.exists():
            raise CheckpointFormatError(f"{index_path}: lists {name}, which does not exist")
        for key, arr in read_safetensors(path).items():
            tensors[key], origin[key] = arr, os.fspath(path)
    return tensors, origin


# --------------------------------------------------------------------------- config

_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


# The shape-setting fields of the published checkpoints' config.json (Hugging Face hub), so
# that a model can be built and compiled from its name alone, offline (`mta_jax.compile`).
# Flan-T5 has T5 v1.1's shapes: gated-GELU FFN, a separate (untied) LM head.
_V1_0 = dict(model_type="t5", vocab_size=32128, d_kv=64, feed_forward_proj="relu")
_V1_1 = dict(model_type="t5", vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu",
             tie_word_embeddings=False)
PUBLISHED_CONFIGS: dict[str, dict] = {
    "t5-small": dict(_V1_0, d_model=512, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(_V1_0, d_model=768, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(_V1_0, d_model=1024, d_ff=4096, num_layers=24, num_heads=16),
    "t5-3b": dict(_V1_0, d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "google/flan-t5-small": dict(_V1_1, d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "google/flan-t5-base": dict(_V1_1, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "google/flan-t5-large": dict(_V1_1, d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "google/flan-t5-xl": dict(_V1_1, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
}
PUBLISHED_CONFIGS.update({f"google-t5/{name}": PUBLISHED_CONFIGS[name]  # the hub's new names
                          for name in ("t5-small", "t5-base", "t5-large", "t5-3b")})


def read_config(folder: str, **overrides) -> t5_lib.T5Config:
    """T5Config from a raw Hugging Face config.json; `overrides` set dtype, ffn_plug, ..."""
    if not storage.path(folder).is_dir():
        raise CheckpointFormatError(f"{folder}: no such checkpoint folder")
    path = storage.path(folder) / CONFIG_FILE
    if not path.exists():
        raise CheckpointFormatError(f"{path}: missing (a Hugging Face T5 folder has config.json)")
    try:
        raw = storage.read_json(path)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: invalid JSON ({e})") from e
    return config_from_dict(raw, path, **overrides)


def config_from_dict(raw: Mapping[str, Any], where: str, **overrides) -> t5_lib.T5Config:
    """T5Config from the fields of a config.json (`where` names it in errors)."""
    if raw.get("model_type") != "t5":
        raise CheckpointFormatError(
            f"{where}: model_type is {raw.get('model_type')!r}; only 't5' (T5 v1.0, v1.1, Flan-T5) "
            "is supported")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointFormatError(f"{where}: missing fields {missing}")
    tie = raw.get("tie_word_embeddings", True)
    scale = raw.get("scale_decoder_outputs", tie)
    fields = dict(
        vocab_size=raw["vocab_size"], d_model=raw["d_model"], d_kv=raw["d_kv"], d_ff=raw["d_ff"],
        num_layers=raw["num_layers"], num_decoder_layers=raw.get("num_decoder_layers"),
        num_heads=raw["num_heads"],
        relative_attention_num_buckets=raw.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=raw.get("relative_attention_max_distance", 128),
        dropout_rate=raw.get("dropout_rate", 0.1),
        layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=raw.get("feed_forward_proj", "relu"),
        # Provisional: whether the head is tied is decided by the weights file.
        tie_word_embeddings=bool(tie), scale_decoder_outputs=bool(scale),
        pad_token_id=raw.get("pad_token_id", 0), eos_token_id=raw.get("eos_token_id", 1),
        decoder_start_token_id=raw.get("decoder_start_token_id", 0),
    )
    fields.update(overrides)
    try:
        return t5_lib.T5Config(**fields)
    except ValueError as e:
        raise CheckpointFormatError(f"{where}: {e}") from e


def config_to_hf(config: t5_lib.T5Config) -> dict[str, Any]:
    """A config.json that transformers 4 and 5 both read as this model.

    transformers 5 derives `scale_decoder_outputs` from `tie_word_embeddings` and then ties
    the head unless the weights hold a separate `lm_head.weight`; `save_hf_t5` therefore
    writes that tensor whenever the output is not scaled.
    """
    c = config
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff,
        "num_layers": c.num_layers, "num_decoder_layers": c.num_layers_of("decoder"),
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "dropout_rate": c.dropout_rate, "layer_norm_epsilon": c.layer_norm_epsilon,
        "feed_forward_proj": c.feed_forward_proj, "is_encoder_decoder": True,
        "tie_word_embeddings": c.scale_decoder_outputs,
        "scale_decoder_outputs": c.scale_decoder_outputs,
        "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id, "initializer_factor": 1.0,
    }


# --------------------------------------------------------------------------- name mapping

def _layout(config: t5_lib.T5Config) -> dict[str, tuple[tuple[str, ...], str]]:
    """HF tensor name -> (path in our tree, conversion kind)."""
    c = config
    out = {"shared.weight": (("shared", "embedding"), "same")}
    ffn = ("wi_0", "wi_1") if c.is_gated else ("wi",)
    for stack, n in (("encoder", c.num_layers), ("decoder", c.num_layers_of("decoder"))):
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            (stack, "relpos_bias", "rel_embedding"), "same")
        out[f"{stack}.final_layer_norm.weight"] = ((stack, "final_layer_norm", "scale"), "same")
        for i in range(n):
            pre, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            sublayers = [("SelfAttention", "self_attention", "pre_self_attention_layer_norm")]
            if stack == "decoder":
                sublayers.append(("EncDecAttention", "encoder_decoder_attention",
                                  "pre_cross_attention_layer_norm"))
            for j, (hf_name, name, norm) in enumerate(sublayers):
                for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
                    out[f"{pre}.{j}.{hf_name}.{a}.weight"] = (ours + (name, b), "qkv")
                out[f"{pre}.{j}.{hf_name}.o.weight"] = (ours + (name, "out"), "o")
                out[f"{pre}.{j}.layer_norm.weight"] = (ours + (norm, "scale"), "same")
            j = len(sublayers)
            for w in ffn:
                out[f"{pre}.{j}.DenseReluDense.{w}.weight"] = (ours + ("ffn", "mlp", w), "t")
            out[f"{pre}.{j}.DenseReluDense.wo.weight"] = (ours + ("ffn", "mlp", "wo"), "t")
            out[f"{pre}.{j}.layer_norm.weight"] = (ours + ("pre_mlp_layer_norm", "scale"), "same")
    return out


def _expected_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "qkv":  # ours [embed, heads, kv]; torch Linear [heads*kv, embed]
        return (ours[1] * ours[2], ours[0])
    if kind == "o":  # ours [heads, kv, embed]; torch [embed, heads*kv]
        return (ours[2], ours[0] * ours[1])
    if kind == "t":
        return (ours[1], ours[0])
    return tuple(ours)


def _from_hf(kind: str, x: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    if kind in ("qkv", "o", "t"):
        return np.asarray(x).T.reshape(ours)
    return np.asarray(x)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "qkv":
        return x.reshape(x.shape[0], -1).T
    if kind == "o":
        return x.reshape(-1, x.shape[-1]).T
    if kind == "t":
        return x.T
    return x


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def hf_to_backbone(tensors: Mapping[str, np.ndarray], config: t5_lib.T5Config,
                   origin: Optional[Mapping[str, str]] = None) -> dict:
    """HF tensors -> the backbone part of our (unboxed) parameter tree, as numpy float32/bf16."""
    origin = origin or {}
    where = lambda name: origin.get(name, "<tensors>")
    shapes = _backbone_shapes(config)
    layout = _layout(config)
    missing = [n for n in layout if n not in tensors]
    if missing:
        raise CheckpointFormatError(
            f"{where(next(iter(tensors), ''))}: missing tensor(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (config says {config.num_layers} encoder / "
            f"{config.num_layers_of('decoder')} decoder layers, feed_forward_proj "
            f"{config.feed_forward_proj!r})")
    allowed = set(layout) | set(HF_COPIES) | {"lm_head.weight"}
    unexpected = sorted(n for n in tensors if n not in allowed)
    if unexpected:
        raise CheckpointFormatError(
            f"{where(unexpected[0])}: unexpected tensor(s) {unexpected[:5]} for this config")
    params: dict = {}
    for name, (path, kind) in layout.items():
        ours = shapes[path]
        want = _expected_shape(kind, ours)
        if tuple(tensors[name].shape) != want:
            raise CheckpointFormatError(
                f"{where(name)}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                f"the config implies {want}")
        _set(params, path, _from_hf(kind, tensors[name], ours))
    if "lm_head.weight" in tensors:
        want = (config.vocab_size, config.d_model)
        if tuple(tensors["lm_head.weight"].shape) != want:
            raise CheckpointFormatError(
                f"{where('lm_head.weight')}: tensor lm_head.weight has shape "
                f"{tuple(tensors['lm_head.weight'].shape)}, the config implies {want}")
        params["lm_head"] = np.asarray(tensors["lm_head.weight"]).T
    return params


def backbone_to_hf(params: Mapping, config: t5_lib.T5Config, *,
                   present_only: bool = False) -> dict[str, np.ndarray]:
    """Our backbone's parameters -> Hugging Face tensors. present_only: skip the tensors whose
    parameter is not in `params` (the dense FFN of blocks where a plug replaced it)."""
    out = {}
    flat = flax.traverse_util.flatten_dict(dict(params)) if present_only else None
    for name, (path, kind) in _layout(config).items():
        if present_only and path not in flat:
            continue
        out[name] = _to_hf(kind, np.asarray(_get(params, path)))
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    elif not config.scale_decoder_outputs:
        # Tied but unscaled: older transformers would untie and randomise a missing head.
        out["lm_head.weight"] = out["shared.weight"]
    return out


def _backbone_shapes(config: t5_lib.T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    plain = config.replace(ffn_plug=None, tie_word_embeddings=True)
    tree = abstract_params(t5_lib.T5(plain))
    flat = flax.traverse_util.flatten_dict(tree)
    return {k: tuple(v.shape) for k, v in flat.items()}


def abstract_params(model: t5_lib.T5) -> dict:
    """Shapes and dtypes of the model's parameters (unboxed), without allocating them."""
    tree = jax.eval_shape(lambda: t5_lib.init_params(model, jax.random.PRNGKey(0)))
    return nn.unbox(tree)


# --------------------------------------------------------------------------- public API

def load_hf_t5(path: str, dtype=jnp.float32, *, param_dtype=jnp.float32, ffn_plug=None,
               rng: Optional[jax.Array] = None, **config_overrides):
    """Load a Hugging Face T5 folder -> (T5 model, params).

    dtype is the computation dtype, param_dtype the storage dtype. With an `ffn_plug`
    (e.g. an MTAConfig), its parameters are initialised from `rng`, and its stacked FFNs of
    the backbone's shape (MTA's `ffn` adapters, MoE experts) start as copies of the
    pretrained FFN of their layer (`assemble_params`).
    """
    config = read_config(path, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype).name,
                         **config_overrides)
    tensors, origin = read_weights(path)
    backbone = hf_to_backbone(tensors, config, origin)
    config = config.replace(tie_word_embeddings="lm_head" not in backbone, ffn_plug=ffn_plug)
    model = t5_lib.T5(config)
    return model, assemble_params(model, flax.traverse_util.flatten_dict(backbone), rng=rng)


def assemble_params(model: t5_lib.T5, backbone: Mapping, *, rng: Optional[jax.Array] = None):
    """Backbone arrays (flat {path: array}) + the plug's parameters -> the model's full tree.

    The plug's parameters are initialised from `rng`; stacked FFNs of the backbone's shape
    then start as copies of their layer's pretrained FFN (`ffn.stacked_copies_of_dense`).
    """
    config = model.config
    pdt = t5_lib.dtype_of(config.param_dtype)
    flat = dict(backbone)
    if config.ffn_plug is not None:
        rng = jax.random.PRNGKey(0) if rng is None else rng
        boxed = t5_lib.init_params(model, rng)
        flat = flax.traverse_util.flatten_dict(nn.unbox(boxed))
        # Backbone leaves overwrite the random ones; a plug that replaces the dense FFN has
        # no such leaf in the model, and its stacked copies read the pretrained FFN instead.
        flat.update({k: v for k, v in backbone.items() if k in flat})
        flat.update(ffn_lib.stacked_copies_of_dense(boxed, backbone))
    return flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(np.asarray(v), dtype=pdt) for k, v in flat.items()})


def save_hf_t5(path: str, model: t5_lib.T5, params: Mapping) -> None:
    """Write the backbone as a Hugging Face folder (config.json + model.safetensors).

    A model with an FFN plug is saved as its backbone: MTA parameters are not part of the
    Hugging Face format (save them with the Orbax checkpoint instead).
    """
    config = model.config
    storage.makedirs(path)
    params = nn.unbox(params)
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), dict(params))
    plain = config.replace(ffn_plug=None)
    flat = flax.traverse_util.flatten_dict(host)
    if config.ffn_plug is not None:
        missing = [p for p in _layout(plain).values() if p[0] not in flat]
        if missing:
            raise CheckpointFormatError(
                f"cannot export {path}: the plug replaces the dense FFN at "
                f"{'/'.join(missing[0][0])}; export the backbone before MTA, or merge adapters")
    tensors = backbone_to_hf(host, plain)
    write_safetensors(storage.path(path) / WEIGHTS_FILE, tensors)
    storage.write_json(storage.path(path) / CONFIG_FILE, config_to_hf(plain), indent=2)
