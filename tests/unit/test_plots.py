"""Figures are written as real PNGs; bad shapes are reported with both lengths."""
import json
import struct

import numpy as np
import pytest

from mta_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the IHDR chunk of a PNG file."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_routing_heatmap_writes_png(tmp_path):
    # The released biased initialisation, softmax at T = 0.1, for three task types.
    logits = np.full((3, 5), 0.20)
    for t in range(3):
        logits[t, [t, (t + 1) % 5]] += 0.02
    weights = np.exp(logits / 0.1) / np.exp(logits / 0.1).sum(-1, keepdims=True)
    path = tmp_path / "figs" / "routing.png"  # the parent folder is created
    out = plots.routing_heatmap(weights, ["classify", "nli", "mrc"], str(path), title="stage one routing")
    assert out == str(path)
    width, height = _png_size(path)
    assert width > 300 and height > 150
    assert path.stat().st_size > 10_000


def test_routing_heatmap_custom_adapter_names(tmp_path):
    path = tmp_path / "r.png"
    plots.routing_heatmap(np.eye(2), ["a", "b"], str(path), adapter_names=["task", "shared"])
    assert _png_size(path)[0] > 100


def test_routing_heatmap_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match=r"2 task_names.*3 rows"):
        plots.routing_heatmap(np.zeros((3, 5)), ["a", "b"], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"4 adapter_names.*5 columns"):
        plots.routing_heatmap(np.zeros((3, 5)), ["a", "b", "c"], str(tmp_path / "x.png"),
                              adapter_names=["1", "2", "3", "4"])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        plots.routing_heatmap(np.zeros(5), ["a"], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_loss_curves_from_metrics_jsonl(tmp_path):
    log = tmp_path / "metrics.jsonl"
    with open(log, "w") as f:
        for step in range(1, 31):
            f.write(json.dumps({"step": step, "train/loss": 5.0 / step}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "eval/score": step / 40}) + "\n")
        f.write("\n")
    rows = plots.read_metrics_jsonl(str(log))
    assert len(rows) == 33
    steps, values = plots.metric_curve(rows, "train/loss")
    assert steps == list(range(1, 31)) and values[0] == 5.0
    assert plots.metric_curve(rows, "eval/score") == ([10, 20, 30], [0.25, 0.5, 0.75])

    path = tmp_path / "loss.png"
    plots.loss_curves({"mta": (steps, values), "baseline": (steps, [v * 1.1 for v in values])},
                      str(path), title="stage one")
    width, height = _png_size(path)
    assert width > 300 and height > 200
    assert path.stat().st_size > 10_000


def test_loss_curves_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"'mta' has 3 steps and 2 values"):
        plots.loss_curves({"mta": ([1, 2, 3], [1.0, 2.0])}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="no curves"):
        plots.loss_curves({}, str(tmp_path / "x.png"))


def test_read_metrics_jsonl_names_the_bad_line(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        plots.read_metrics_jsonl(str(log))
