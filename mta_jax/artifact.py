"""Adapter artifacts, the JAX side: write a trained model's MTA parameters alone, and put them
back onto a backbone folder (the files and the digest: artifact_format.py).

    save_adapters(dir, model, params, ...)   mta_adapters.safetensors + mta_config.json
    save_backbone(dir/backbone, model, params, pretrained=...)   the backbone, a Hugging Face folder
    load_adapters(backbone_folder, dir) -> (model, params)   bitwise the trained parameters
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mta_jax import artifact_format as fmt
from mta_jax import hf, storage
from mta_jax.errors import CheckpointFormatError, ConfigError, UserError
from mta_jax.models import ffn as ffn_lib
from mta_jax.models import mta
from mta_jax.models import t5 as t5_lib


def _mta_plug(model: t5_lib.T5) -> mta.MTAConfig:
    plug = model.config.ffn_plug
    if not isinstance(plug, mta.MTAConfig):
        raise ConfigError(f"an adapter artifact holds MTA blocks; this model's FFN plug is "
                          f"{type(plug).__name__ if plug else 'none (plain T5)'}")
    return plug


def _host_flat(params: Mapping) -> dict[tuple[str, ...], np.ndarray]:
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nn.unbox(dict(params)))
    return flax.traverse_util.flatten_dict(host)


def _is_mta(path: tuple[str, ...]) -> bool:
    return "mta" in path


def describe(model: t5_lib.T5, *, data: Mapping[str, Any], eval: Mapping[str, Any],
             source: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """mta_config.json of `model`, without the backbone digest."""
    config, plug = model.config, _mta_plug(model)
    return {
        "format_version": fmt.FORMAT_VERSION,
        "plug": dataclasses.asdict(plug),
        "task_types": list(plug.task_types),
        "blocks": {s: list(plug.layer_indices(s, config.num_layers_of(s))) for s in fmt.STACKS},
        "model": {"dtype": config.dtype, "param_dtype": config.param_dtype,
                  "tie_word_embeddings": config.tie_word_embeddings},
        "backbone": {"config": hf.config_to_hf(config.replace(ffn_plug=None))},
        "data": dict(data),
        "eval": dict(eval),
        "source": dict(source or {}),
    }


def save_adapters(out_dir: str | epath.PathLike, model: t5_lib.T5, params: Mapping, *,
                  data: Mapping[str, Any], eval: Mapping[str, Any],
                  source: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Writes the artifact of a model with MTA blocks and its parameters; returns its meta.

    data / eval: the tokenisation ({tokenizer, max_source_length, max_target_length,
    start_token, start_token_id}) and decoding ({decode, beam_size, max_decode_length,
    length_penalty, batch_size}) the model was evaluated with, for prediction.
    """
    meta = describe(model, data=data, eval=eval, source=source)
    flat = _host_flat(params)
    plain = model.config.replace(ffn_plug=None)
    backbone = hf.backbone_to_hf(flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if not _is_mta(k)}), plain, present_only=True)
    meta["backbone"]["digest"] = fmt.backbone_digest(backbone, meta)
    out = storage.makedirs(out_dir)  # local or gs://
    hf.write_safetensors(out / fmt.ADAPTERS_FILE,
                         {fmt.tensor_name(k): v for k, v in flat.items() if _is_mta(k)})
    storage.write_json(out / fmt.CONFIG_FILE, meta, indent=2)
    return meta


