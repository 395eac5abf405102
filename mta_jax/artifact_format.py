"""The adapter artifact: what `python -m mta_jax.export` writes, and both runtimes read.

    <dir>/mta_adapters.safetensors   every parameter under an `mta` module (selector, task
                                     adapters, shared adapters, gate), named by its path in
                                     the Flax tree, e.g. `encoder/layers_11/ffn/mta/adapters/wi`,
                                     in the layout and dtype it was trained in
    <dir>/mta_config.json            format_version; plug (the MTAConfig's fields); task_types;
                                     blocks (the MTA block indices of each stack); model (dtype,
                                     param_dtype, tie_word_embeddings); backbone (its Hugging Face
                                     config.json and the digest of its weights); data and eval
                                     (tokenisation and decoding as in training); source
    <dir>/backbone/                  (`--full`) the trained backbone as a Hugging Face folder

The backbone digest identifies the weights the adapters were trained on. It covers every
backbone tensor the MTA model reads, in Hugging Face names and layouts (`torch.nn.Linear`
weights [out, in]), with three kinds of tensor left out:
  * copies some folders hold: `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`
    (both are `shared.weight`) and the decoder's unused cross-attention relative bias;
  * the dense FFN (`...DenseReluDense.*`) of the blocks where MTA's `ffn` adapters replace it:
    the model never reads it (a `--full` backbone holds a stand-in there);
  * `lm_head.weight` when the head is tied to `shared.weight`.
Each covered tensor is cast to the training parameter dtype (`model.param_dtype`) and taken in
C order, little-endian; the digest is `sha256:` + the SHA-256 over the covered tensors in
sorted name order, each as the line `<name> <dtype> <shape>\\n` followed by its bytes. So a
folder whose weights give the model bitwise the trained parameters (whatever its storage
dtype when the cast is exact, sharded or not) has the artifact's digest, and no other does.

No JAX here: the PyTorch runtime (`mta_jax.torch`) reads the same format.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Iterable, Mapping

import numpy as np
from etils import epath

from mta_jax.errors import CheckpointFormatError

FORMAT_VERSION = 1
ADAPTERS_FILE = "mta_adapters.safetensors"
CONFIG_FILE = "mta_config.json"
BACKBONE_DIR = "backbone"
STACKS = ("encoder", "decoder")

# Tensors a Hugging Face T5 folder may hold that are copies of others (never read).
HF_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
             "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

# config.json fields the adapters depend on: a backbone that differs in one cannot serve them.
SHAPE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
                "feed_forward_proj", "layer_norm_epsilon")

_REQUIRED = ("plug", "task_types", "blocks", "model", "backbone", "data", "eval")
_FFN = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.DenseReluDense\.")

log = logging.getLogger(__name__)


def is_artifact(path: str | epath.PathLike) -> bool:
    """Whether `path` is an adapter artifact folder (it holds mta_config.json)."""
    return (epath.Path(path) / CONFIG_FILE).exists()


def tensor_name(path: Iterable[str]) -> str:
    """A parameter's path in the Flax tree -> its name in the artifact ('a/b/c')."""
    return "/".join(path)


def read_meta(adapter_dir: str | epath.PathLike) -> dict[str, Any]:
    """mta_config.json of an artifact folder, checked: both files there, a known version."""
    folder = epath.Path(adapter_dir)
    if not folder.is_dir():
        raise CheckpointFormatError(f"{folder}: no such adapter artifact folder")
    path = folder / CONFIG_FILE
    for required in (path, folder / ADAPTERS_FILE):
        if not required.exists():
            raise CheckpointFormatError(f"{required}: missing (an adapter artifact holds "
                                        f"{CONFIG_FILE} and {ADAPTERS_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: invalid JSON ({e})") from e
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: format_version {version!r} is not one this mta_jax reads "
            f"({FORMAT_VERSION}); export the adapters again with this version")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointFormatError(f"{path}: missing fields {missing}")
    return meta


# --------------------------------------------------------------------------- the backbone

def digest_names(names: Iterable[str], meta: Mapping[str, Any]) -> list[str]:
    """The Hugging Face tensor names among `names` that the digest covers (module docstring)."""
    replaced = meta["blocks"] if meta["plug"]["adapter_kind"] == "ffn" else {}
    tied = meta["model"]["tie_word_embeddings"]

    def covered(name: str) -> bool:
        if name in HF_COPIES:
            return False
        if name == "lm_head.weight":
            return not tied
        m = _FFN.match(name)
        return not (m and int(m.group(2)) in replaced.get(m.group(1), ()))

    return sorted(n for n in names if covered(n))


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # only bfloat16 needs it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def backbone_digest(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of the covered tensors among `tensors` (Hugging Face names, layouts)."""
    dtype = numpy_dtype(meta["model"]["param_dtype"])
    h = hashlib.sha256()
    for name in digest_names(tensors, meta):
        arr = np.ascontiguousarray(np.asarray(tensors[name]).astype(dtype.newbyteorder("<")))
        h.update(f"{name} {meta['model']['param_dtype']} {list(arr.shape)}\n".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


def check_backbone(meta: Mapping[str, Any], config: Mapping[str, Any],
                   tensors: Mapping[str, np.ndarray], *, where: str, adapter_dir: str,
                   accept_other_backbone: bool) -> None:
    """Refuses (one line) a backbone unlike the one the adapters were trained on.

    config: the folder's values of SHAPE_FIELDS; a difference there is refused always.
    tensors: its Hugging Face tensors; a different digest is refused unless
    `accept_other_backbone` (then logged as a warning).
    """
    trained = meta["backbone"]["config"]
    for field in SHAPE_FIELDS:
        if config.get(field) != trained.get(field):
            raise CheckpointFormatError(
                f"{where}: config.json has {field}={config.get(field)!r}; the adapters in "
                f"{adapter_dir} were trained on a backbone with {field}={trained.get(field)!r}")
    want, got = meta["backbone"]["digest"], backbone_digest(tensors, meta)
    if got == want:
        return
    if not accept_other_backbone:
        raise CheckpointFormatError(
            f"{where}: these backbone weights ({got[:19]}...) are not the ones the adapters in "
            f"{adapter_dir} were trained on ({want[:19]}...); use the run's backbone (export "
            "--full writes it), or accept_other_backbone=True (--accept_other_backbone) to "
            "use these on purpose")
    log.warning("%s: backbone digest %s differs from the adapters' %s (accepted on purpose)",
                where, got, want)


def check_tensors(path: str, expected: Mapping[str, tuple[int, ...]],
                  found: Mapping[str, tuple[int, ...]]) -> None:
    """One line naming `path` and the first tensor that is missing, unexpected or misshapen."""
    more = lambda names: f" and {len(names) - 1} more" if len(names) > 1 else ""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointFormatError(f"{path}: missing tensor {missing[0]} (shape "
                                    f"{tuple(expected[missing[0]])}){more(missing)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointFormatError(f"{path}: unexpected tensor {unexpected[0]} (not a parameter "
                                    f"of the model {CONFIG_FILE} describes){more(unexpected)}")
    for name in sorted(expected):
        if tuple(found[name]) != tuple(expected[name]):
            raise CheckpointFormatError(
                f"{path}: tensor {name} has shape {tuple(found[name])}, the model "
                f"{CONFIG_FILE} describes expects {tuple(expected[name])}")
