"""PNG figures for reports: routing heatmaps and loss curves, drawn with the Agg canvas.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas, so nothing
needs a display and the caller's pyplot backend and state are left alone.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mta_jax import storage


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    # Rendered in memory, then written whole: a local file or a gs:// object alike.
    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    storage.write_bytes(path, png.getvalue())
    return os.fspath(path)


def routing_heatmap(weights: np.ndarray, task_names: Sequence[str], path: str,
                    title: Optional[str] = None,
                    adapter_names: Optional[Sequence[str]] = None) -> str:
    """Tasks x adapters heatmap of routing weights, each cell labelled; returns `path`.

    Args:
      weights: [num_tasks, num_adapters], e.g. the mean selector weight per task type.
      task_names: num_tasks row labels.
      path: the PNG to write, local (parent folders are created) or gs://.
      title: optional figure title.
      adapter_names: num_adapters column labels; default "adapter 0", "adapter 1", ...
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2:
        raise ValueError(f"routing_heatmap: weights must be [num_tasks, num_adapters], got shape {weights.shape}")
    num_tasks, num_adapters = weights.shape
    if len(task_names) != num_tasks:
        raise ValueError(f"routing_heatmap: {len(task_names)} task_names for weights with {num_tasks} rows "
                         f"(shape {weights.shape})")
    if adapter_names is None:
        adapter_names = [f"adapter {e}" for e in range(num_adapters)]
    if len(adapter_names) != num_adapters:
        raise ValueError(f"routing_heatmap: {len(adapter_names)} adapter_names for weights with "
                         f"{num_adapters} columns (shape {weights.shape})")

    finite = weights[np.isfinite(weights)]
    # Routing weights are probabilities: a fixed [0, 1] scale keeps figures comparable.
    in_unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
    vmin, vmax = (0.0, 1.0) if in_unit else (float(finite.min()), float(finite.max()))

    fig = _new_figure(1.6 + 0.9 * num_adapters, 1.2 + 0.55 * num_tasks)
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label="weight")
    ax.set_xticks(range(num_adapters), labels=list(adapter_names), rotation=30, ha="right")
    ax.set_yticks(range(num_tasks), labels=list(task_names))
    ax.set_xlabel("adapter")
    ax.set_ylabel("task")
    middle = (vmin + vmax) / 2
    for t in range(num_tasks):
        for e in range(num_adapters):
            value = weights[t, e]
            # Light text on the dark end of viridis, dark text on the light end.
            color = "white" if not np.isfinite(value) or value < middle else "black"
            ax.text(e, t, f"{value:.2f}", ha="center", va="center", color=color, fontsize=9)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def loss_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str,
                title: Optional[str] = None, ylabel: str = "loss", log_y: bool = False) -> str:
    """One line per named (steps, values) curve, with a legend; returns `path`.

    `log_y`: logarithmic loss axis, so that curves which differ late (after the first steps'
    steep fall) stay apart."""
    if not curves:
        raise ValueError("loss_curves: no curves given")
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for name, (steps, values) in curves.items():
        steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
        if steps.shape != values.shape or steps.ndim != 1:
            raise ValueError(f"loss_curves: curve {name!r} has {steps.size} steps and {values.size} values; "
                             "both must be 1-D and of the same length")
        ax.plot(steps, values, label=str(name), marker="o" if steps.size < 20 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def read_metrics_jsonl(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a metrics file, one per non-blank line."""
    rows = []
    with storage.path(path).open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def metric_curve(rows: Sequence[Mapping[str, Any]], key: str,
                 step_key: str = "step") -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the rows that have both `key` and `step_key`."""
    pairs = [(row[step_key], row[key]) for row in rows if key in row and step_key in row]
    return [p[0] for p in pairs], [p[1] for p in pairs]
