"""Summaries of a variant comparison: per-run records, seed statistics, report.md, plots.

A run's record is read back from its workdir only (summary.json, <stage>/metrics.jsonl,
timing.json), so a study can be re-summarised, or resumed, without re-running anything.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from mta_jax import plots, storage

BASELINE = "dense"
NO_ROUTING = (BASELINE, "shared_adapter")  # their routing heatmaps say nothing: not copied


def _last_eval(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    evals = [r for r in rows if "eval/score" in r]
    return dict(evals[-1]) if evals else {}


def run_record(workdir: str, batch_size: int) -> dict[str, Any]:
    """What report.md needs from one finished run (a workdir holding summary.json)."""
    workdir = storage.path(workdir)
    summary = storage.read_json(workdir / "summary.json")
    stages = list(summary)
    final = summary[stages[-1]]
    rows = {s: plots.read_metrics_jsonl(workdir / s / "metrics.jsonl") for s in stages}
    if "eval/score" not in final:  # a stage found already finished on resume reports no scores
        final = {**final, **_last_eval(rows[stages[-1]])}
    scores = {k[len("eval/"):-len("/score")] if k != "eval/score" else "overall": float(v)
              for k, v in final.items() if k.startswith("eval/") and k.endswith("score")}

    # Step time: the median logged window of each stage (the first window holds compilation,
    # windows after an evaluation hold its decoding: the median ignores both), step-weighted.
    step_ms, steps_done, curve_steps, curve_loss, offset = 0.0, 0, [], [], 0
    for s in stages:
        train_rows = [r for r in rows[s] if "loss" in r and "examples_per_sec" in r]
        speeds = [r["examples_per_sec"] for r in train_rows[1:]] or \
            [r["examples_per_sec"] for r in train_rows]
        n = train_rows[-1]["step"] if train_rows else 0
        if speeds:
            step_ms += n * 1000.0 * batch_size / float(np.median(speeds))
            steps_done += n
        curve_steps += [offset + r["step"] for r in train_rows]
        curve_loss += [r["loss"] for r in train_rows]
        offset += n
    timing_path = workdir / "timing.json"
    wall = storage.read_json(timing_path).get("wall_seconds") if timing_path.exists() else None
    return {
        "scores": scores,
        "trainable_params": {s: int(summary[s]["trainable_params"]) for s in stages},
        "total_params": {s: int(summary[s]["trainable_params"] + summary[s]["frozen_params"])
                         for s in stages},
        "steps": {s: int(rows[s][-1]["step"]) if rows[s] else 0 for s in stages},
        "step_ms": step_ms / steps_done if steps_done else None,
        "wall_seconds": wall,
        "loss_curve": [curve_steps, curve_loss],
        "routing_png": {s: _latest_png(workdir / s) for s in stages},
    }


def _latest_png(stage_dir: epath.Path) -> Optional[str]:
    found = []
    for path in stage_dir.glob("routing_*.png"):
        m = re.fullmatch(r"routing_(\d+)\.png", path.name)
        if m:
            found.append((int(m.group(1)), os.fspath(path)))
    return max(found)[1] if found else None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(np.mean(v)), float(np.std(v, ddof=1)) if v.size > 1 else 0.0


def aggregate(records: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """{variant: {seed: record}} -> per-variant means and sample stds over seeds, the winner."""
    out: dict[str, Any] = {"variants": {}}
    for variant, by_seed in records.items():
        runs = list(by_seed.values())
        if not runs:
            continue
        types = sorted({t for r in runs for t in r["scores"]})
        stats = {t: _mean_std([r["scores"][t] for r in runs if t in r["scores"]]) for t in types}
        step_ms = [r["step_ms"] for r in runs if r["step_ms"] is not None]
        walls = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
        final_loss = [r["loss_curve"][1][-1] for r in runs if r["loss_curve"][1]]
        out["variants"][variant] = {
            "seeds": sorted(by_seed),
            "scores": {t: {"mean": m, "std": s} for t, (m, s) in stats.items()},
            "trainable_params": runs[0]["trainable_params"],
            "total_params": runs[0]["total_params"],
            "steps": runs[0]["steps"],
            "step_ms": float(np.mean(step_ms)) if step_ms else None,
            "wall_seconds": float(np.mean(walls)) if walls else None,
            "final_train_loss": float(np.mean(final_loss)) if final_loss else None,
        }
    v = out["variants"]
    scored = {k: s["scores"]["overall"] for k, s in v.items() if "overall" in s["scores"]}
    if not scored:
        return out
    winner = max(scored, key=lambda k: scored[k]["mean"])
    out["winner"] = winner
    if BASELINE in scored:
        base = scored[BASELINE]
        for k, s in scored.items():
            delta = s["mean"] - base["mean"]
            # "Beyond the seed spread": the mean +- std intervals do not overlap.
            n = min(len(v[k]["seeds"]), len(v[BASELINE]["seeds"]))
            v[k]["vs_dense"] = {"delta": delta, "beyond_seed_spread": None if n < 2 or k == BASELINE
                                else bool(abs(delta) > s["std"] + base["std"])}
    return out


def _fmt(stat: Optional[Mapping[str, float]]) -> str:
    return "–" if stat is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _params(counts: Mapping[str, int]) -> str:
    return " / ".join(f"{n / 1e6:.3f}M" for n in counts.values())


def markdown(summary: Mapping[str, Any], *, header: str = "") -> str:
    v = summary["variants"]
    types = sorted({t for s in v.values() for t in s["scores"] if t != "overall"})
    lines = [header] if header else []
    lines += ["| variant | " + " | ".join(types) + " | overall (mean ± std) | Δ vs dense | "
              "final train loss | trainable params (per stage) | total params | steps (per stage) | ms/step | "
              "wall s/run |",
              "|" + "---|" * (len(types) + 9)]
    for name, s in v.items():
        vs = s.get("vs_dense")
        delta = "–" if vs is None or name == BASELINE else \
            f"{vs['delta']:+.3f}" + (" *" if vs["beyond_seed_spread"] else "")
        step_ms = "–" if s["step_ms"] is None else f"{s['step_ms']:.0f}"
        wall = "–" if s["wall_seconds"] is None else f"{s['wall_seconds']:.0f}"
        loss = "–" if s["final_train_loss"] is None else f"{s['final_train_loss']:.3f}"
        lines.append(f"| {name} | " + " | ".join(_fmt(s["scores"].get(t)) for t in types) +
                     f" | **{_fmt(s['scores'].get('overall'))}** | {delta} | {loss} | "
                     f"{_params(s['trainable_params'])} | {_params(s['total_params'])} | "
                     f"{' + '.join(str(n) for n in s['steps'].values())} | {step_ms} | {wall} |")
    n_seeds = max(len(s["seeds"]) for s in v.values())
    lines += ["", f"Scores: final evaluation, mean ± sample std over {n_seeds} seed(s). "
              "`*`: the difference to dense exceeds the sum of the two stds (the mean ± std "
              "intervals do not overlap). Final train loss: the last logged window's token NLL, seed "
              "mean. ms/step: median logged window, eval excluded."]
    if "winner" in summary:
        w = summary["winner"]
        ov = v[w]["scores"]["overall"]
        line = f"**Winner: {w}** ({_fmt(ov)})"
        vs = v[w].get("vs_dense")
        if vs is not None and w != BASELINE:
            spread = {True: "beyond the seed spread.", None: "one seed: no spread to compare with.",
                      False: "within the seed spread (not a reliable difference)."}
            line += f", {vs['delta']:+.3f} vs dense: " + spread[vs["beyond_seed_spread"]]
        elif w == BASELINE:
            line += ": no variant beats the dense baseline."
        lines += ["", line]
    return "\n".join(lines) + "\n"


def loss_plot(records: Mapping[str, Mapping[int, Mapping[str, Any]]], path: str) -> Optional[str]:
    """One training-loss curve per variant, averaged over seeds at the steps all seeds logged."""
    curves = {}
    for variant, by_seed in records.items():
        per_seed = [dict(zip(*r["loss_curve"])) for r in by_seed.values() if r["loss_curve"][0]]
        if not per_seed:
            continue
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        curves[variant] = (steps, [float(np.mean([c[s] for c in per_seed])) for s in steps])
    if not curves:
        return None
    return plots.loss_curves(curves, path, title="training loss (seed mean); MTA: stage 1 then 2",
                             log_y=True)


def copy_routing(records: Mapping[str, Mapping[int, Mapping[str, Any]]], out_dir: str) -> list[str]:
    """Each run's last routing heatmap per stage -> out_dir/routing_<variant>_seed<k>_<stage>.png."""
    written = []
    for variant, by_seed in records.items():
        for seed, r in sorted(by_seed.items()):
            for stage, src in r["routing_png"].items():
                if src and variant not in NO_ROUTING:
                    dst = storage.path(out_dir) / f"routing_{variant}_seed{seed}_{stage}.png"
                    storage.write_bytes(dst, storage.path(src).read_bytes())
                    written.append(os.fspath(dst))
    return written
