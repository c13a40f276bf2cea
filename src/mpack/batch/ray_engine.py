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

import os
from pathlib import Path

import numpy as np

from mpack.batch import JobPlan, JobState, Progress
from mpack.errors import MissingDependencyError, MpackError, first_line


class PartWorker:
    """Ray Data callable class: one ONNX Runtime session per actor, one part file per chunk."""

    def __init__(self, plan: JobPlan) -> None:
        from mpack.batch import ChunkRunner, formats

        self.plan = plan
        self.source = formats.open_source(Path(plan.source))
        self.runner = ChunkRunner(plan)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
             logging_level="warning", configure_logging=True)
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
                ray.init(address=address, log_to_driver=False, logging_level="warning")
            except Exception as exc:  # ConnectionError, or Ray's own types for a bad address
                raise MpackError(f"cannot connect to the Ray cluster at {address or os.environ['RAY_ADDRESS']}: "
                                 f"{first_line(exc)}", hint="check --ray-address (e.g. auto, ray://HOST:10001)") \
                    from None
        else:
            start_local()
        started_here = True
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = plan.threads or 1
    count = max(1, min(actors or max(1, cpus // threads), len(pending)))
    dataset = ray.data.from_items([{"index": i} for i in pending], override_num_blocks=min(len(pending), count * 4))
    dataset = dataset.map_batches(PartWorker, fn_constructor_kwargs={"plan": plan}, batch_size=1, concurrency=count,
                                  num_cpus=min(threads, cpus), batch_format="numpy")
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


def _user_error(exc: BaseException) -> MpackError | None:
    """The MpackError an actor raised (bad data in some chunk), out of Ray's wrappers, if that is what this is."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MpackError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
