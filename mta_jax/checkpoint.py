"""Orbax checkpoints of one training stage: parameters, optimizer state, input-iterator state.

Layout, one folder per stage, one sub-folder per saved step (an `orbax.checkpoint`
CheckpointManager with Composite items)::

    <directory>/<step>/params       ocp.args.StandardSave: the parameter pytree
    <directory>/<step>/opt_state    ocp.args.StandardSave: the optax state
    <directory>/<step>/data_state   ocp.args.JsonSave: the input iterator's state
    <directory>/<step>/extra        ocp.args.JsonSave: anything else (e.g. the best eval score)
    <directory>/<step>/metrics      written by orbax when `keep_best_metric` is set

Restoring the parameters with plain `orbax.checkpoint`, without this package::

    import jax
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager("/runs/demo/stage2")
    step = manager.latest_step()
    # abstract_params: a pytree of jax.ShapeDtypeStruct(shape, dtype, sharding=...), e.g.
    # jax.eval_shape(model.init, ...) with shardings attached. Left out
    # (ocp.args.StandardRestore()), arrays come back with the sharding they were saved with,
    # which needs the same devices.
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    params = restored.params
    # or one item folder directly:
    params = ocp.StandardCheckpointer().restore(f"/runs/demo/stage2/{step}/params", abstract_params)

`restore_params_from(directory)` does the same for any CheckpointManager folder with a
`params` item, falling back to an older step when the newest cannot be read.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from mta_jax import storage
from mta_jax.errors import CheckpointError

PyTree = Any

ITEMS = ("params", "opt_state", "data_state", "extra")

log = logging.getLogger(__name__)


class Restored(NamedTuple):
    step: int
    params: PyTree
    opt_state: PyTree
    data_state: dict
    extra: dict


def _jsonable(name: str, value: Any) -> Any:
    """`value` with numpy / jax scalars turned into Python numbers; checked to be JSON."""
    def leaf(x):
        if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
            return np.asarray(x).item()
        return x
    value = jax.tree.map(leaf, value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint item {name!r} must be JSON-serialisable: {e}") from e
    return value


class Checkpointer:
    """Saves and restores one stage's checkpoints under `directory`.

    Args:
      directory: the stage's checkpoint folder, local or gs:// (created if missing).
      max_to_keep: how many of the latest steps to keep; None keeps every step.
      async_save: write in a background thread; `save` returns once the arrays are copied
        off the device, so the caller may donate or overwrite them right away. Call
        `wait()` or `close()` (or use `with`) before reading the files or exiting.
      keep_best_metric: also keep the step with the highest `metrics[keep_best_metric]`
        (higher is better), even when it is older than the latest `max_to_keep`.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: Optional[int] = 3,
                 async_save: bool = True, keep_best_metric: Optional[str] = None):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None (keep all) or at least 1, got {max_to_keep}")
        self.directory = storage.absolute(directory)
        self.keep_best_metric = keep_best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if keep_best_metric is None:
            best_fn = None
        else:
            def best_fn(metrics):
                value = (metrics or {}).get(keep_best_metric)
                return -math.inf if value is None else float(value)
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=False, n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # best_fn makes orbax write each step's metrics and rank them (best_step);
            # which steps survive is decided by preservation_policy alone.
            best_fn=best_fn,
            best_mode="max",
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "data_state": ocp.JsonCheckpointHandler(),
                "extra": ocp.JsonCheckpointHandler(),
            },
        )

    # ------------------------------------------------------------------------------ save

    def save(self, step: int, *, params: PyTree, opt_state: PyTree, data_state: Mapping[str, Any],
             extra: Optional[Mapping[str, Any]] = None, metrics: Optional[Mapping[str, Any]] = None,
             force: bool = False) -> bool:
        """Saves one step; returns False when nothing was written (the step already exists).

        `data_state`, `extra` and `metrics` must be JSON-serialisable (numpy / jax scalars
        are converted). With `keep_best_metric`, pass `metrics` holding that key on the steps
        that were evaluated; steps saved without metrics are kept only as the latest N.
        `force` saves even where orbax's save policy would skip the step.
        """
        step = int(step)
        data_state = _jsonable("data_state", dict(data_state))
        extra = _jsonable("extra", dict(extra or {}))
        if metrics is not None:
            metrics = _jsonable("metrics", dict(metrics))
            if self.keep_best_metric is not None and self.keep_best_metric not in metrics:
                raise ValueError(f"metrics for step {step} lack {self.keep_best_metric!r}, the metric this "
                                 f"Checkpointer keeps the best of; got keys {sorted(metrics)}")
        if step in self._manager.all_steps():
            log.info("checkpoint %s/%d exists; not saved again", self.directory, step)
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data_state=ocp.args.JsonSave(data_state),
            extra=ocp.args.JsonSave(extra),
        )
        return bool(self._manager.save(step, args=args, metrics=metrics, force=force))

    # --------------------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The kept step with the highest `keep_best_metric`; None without one (or none saved)."""
        if self.keep_best_metric is None:
            return None
        return self._manager.best_step()

    # --------------------------------------------------------------------------- restore

    def restore(self, step: Optional[int] = None, *, params_target: PyTree,
                opt_state_target: PyTree) -> Restored:
        """Restores everything of `step` (default: the newest readable step).

        Targets are pytrees of `jax.ShapeDtypeStruct` with `.sharding` (or concrete arrays):
        arrays come back with the target's dtype and sharding, whatever they were saved with.
        The target's structure is kept (optax namedtuples, empty states).
        """
        def args(_step):
            return ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target),
                opt_state=ocp.args.StandardRestore(opt_state_target),
                data_state=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            )
        step, out = self._restore(step, args)
        return Restored(step=step, params=out.params, opt_state=out.opt_state,
                        data_state=dict(out.data_state or {}), extra=dict(out.extra or {}))

    def restore_params(self, step: Optional[int] = None, *,
                       params_target: PyTree = None) -> tuple[int, PyTree]:
        """(step, params) of `step` (default: the newest readable step), for inference.

        Without `params_target`, every array is restored whole onto the first local device.
        """
        def args(_step):
            target = params_target if params_target is not None else self._single_device_target(_step)
            return ocp.args.Composite(params=ocp.args.StandardRestore(target))
        step, out = self._restore(step, args)
        return step, out.params

    def _single_device_target(self, step: int) -> PyTree:
        metadata = self._manager.item_metadata(step).params
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise FileNotFoundError(f"no params metadata in {self.directory}/{step}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) if hasattr(m, "shape") else m,
            tree)

    def _restore(self, step: Optional[int], make_args) -> tuple[int, Any]:
        # Finish our own pending writes first: restoring a step still being written fails.
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                      f"steps there: {steps}")
            try:
                return int(step), self._manager.restore(int(step), args=make_args(int(step)))
            except Exception as e:  # noqa: BLE001 -- any failure means this step is unusable
                raise CheckpointError(f"checkpoint {self.directory}/{step} could not be restored: "
                                      f"{type(e).__name__}: {e}") from e
        errors = []
        candidates = steps[::-1]
        for i, candidate in enumerate(candidates):
            try:
                return candidate, self._manager.restore(candidate, args=make_args(candidate))
            except Exception as e:  # noqa: BLE001 -- a corrupt or partial step: try an older one
                errors.append(f"step {candidate}: {type(e).__name__}: {e}")
                following = (f"falling back to step {candidates[i + 1]}" if i + 1 < len(candidates)
                             else "no older step left")
                log.warning("checkpoint %s/%d could not be restored (%s: %s); %s",
                            self.directory, candidate, type(e).__name__, e, following)
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))

    # ---------------------------------------------------------------------------- lifetime

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_params_from(directory: str | os.PathLike, step: Optional[int] = None, *,
                        params_target: PyTree = None) -> tuple[int, PyTree]:
    """(step, params) from any CheckpointManager folder whose steps have a `params` item.

    `step` None: the newest readable step. Without `params_target`, the arrays are restored
    whole onto the first local device.
    """
    directory = storage.absolute(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    with Checkpointer(directory, max_to_keep=None, async_save=False) as checkpointer:
        return checkpointer.restore_params(step, params_target=params_target)