def save_backbone(folder: str | epath.PathLike, model: t5_lib.T5, params: Mapping, *,
                  pretrained: Optional[Mapping] = None) -> str:
    """The backbone of a model with MTA blocks as a Hugging Face folder; returns what stands
    in for the dense FFN of the blocks whose `ffn` adapters replaced it.

    There, the folder holds the pretrained FFN of that block when `pretrained` (flat
    {path: array}, build.Pretrained.backbone) has it, else the mean of the block's task
    adapters: transformers needs some FFN there, and neither runtime reads it
    (load_adapters and mta_jax.torch put the MTA block in its place; the digest skips it).
    """
    plug = _mta_plug(model)
    host = _host_flat(params)
    flat = {k: v for k, v in host.items() if not _is_mta(k)}
    stand_in = "none needed (bottleneck adapters sit beside the dense FFN)"
    if plug.replaces_dense:
        stand_in = "pretrained FFN" if pretrained is not None else "mean of the task adapters"
        for path, value in host.items():
            if path[3:5] == ("mta", "adapters"):  # <stack>/layers_<i>/ffn/mta/adapters/<w>
                dense = ffn_lib.dense_ffn_path(path)
                ffn = (pretrained[dense] if pretrained is not None
                       else value.astype(np.float32).mean(axis=0))
                flat[dense] = np.asarray(ffn).astype(value.dtype)
    plain = model.config.replace(ffn_plug=None)
    hf.save_hf_t5(os.fspath(folder), t5_lib.T5(plain), flax.traverse_util.unflatten_dict(flat))
    return stand_in


def model_from_meta(meta: Mapping[str, Any], where: str) -> t5_lib.T5:
    """The T5 with MTA blocks that an artifact's meta describes (`where` names it in errors)."""
    try:
        plug = mta.MTAConfig(**meta["plug"])
    except (TypeError, UserError) as e:
        raise CheckpointFormatError(f"{where}: plug is not an MTA config this mta_jax reads "
                                    f"({e})") from e
    m = meta["model"]
    config = hf.config_from_dict(meta["backbone"]["config"], where, dtype=m["dtype"],
                               param_dtype=m["param_dtype"], ffn_plug=plug)
    return t5_lib.T5(config.replace(tie_word_embeddings=m["tie_word_embeddings"]))


def shape_fields(config: t5_lib.T5Config) -> dict[str, Any]:
    """The values of artifact_format.SHAPE_FIELDS of a T5Config, as config.json has them."""
    values = {f: getattr(config, f) for f in fmt.SHAPE_FIELDS}
    values["num_decoder_layers"] = config.num_layers_of("decoder")
    return values


def load_adapters(backbone_folder: str | epath.PathLike, adapter_dir: str | epath.PathLike, *,
                  accept_other_backbone: bool = False) -> tuple[t5_lib.T5, dict]:
    """A Hugging Face backbone folder + an adapter artifact -> (T5 with MTA blocks, params).

    The parameters are bitwise the trained ones, so the logits equal the training
    checkpoint's. A backbone whose weights differ from those the adapters were trained on
    (artifact_format: the digest) is refused unless `accept_other_backbone`; any problem with
    the files is one CheckpointFormatError naming the file and the tensor.
    """
    folder, adapter_dir = os.fspath(backbone_folder), os.fspath(adapter_dir)
    meta = fmt.read_meta(adapter_dir)
    model = model_from_meta(meta, str(storage.path(adapter_dir) / fmt.CONFIG_FILE))
    tensors, origin = hf.read_weights(folder)
    fmt.check_backbone(meta, shape_fields(hf.read_config(folder)), tensors,
                       where=folder, adapter_dir=adapter_dir,
                       accept_other_backbone=accept_other_backbone)
    backbone = flax.traverse_util.flatten_dict(hf.hf_to_backbone(tensors, model.config, origin))
    adapters_path = str(storage.path(adapter_dir) / fmt.ADAPTERS_FILE)
    adapters = hf.read_safetensors(adapters_path)
    abstract = flax.traverse_util.flatten_dict(hf.abstract_params(model))
    fmt.check_tensors(adapters_path,
                      {fmt.tensor_name(k): v.shape for k, v in abstract.items() if _is_mta(k)},
                      {name: a.shape for name, a in adapters.items()})
    leaves = {}
    for path, spec in abstract.items():
        value = adapters[fmt.tensor_name(path)] if _is_mta(path) else backbone.get(path)
        if value is None:  # only the head can be absent: the folder ties it
            raise CheckpointFormatError(
                f"{folder}: no lm_head.weight; the adapters in {adapter_dir} were trained with "
                "a separate head")
        leaves[path] = jnp.asarray(np.asarray(value), dtype=spec.dtype)
    return model, flax.traverse_util.unflatten_dict(leaves)
