"""The Ray engine of ``mpack batch``: the job's chunks as a Ray Data pipeline, one ONNX Runtime session per actor.

The dataset is the list of *unfinished chunks* (index and row range); ``map_batches`` hands them to
:class:`PartWorker`, a callable class, so each actor opens the model once and then, per chunk, reads its rows
straight from the input, infers with the same :class:`mpack.batch.ChunkRunner` as the local engine, and writes the
part file atomically. The driver only records finished parts in the job record as results stream back. So parts,
record and resume are identical to the local engine (a job may start on one and resume on the other), and no row
passes through the driver.

Why not ``read_parquet → map_batches → write_parquet``: Ray Data's writers name files per run and keep no record of
what finished, so an interrupted job could not resume without redoing or duplicating rows, and output order would
not follow input order. The price: input and output must be on a file system every node sees (a shared mount).

A local instance (no ``--ray-address`` and no ``RAY_ADDRESS``) is started bound to 127.0.0.1 only; see
:func:`start_local`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

from mpack.batch import JobPlan, JobState, Progress
from mpack.errors import MissingDependencyError, MpackError, first_line


class ChunkFailed(Exception):
    """An MpackError raised in an actor, in a form that survives Ray's pickling (MpackError subclasses take other
    constructor arguments than their ``args``, so they cannot be rebuilt on the driver)."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2) -> None:
        super().__init__(message, hint, exit_code)


class PartWorker:
    """Ray Data callable class: one ONNX Runtime session per actor, one part file per chunk."""

    def __init__(self, plan: JobPlan) -> None:
        from mpack.batch import ChunkRunner, formats

        self.plan = plan
        self.source = formats.open_source(Path(plan.source))
        self.runner = ChunkRunner(plan)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._parts(batch)
        except MpackError as exc:
            raise ChunkFailed(exc.message, exc.hint, exc.exit_code) from None

    def _parts(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mpack.batch import formats

        rows = []
        for index in batch["index"].tolist():
            start, stop = self.plan.part_rows(index)
            block = self.source.read(start, stop, self.plan.columns)
            columns = self.runner.result_columns(block, f"{self.plan.source} rows {start + 1}-{stop}", first_row=start)
            formats.write_table(self.plan.part_path(index), self.plan.format, columns,
                                dict(zip(self.plan.outputs, self.plan.fixed_outputs)))
            rows.append(stop - start)
        return {"index": batch["index"], "rows": np.asarray(rows, dtype=np.int64)}


def start_local(num_cpus: int | None = None):
    """Start a throw-away local Ray instance reachable only from this machine.

    N.B. ``_node_ip_address="127.0.0.1"`` alone is not enough in Ray 2.60: ``ray.init`` swaps a loopback node
    address for the machine's routable one (``services.resolve_ip_for_localhost``) and its gRPC servers listen on
    every interface. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes the loopback address as the node's, and
    every server it starts (GCS, raylet, workers, agents) binds 127.0.0.1. The variable is read when Ray is
    imported, hence both the environment (for Ray's child processes) and the already-imported constant.
    tests/test_batch.py checks the listening sockets.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = _ray()
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="error", configure_logging=True)
    return ray


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"--engine ray needs Ray Data, which is not installed ({exc})",
                                     hint="install it with: pip install 'mpack[batch]'") from None
    return ray


def run_parts(plan: JobPlan, state: JobState, address: str | None, actors: int | None,
              progress: Progress | None) -> None:
    """Run every unfinished part of ``plan`` on Ray and commit each one in ``state`` as it finishes."""
    pending = [i for i in range(plan.num_parts) if not state.is_done(i)]
    if not pending:
        return
    ray = _ray()
    started_here = False
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            try:
                ray.init(address=address, log_to_driver=False, logging_level="error")
            except Exception as exc:  # ConnectionError, or Ray's own types for a bad address
                raise MpackError(f"cannot connect to the Ray cluster at {address or os.environ['RAY_ADDRESS']}: "
                                 f"{first_line(exc)}", hint="check --ray-address (e.g. auto, ray://HOST:10001)") \
                    from None
        else:
            start_local()
        started_here = True
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # mpack draws its own bar from the committed parts
    context.print_on_execution_start = False
    # The actor's own exception, not Ray Data's UserCodeException wrapper: a ConfigError about a chunk's data then
    # reaches the user as the same one-line error as on the local engine.
    context.raise_original_map_exception = True
    _quiet_ray_data()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = plan.threads or 1
    # Each actor reserves `threads` CPUs, so its session gets that many intra-op threads (ONNX Runtime's default,
    # every core of the node, would oversubscribe a node running several actors).
    plan = dataclasses.replace(plan, threads=threads)
    count = max(1, min(actors or max(1, cpus // threads), len(pending)))
    dataset = ray.data.from_items([{"index": i} for i in pending], override_num_blocks=min(len(pending), count * 4))
    # max_restarts=0: an actor that dies fails the job (the parts it finished are recorded and the same command
    # resumes the rest) rather than being restarted by Ray, which warns it may not manage to. Ray 2.60 deprecates
    # passing it this way but names no other (its own actor pool code points to this form), hence the filter.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        dataset = dataset.map_batches(PartWorker, fn_constructor_kwargs={"plan": plan}, batch_size=1,
                                      compute=ray.data.ActorPoolStrategy(size=count), num_cpus=min(threads, cpus),
                                      batch_format="numpy", max_restarts=0)
    done_rows = state.data["rows_done"]
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for index, rows in zip(batch["index"].tolist(), batch["rows"].tolist()):
                state.commit(index, rows)
                done_rows += rows
                if progress:
                    progress(done_rows, plan.total_rows)
    except Exception as exc:
        cause = _user_error(exc)
        if cause is not None:
            raise cause from None
        raise
    finally:
        if started_here:
            ray.shutdown()


def _quiet_ray_data() -> None:
    # Ray Data logs each execution's plan and stats (and each task error) to the console; they still go to its
    # session log file.
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.CRITICAL)  # errors reach the user as exceptions, once


def _user_error(exc: BaseException) -> MpackError | None:
    """The MpackError an actor raised (bad data in some chunk), out of Ray's wrappers, if that is what this is.

    Ray re-raises an actor's exception as ``RayTaskError(ChunkFailed)``, whose ``cause`` is the original object.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, ChunkFailed) and cause is None:
            message, hint, exit_code = exc.args
            error = MpackError(str(message).splitlines()[0], hint)  # Ray appends its retry advice to the message
            error.exit_code = exit_code
            return error
        exc = cause or exc.__cause__ or exc.__context__
    return None
