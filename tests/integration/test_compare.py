"""The compare command, shrunk: 2 variants x 1 seed x 10 steps, the real train_and_evaluate."""
import json
import os
import subprocess
import sys

from tests.integration import tiny

VARIANTS = ("dense", "switch_moe")


def _env():
    # Unoptimised XLA code compiles in half the time; at 10 steps compiling is the cost.
    return {**tiny.env(), "XLA_FLAGS": "--xla_backend_optimization_level=0"}


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
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == list(VARIANTS)
    assert "Winner:" in report
    assert (out / "loss_curves.png").stat().st_size > 1000
    # switch_moe sows per-example router probabilities: evaluation draws its routing heatmap.
    assert (out / "routing_switch_moe_seed0_stage1.png").exists()

    results = json.loads((out / "results.json").read_text())
    for variant in VARIANTS:
        summary = results["variants"][variant]
        assert summary["steps"] == {"stage1": 10}
        assert 0.0 <= summary["scores"]["overall"]["mean"] <= 1.0
        assert os.path.exists(out / variant / "seed0" / "summary.json")
    dense, switch = (results["variants"][v]["trainable_params"]["stage1"] for v in VARIANTS)
    # d_model 32, gated FFN of width 64 in one block per stack: 4 more FFN copies and a router.
    assert switch - dense == 2 * (4 * 3 * 32 * 64 + 32 * 5)
    # Switch's auxiliary losses reached the train step's loss.
    rows = [json.loads(line) for line in
            open(out / "switch_moe" / "seed0" / "stage1" / "metrics.jsonl") if "aux_loss" in line]
    assert all(r["aux_loss"] > 0 for r in rows)

    # Resume-friendly: a second call finds every summary.json and trains nothing.
    again = subprocess.run(_command(out, cache), cwd=tiny.ROOT, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished earlier, skipped" in again.stderr
