"""Each bad checkpoint raises one CheckpointFormatError naming the file and the tensor."""
import json

import numpy as np
import pytest

from mta_jax import CheckpointFormatError, load_hf_t5
from mta_jax.hf import read_safetensors, write_safetensors
from tests.helpers import make_hf_t5


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    make_hf_t5(folder, "v1_0")
    return folder


def _copy(good, tmp_path, edit_config=None, edit_tensors=None):
    cfg = json.loads((good / "config.json").read_text())
    tensors = {k: np.array(v) for k, v in read_safetensors(str(good / "model.safetensors")).items()}
    if edit_config:
        edit_config(cfg)
    if edit_tensors:
        edit_tensors(tensors)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_safetensors(str(tmp_path / "model.safetensors"), tensors)
    return str(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointFormatError, match="no such checkpoint folder"):
        load_hf_t5(str(tmp_path / "nope"))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointFormatError, match="config.json: missing"):
        load_hf_t5(str(tmp_path))


def test_missing_weights(good, tmp_path):
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointFormatError, match="neither model.safetensors"):
        load_hf_t5(str(tmp_path))


def test_not_t5(good, tmp_path):
    path = _copy(good, tmp_path, edit_config=lambda c: c.update(model_type="bart"))
    with pytest.raises(CheckpointFormatError, match=r"config.json: model_type is 'bart'"):
        load_hf_t5(path)


def test_wrong_shape_names_file_and_tensor(good, tmp_path):
    def edit(t):
        t["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 7), np.float32)
    path = _copy(good, tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointFormatError,
                       match=r"model.safetensors: tensor encoder.block.1.layer.1.DenseReluDense.wo."
                             r"weight has shape \(32, 7\), the config implies \(32, 48\)"):
        load_hf_t5(path)


def test_missing_tensor(good, tmp_path):
    path = _copy(good, tmp_path, edit_tensors=lambda t: t.pop("decoder.final_layer_norm.weight"))
    with pytest.raises(CheckpointFormatError, match="missing tensor.*decoder.final_layer_norm.weight"):
        load_hf_t5(path)


def test_unexpected_tensor(good, tmp_path):
    path = _copy(good, tmp_path,
                 edit_tensors=lambda t: t.update({"encoder.block.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointFormatError, match=r"unexpected tensor.*encoder.block.9.extra.weight"):
        load_hf_t5(path)


def test_config_layer_count_disagrees_with_weights(good, tmp_path):
    path = _copy(good, tmp_path, edit_config=lambda c: c.update(num_layers=3, num_decoder_layers=2))
    with pytest.raises(CheckpointFormatError, match="missing tensor.*encoder.block.2"):
        load_hf_t5(path)


def test_truncated_safetensors(good, tmp_path):
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointFormatError, match="not a readable safetensors file"):
        load_hf_t5(str(tmp_path))
