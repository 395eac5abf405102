"""The compare command, shrunk: every variant x 1 seed x 10 steps, the real train_and_evaluate."""
import json
import subprocess
import sys

import pytest

from mta_jax.build import VARIANTS
from tests.integration import tiny

pytestmark = pytest.mark.slow

ROUTED = ("switch_moe", "task_moe", "mta_stage1", "mta")  # the others have no routing heatmap


def _env():
    # Unoptimised XLA code compiles in half the time; at 10 steps compiling is the cost.
    return tiny.env()


def _command(out, cache):
    overrides = {**tiny.OVERRIDES, "eval_every_steps": 100, "checkpoint_every_steps": 100}
    return [sys.executable, "-m", "mta_jax.experiments.compare", "--config=configs/demo.py",
            f"--out={out}", "--seeds=1", f"--variants={','.join(VARIANTS)}", "--steps=10",
            f"--compilation_cache={cache}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def test_compare_writes_report_results_and_plots(tmp_path, request):
    out = tmp_path / "study"
    # Compiled programs persist between test sessions (.pytest_cache): reruns take seconds.
    store = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache = store.mkdir("compare_xla") if store else tmp_path / "xla"
    proc = subprocess.run(_command(out, cache), cwd=tiny.ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == list(VARIANTS)
    assert "Winner:" in report
    assert (out / "loss_curves.png").stat().st_size > 1000
    # Routed variants sow per-example weights: evaluation draws their heatmaps, one per stage.
    heatmaps = sorted(p.name for p in out.glob("routing_*.png"))
    assert heatmaps == sorted([f"routing_{v}_seed0_stage1.png" for v in ROUTED]
                              + ["routing_mta_seed0_stage2.png"])
    assert all(f"![{name}]({name})" in report for name in heatmaps)

    results = json.loads((out / "results.json").read_text())
    for variant in VARIANTS:
        summary = results["variants"][variant]
        assert sum(summary["steps"].values()) == 10  # equal budget
        # The report's scores are the run's last evaluation (one seed: mean = it, std 0).
        last_stage = "stage2" if variant == "mta" else "stage1"
        evals = [json.loads(line) for line in
                 open(out / variant / "seed0" / last_stage / "metrics.jsonl") if "eval/score" in line]
        final = evals[-1]
        assert final["step"] == summary["steps"][last_stage]
        assert summary["scores"]["overall"] == {"mean": final["eval/score"], "std": 0.0}
        for kind in ("classify", "nli", "mrc", "generate"):
            assert summary["scores"][kind]["mean"] == final[f"eval/{kind}/score"]
        row = next(r for r in rows if r.split("|")[1].strip() == variant)
        assert f"{final['eval/score']:.3f}" in row
        with open(out / variant / "seed0" / "summary.json") as f:
            assert json.load(f)[last_stage]["eval/score"] == final["eval/score"]
    # MTA splits the budget in the config's stage ratio: tiny.OVERRIDES' 12 : 6 -> 7 + 3.
    assert results["variants"]["mta"]["steps"] == {"stage1": 7, "stage2": 3}
    trained = {v: results["variants"][v]["trainable_params"] for v in VARIANTS}
    dense = trained["dense"]["stage1"]
    # d_model 32, gated FFN of width 64 (3 matrices), one plugged block per stack.
    ffn = 3 * 32 * 64
    assert trained["shared_adapter"]["stage1"] - dense == 2 * (2 * 32 * 384)  # wi + wo, width 384
    assert trained["switch_moe"]["stage1"] - dense == 2 * (4 * ffn + 32 * 5)  # 4 more + router
    assert trained["task_moe"]["stage1"] - dense == 2 * (4 * ffn)  # 5 task types, 5 experts
    assert trained["mta_stage1"]["stage1"] - dense == 2 * (4 * ffn + 5 * 5)  # + selector table
    assert trained["mta"]["stage1"] == trained["mta_stage1"]["stage1"]
    assert trained["mta"]["stage2"] < trained["mta"]["stage1"]  # the backbone is frozen
    # Switch's auxiliary losses reached the train step's loss.
    rows = [json.loads(line) for line in
            open(out / "switch_moe" / "seed0" / "stage1" / "metrics.jsonl") if "aux_loss" in line]
    assert all(r["aux_loss"] > 0 for r in rows)

    # Resume-friendly: a second call finds every summary.json and trains nothing.
    again = subprocess.run(_command(out, cache), cwd=tiny.ROOT, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished earlier, skipped" in again.stderr
