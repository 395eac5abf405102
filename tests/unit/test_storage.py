"""storage.py on local paths, and the metrics file a resume truncates (gs:// in
tests/integration/test_gcs.py)."""
import json

import numpy as np
import pytest

from mta_jax import storage
from mta_jax.train_log import MetricWriter


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    storage.write_json(path, {"step": 1})  # parent folders are created
    with pytest.raises(RuntimeError, match="killed"):
        with storage.open_atomic(path) as f:
            f.write(b'{"step": 2, "half": ')
            raise RuntimeError("killed")
    assert storage.read_json(path) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_paths_urls_and_ranges(tmp_path):
    assert storage.is_remote("gs://bucket/run") and not storage.is_remote(tmp_path)
    assert str(storage.path("gs://bucket/run") / "stage1") == "gs://bucket/run/stage1"
    assert str(storage.absolute("runs/x")).startswith("/")
    path = tmp_path / "blob"
    storage.write_bytes(path, bytes(range(100)))
    assert storage.read_range(path, 10, 14) == bytes([10, 11, 12, 13])
    assert storage.local_copy(tmp_path) == str(tmp_path)


def test_truncate_after_drops_later_rows_and_a_line_cut_short(tmp_path):
    writer = MetricWriter(str(tmp_path), enabled=True)
    for step in (2, 4, 6):
        writer.write(step, {"loss": 1.0 / step, "router/adapter_usage": np.array([0.25, 0.75])})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a process killed mid-line
    writer = MetricWriter(str(tmp_path), enabled=True)
    writer.truncate_after(4)
    writer.write(6, {"loss": 0.5})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(2, 0.5), (4, 0.25), (6, 0.5)]
    assert rows[0]["router/adapter_usage"] == [0.25, 0.75]
