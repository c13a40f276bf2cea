"""``mpack batch``: offline batch inference. A job reads a table in chunks, runs an ONNX model, writes the results.

The job is cut into *chunks* of ``chunk_rows`` consecutive input rows; chunk ``i`` becomes part file ``i``, written
atomically (temporary file, then ``os.replace``) and then recorded in a small commit record,
``OUTPUT.mpack-batch.json``. A job that dies (SIGINT, SIGKILL, a crash) and is started again with the same command
skips the recorded parts and redoes only the rest, so no row is lost or written twice. The record holds a hash of
the job's parameters (model bytes, input files, column mapping, outputs, format, chunk size); a changed command
refuses to resume unless ``restart`` is set. When every part is done, a single-file output is assembled from the
parts (streaming, atomically) and the record and parts are removed; a directory output keeps the parts as its files.

Memory stays bounded: the local engine holds at most four chunks at once (one read ahead, one being inferred, one
queued for writing and one being written); ``chunk_rows`` defaults to about 32 MiB of input per chunk.

Engines: ``local`` (one ONNX Runtime session; reading and writing overlap inference in two threads) and ``ray``
(``mpack.batch.ray_engine``: the same chunks as Ray Data tasks on a callable class, one session per actor).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mpack.batch import formats
from mpack.errors import ConfigError, InputFileError, JobInterruptedError, MpackError, first_line

ENGINES = ("local", "ray")
STATE_SCHEMA = 1
# Auto chunk size: about this many bytes of (model-typed) input per chunk, within these row bounds.
CHUNK_TARGET_BYTES = 32 << 20
MAX_CHUNK_ROWS = 65536
# Batch-size probe: candidates double up to this; each is timed for at least PROBE_SECONDS.
MAX_PROBE_BATCH = 4096
PROBE_SECONDS = 0.03
PROBE_BUDGET_SECONDS = 2.0

Progress = Callable[[int, int], None]  # (rows done, total rows)


@dataclass(frozen=True)
class BatchConfig:
    """What ``mpack batch`` runs.

    Args:
        model: The .onnx file.
        input: A .parquet, .npz, .npy or .jsonl file, or a directory of one format (read in name order).
        output: A file whose suffix names the format, or a directory (parts, format from ``output_format``).
        mapping: (model input, column) pairs; an input not listed reads the column of its own name (a one-input
            model also takes the only column). Defaults to none.
        id_column: A column copied to the output unchanged (first), to join results back. Defaults to None.
        outputs: Model outputs to write, in order. Defaults to all.
        batch_size: Rows per ONNX Runtime call; None probes the model on the first chunk. Defaults to None.
        chunk_rows: Rows per chunk (the unit of resume, memory and part files); None picks ~32 MiB of input.
        output_format: Format of a directory output (parquet, npz, npy, jsonl). Defaults to the suffix, else parquet.
        engine: ``local`` or ``ray``. Defaults to local.
        restart: Discard a previous job's progress at this output instead of refusing a changed command.
        providers: ONNX Runtime providers. Defaults to ("cpu",).
        threads: intra-op threads per session. Defaults to ONNX Runtime's choice.
        ray_address: Ray cluster to connect to (``auto``, ``ray://...``). Defaults to a local loopback instance.
        ray_actors: Ray actors (sessions) running parts in parallel. Defaults to the cluster's CPUs.
    """

    model: Path
    input: Path
    output: Path
    mapping: tuple[tuple[str, str], ...] = ()
    id_column: str | None = None
    outputs: tuple[str, ...] | None = None
    batch_size: int | None = None
    chunk_rows: int | None = None
    output_format: str | None = None
    engine: str = "local"
    restart: bool = False
    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = None
    ray_address: str | None = None
    ray_actors: int | None = None


@dataclass(frozen=True)
class InputPlan:
    """One model input and the column that feeds it."""

    name: str
    column: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class JobPlan:
    """Everything a chunk needs, picklable for Ray actors: model, source, mapping, sizes, where parts go."""

    model: str
    providers: tuple[str, ...]
    threads: int | None
    source: str
    inputs: tuple[InputPlan, ...]
    id_column: str | None
    outputs: tuple[str, ...]
    fixed_outputs: tuple[bool, ...]
    format: str  # of the part files: the output's, except Arrow IPC parts for a single .parquet output
    chunk_rows: int
    batch_size: int
    fixed_batch: int | None
    parts_dir: str
    total_rows: int

    @property
    def columns(self) -> list[str]:
        names = [i.column for i in self.inputs]
        if self.id_column:
            names.insert(0, self.id_column)
        return list(dict.fromkeys(names))

    @property
    def num_parts(self) -> int:
        return -(-self.total_rows // self.chunk_rows)

    def part_path(self, index: int) -> Path:
        return Path(self.parts_dir) / f"part-{index:05d}{formats.EXTENSION[self.format]}"

    def part_rows(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_rows
        return start, min(self.total_rows, start + self.chunk_rows)


@dataclass
class BatchResult:
    """What a batch job did. ``rows_per_s`` counts the rows inferred in this run (resumed rows excluded)."""

    output: Path
    format: str
    engine: str
    rows: int
    rows_resumed: int
    parts: int
    chunk_rows: int
    batch_size: int
    batch_size_source: str
    inputs: dict[str, str]
    outputs: list[str]
    id_column: str | None
    seconds: float
    probe: list[tuple[int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        done = self.rows - self.rows_resumed
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output)
        data["rows_per_s"] = round(self.rows_per_s, 1)
        data["probe"] = [{"batch_size": b, "rows_per_s": round(r, 1)} for b, r in self.probe]
        return data


# --- the model side -----------------------------------------------------------------------------------------------

class ChunkRunner:
    """Runs one chunk through one ONNX Runtime session, ``batch_size`` rows per call.

    Both engines use it: the local engine in the main thread, the Ray engine once per actor.
    """

    def __init__(self, plan: JobPlan, session=None) -> None:
        from mpack.backends.onnxruntime import session_from_onnx

        self.plan = plan
        self.session = session or session_from_onnx(plan.model, plan.providers, plan.threads)

    def feeds(self, block: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        return {i.name: fit_column(block[i.column], i, where) for i in self.plan.inputs}

    def run(self, feeds: dict[str, np.ndarray], rows: int, batch_size: int | None = None,
            advance: Callable[[int], None] | None = None, first_row: int = 0) -> dict[str, np.ndarray]:
        """Outputs for ``rows`` rows of ``feeds``, by output name, computed ``batch_size`` rows per call."""
        size = batch_size or self.plan.batch_size
        if self.plan.fixed_batch:
            size = self.plan.fixed_batch
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in self.plan.outputs}
        for begin in range(0, rows, size):
            end = min(rows, begin + size)
            batch = {k: v[begin:end] for k, v in feeds.items()}
            if self.plan.fixed_batch and end - begin < size:
                # A model with a fixed batch dim gets its last batch padded (repeating the last row), then cut.
                batch = {k: np.concatenate([v, np.repeat(v[-1:], size - len(v), axis=0)]) for k, v in batch.items()}
            try:
                outputs = self.session.run(list(self.plan.outputs), batch)
            except Exception as exc:  # ORT raises its own types; all mean this data does not run on this model
                raise MpackError(f"the model failed on rows {first_row + begin}-{first_row + end - 1}: "
                                 f"{first_line(exc)}", hint="check the column mapping, dtypes and shapes") from None
            for name, value in zip(self.plan.outputs, outputs):
                if value.ndim == 0 or value.shape[0] != len(next(iter(batch.values()))):
                    raise MpackError(f"output {name} has shape {list(value.shape)} for a batch of "
                                     f"{len(next(iter(batch.values())))} rows",
                                     hint="mpack batch needs outputs with one row per input row (axis 0)")
                pieces[name].append(value[: end - begin])
            if advance:
                advance(end - begin)
        return {name: (np.concatenate(parts) if len(parts) > 1 else parts[0]) for name, parts in pieces.items()}

    def result_columns(self, block: dict[str, np.ndarray], where: str, first_row: int = 0,
                       advance: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """A chunk's output table: the id column (if any) then the model outputs."""
        rows = len(next(iter(block.values())))
        outputs = self.run(self.feeds(block, where), rows, advance=advance, first_row=first_row)
        if self.plan.id_column:
            return {self.plan.id_column: block[self.plan.id_column], **outputs}
        return outputs


def fit_column(array: np.ndarray, spec: InputPlan, where: str) -> np.ndarray:
    """A column as the model input's dtype, refusing lossy kinds (float into int, text into numbers) and shapes that
    do not fit. Safe widening/narrowing within a kind (float64 into float32, int into float) is done."""
    source, target = array.dtype, np.dtype(spec.dtype)
    if source != target:
        numeric = source.kind in "biuf" and target.kind in "biuf"
        if not (numeric and np.can_cast(source, target, "same_kind")):
            raise ConfigError(f"column {spec.column}", source.name,
                              f"cannot feed model input {spec.name!r} ({spec.dtype}) in {where}",
                              hint=f"give a column of {spec.dtype} values, or map another with --map "
                                   f"{spec.name}=COLUMN")
    want = spec.shape[1:]
    got = array.shape[1:]
    if len(got) != len(want) or any(isinstance(d, int) and d != n for d, n in zip(want, got)):
        raise ConfigError(f"column {spec.column}", list(got),
                          f"rows must have shape {list(want)} for model input {spec.name!r} in {where}",
                          hint="one row of the column is one sample, without the batch axis")
    return np.ascontiguousarray(array, dtype=target)


# --- the job ------------------------------------------------------------------------------------------------------

def state_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".mpack-batch.json")


def parts_dir_for(output: Path, single_file: bool) -> Path:
    return output.with_name(output.name + ".mpack-batch.parts") if single_file else output


class JobState:
    """The commit record ``OUTPUT.mpack-batch.json``: parameters hash, resolved sizes, finished parts.

    Finished parts are kept as ``[start, stop)`` ranges of part indices (the Ray engine finishes them out of order).
    """

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    @classmethod
    def load(cls, path: Path) -> JobState | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            assert data.get("schema") == STATE_SCHEMA and isinstance(data.get("done"), list)
        except (OSError, ValueError, AssertionError):
            raise InputFileError(f"the job record {path} is unreadable", hint="re-run with --restart") from None
        return cls(path, data)

    def save(self) -> None:
        from mpack import manifest

        self.data["updated_at"] = manifest.now()
        manifest.write_atomic(self.path, self.data)

    def is_done(self, index: int) -> bool:
        return any(a <= index < b for a, b in self.data["done"])

    def commit(self, index: int, rows: int) -> None:
        ranges = sorted([*self.data["done"], [index, index + 1]])
        merged: list[list[int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.data["done"] = merged
        self.data["rows_done"] = self.data.get("rows_done", 0) + rows
        self.save()

    @property
    def parts_done(self) -> int:
        return sum(b - a for a, b in self.data["done"])


def _output_layout(cfg: BatchConfig) -> tuple[str, bool]:
    """(format, single_file) for the output path, checked before anything is written."""
    output = cfg.output
    suffix_format = formats.format_of(output)
    if cfg.output_format is not None and cfg.output_format not in formats.FORMATS:
        raise ConfigError("--format", cfg.output_format, f"is not one of {', '.join(formats.FORMATS)}")
    if suffix_format:
        if cfg.output_format and cfg.output_format != suffix_format:
            raise ConfigError("--format", cfg.output_format, f"contradicts the output suffix {output.suffix}",
                              hint="drop --format, or give a directory as the output")
        kind, single = suffix_format, True
    else:
        kind, single = cfg.output_format or "parquet", False
        if output.exists() and not output.is_dir():
            raise InputFileError(f"output {output} is a file of unknown format",
                                 hint="name the output .parquet, .npz, .npy or .jsonl, or give a directory")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise InputFileError(f"output directory {parent} does not exist", hint=f"create it first: mkdir -p {parent}")
    if output.resolve() == cfg.input.resolve():
        raise ConfigError("--output", str(output), "is the input", hint="write the results somewhere else")
    return kind, single


def _model_specs(session) -> tuple[list, list]:
    from mpack.specs import ORT_TYPE_TO_DTYPE

    def shape(node):
        return tuple(d if isinstance(d, int) else (d or "?") for d in node.shape)

    ins = [(n.name, ORT_TYPE_TO_DTYPE.get(n.type, n.type), shape(n)) for n in session.get_inputs()]
    outs = [(n.name, ORT_TYPE_TO_DTYPE.get(n.type, n.type), shape(n)) for n in session.get_outputs()]
    return ins, outs


def _map_columns(cfg: BatchConfig, model_inputs: list, source: formats.Source) -> tuple[InputPlan, ...]:
    names = [name for name, _, _ in model_inputs]
    columns = list(source.columns)
    listing = ", ".join(columns)
    mapping: dict[str, str] = {}
    for model_input, column in cfg.mapping:
        if model_input not in names:
            raise ConfigError("--map", f"{model_input}={column}", f"the model has no input {model_input!r}",
                              hint=f"its inputs are: {', '.join(names)}")
        if column not in source.columns:
            raise ConfigError("--map", f"{model_input}={column}", f"column {column!r} is not in {source.path}",
                              hint=f"its columns are: {listing}")
        mapping[model_input] = column
    free = [c for c in columns if c != cfg.id_column and c not in mapping.values()]
    for name in names:
        if name in mapping:
            continue
        if name in source.columns:
            mapping[name] = name
        elif len(names) == 1 and len(free) == 1:
            mapping[name] = free[0]
        else:
            raise ConfigError("model input", name, f"has no column of that name in {source.path}",
                              hint=f"map one with --map {name}=COLUMN (columns: {listing})")
    plans = []
    for name, dtype, shape in model_inputs:
        if not shape:
            raise ConfigError("model input", name, "has no batch axis (it is a scalar)",
                              hint="mpack batch feeds rows along axis 0")
        plans.append(InputPlan(name, mapping[name], dtype, shape))
    return tuple(plans)


def _params(cfg: BatchConfig, source: formats.Source, inputs, outputs, kind: str) -> dict:
    from mpack.manifest import sha256_path

    return {
        "model_sha256": sha256_path(cfg.model),
        "input": source.identity(),
        "mapping": {i.name: i.column for i in inputs},
        "id_column": cfg.id_column,
        "outputs": list(outputs),
        "format": kind,
        "chunk_rows": cfg.chunk_rows or "auto",
    }


def _hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _auto_chunk_rows(first: dict[str, np.ndarray], batch_size: int | None) -> int:
    row_bytes = max(1, sum(a[:1].nbytes for a in first.values()))
    rows = max(1, min(MAX_CHUNK_ROWS, CHUNK_TARGET_BYTES // row_bytes))
    if rows >= 1024:
        rows -= rows % 1024
    return max(rows, batch_size or 1)


def probe_batch_size(runner: ChunkRunner, feeds: dict[str, np.ndarray], rows: int) -> tuple[int, list]:
    """Time doubling batch sizes on real rows; the smallest within 5% of the best rows/s wins.

    Stops past the peak (two sizes in a row below 90% of the best), at the chunk size, or after a ~2 s budget.
    """
    table: list[tuple[int, float]] = []
    best, below = 0.0, 0
    started = time.perf_counter()
    size = 1
    while size <= min(rows, MAX_PROBE_BATCH):
        batch = {k: v[:size] for k, v in feeds.items()}
        runner.run(batch, size, batch_size=size)  # warm-up: first call at a new shape allocates
        calls, begin = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - begin < PROBE_SECONDS:
            runner.run(batch, size, batch_size=size)
            calls += 1
        rate = calls * size / (time.perf_counter() - begin)
        table.append((size, rate))
        below = below + 1 if rate < 0.9 * best else 0
        best = max(best, rate)
        if below >= 2 or time.perf_counter() - started > PROBE_BUDGET_SECONDS:
            break
        size *= 2
    chosen = min(b for b, r in table if r >= 0.95 * best)
    return chosen, table


@dataclass
class _Setup:
    """What :func:`run` learns while checking a job, before it writes anything."""

    kind: str
    single: bool
    source: formats.Source
    session: object
    inputs: tuple[InputPlan, ...]
    outputs: list[str]
    fixed_outputs: tuple[bool, ...]
    fixed_batch: int | None
    first_feeds: dict[str, np.ndarray]


def run(cfg: BatchConfig, progress: Progress | None = None) -> BatchResult:
    """Run (or resume) a batch job.

    Raises:
        InputFileError: the model, input or output location is missing or unreadable, or another run holds it.
        ConfigError: a mapping, dtype or shape does not fit, or the output's record belongs to another job.
        JobInterruptedError: SIGINT stopped the job (exit 130); the same command resumes it.
    """
    started = time.perf_counter()
    setup = _check(cfg)
    with _exclusive(cfg.output):
        return _execute(cfg, setup, progress, started)


def _check(cfg: BatchConfig) -> _Setup:
    """Every check that can fail on the command or the data's first row, before anything is written."""
    if cfg.engine not in ENGINES:
        raise ConfigError("--engine", cfg.engine, f"is not one of {', '.join(ENGINES)}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ConfigError("--batch-size", cfg.batch_size, "must be >= 1 or auto")
    if cfg.chunk_rows is not None and cfg.chunk_rows < 1:
        raise ConfigError("--chunk-rows", cfg.chunk_rows, "must be >= 1 or auto")
    if not cfg.model.is_file():
        raise InputFileError(f"model {cfg.model} does not exist", hint="give an .onnx file")
    kind, single = _output_layout(cfg)
    source = formats.open_source(cfg.input)
    if cfg.id_column is not None and cfg.id_column not in source.columns:
        raise ConfigError("--id", cfg.id_column, f"column {cfg.id_column!r} is not in {source.path}",
                          hint=f"its columns are: {', '.join(source.columns)}")

    from mpack.backends.onnxruntime import session_from_onnx

    session = session_from_onnx(cfg.model, cfg.providers, cfg.threads)
    model_inputs, model_outputs = _model_specs(session)
    inputs = _map_columns(cfg, model_inputs, source)
    out_names = [name for name, _, _ in model_outputs]
    if cfg.outputs:
        unknown = [n for n in cfg.outputs if n not in out_names]
        if unknown:
            raise ConfigError("--outputs", ",".join(cfg.outputs), f"the model has no output {unknown[0]!r}",
                              hint=f"its outputs are: {', '.join(out_names)}")
        out_names = list(cfg.outputs)
    if cfg.id_column in out_names:
        raise ConfigError("--id", cfg.id_column, "has the name of a model output",
                          hint="rename the column, or select outputs with --outputs")
    if kind == "npy" and (len(out_names) != 1 or cfg.id_column):
        raise ConfigError("--output", str(cfg.output), f"an .npy file holds one array, but the job writes "
                          f"{len(out_names) + bool(cfg.id_column)} columns",
                          hint="use .npz, .parquet or .jsonl, or pick one output with --outputs")
    shapes = {name: shape for name, _, shape in model_outputs}
    fixed = tuple(all(isinstance(d, int) for d in shapes[n][1:]) for n in out_names)
    batch_dims = {shape[0] for _, _, shape in model_inputs}
    fixed_batch = batch_dims.pop() if len(batch_dims) == 1 and isinstance(next(iter(batch_dims)), int) else None
    if source.num_rows == 0:
        raise InputFileError(f"input {cfg.input} has no rows", hint="nothing to infer")
    # The first row against the model: a bad mapping, dtype or shape fails here, with nothing written.
    columns = list(dict.fromkeys([i.column for i in inputs] + ([cfg.id_column] if cfg.id_column else [])))
    first = source.read(0, 1, columns)
    first_feeds = {i.name: fit_column(first[i.column], i, f"{cfg.input} row 1") for i in inputs}
    return _Setup(kind, single, source, session, inputs, out_names, fixed, fixed_batch, first_feeds)


def _execute(cfg: BatchConfig, setup: _Setup, progress: Progress | None, started: float) -> BatchResult:
    """Load or start the job's record, pick the batch size, run the unfinished parts, assemble the output."""
    kind, single, source = setup.kind, setup.single, setup.source
    params = _params(cfg, source, setup.inputs, setup.outputs, kind)
    digest = _hash(params)
    state_path = state_path_for(cfg.output)
    parts_dir = parts_dir_for(cfg.output, single)
    try:
        state = JobState.load(state_path)
    except InputFileError:
        if not cfg.restart:
            raise
        state = None  # --restart discards the record anyway, readable or not
    notes: list[str] = []
    if state is not None and state.data.get("params_hash") != digest and not cfg.restart:
        old = state.data.get("params", {})
        changed = [k for k in params if old.get(k) != params[k]] or ["parameters"]
        raise ConfigError("--output", str(cfg.output), f"has an unfinished job with other {', '.join(changed)} "
                          f"({state_path.name})",
                          hint="re-run the original command to resume it, or add --restart to start over")
    if state is not None and (cfg.restart or state.data.get("params_hash") != digest):
        notes.append(f"discarded the previous job's progress ({state.parts_done} parts)")
        state = None
    if state is None:
        _clear_parts(parts_dir, kind, single)
        chunk_rows = cfg.chunk_rows or _auto_chunk_rows(setup.first_feeds, cfg.batch_size)
        state = JobState(state_path, {"schema": STATE_SCHEMA, "params_hash": digest, "params": params,
                                      "chunk_rows": chunk_rows, "batch_size": None, "total_rows": source.num_rows,
                                      "done": [], "rows_done": 0})
    else:
        chunk_rows = state.data["chunk_rows"]
        notes.append(f"resuming: {state.parts_done} parts ({state.data['rows_done']} rows) already done")
    _remove_temporaries(parts_dir)

    plan = JobPlan(model=str(cfg.model.resolve()), providers=tuple(cfg.providers), threads=cfg.threads,
                   source=str(cfg.input.resolve()), inputs=setup.inputs, id_column=cfg.id_column,
                   outputs=tuple(setup.outputs), fixed_outputs=setup.fixed_outputs,
                   format="arrow" if single and kind == "parquet" else kind, chunk_rows=chunk_rows,
                   batch_size=cfg.batch_size or 1, fixed_batch=setup.fixed_batch,
                   parts_dir=str(parts_dir.resolve()), total_rows=source.num_rows)

    # Batch size: fixed by the model, given, kept from the interrupted run, or probed on the first chunk.
    probe: list[tuple[int, float]] = []
    if setup.fixed_batch:
        batch_size, batch_source = setup.fixed_batch, "model"
    elif cfg.batch_size:
        batch_size, batch_source = cfg.batch_size, "given"
    elif state.data.get("batch_size"):
        batch_size, batch_source = state.data["batch_size"], "resumed"
    else:
        runner = ChunkRunner(plan, setup.session)
        sample_rows = min(chunk_rows, MAX_PROBE_BATCH, source.num_rows)
        sample = source.read(0, sample_rows, plan.columns)
        batch_size, probe = probe_batch_size(runner, runner.feeds(sample, f"{cfg.input}"), sample_rows)
        batch_source = "probe"
    plan = _replace(plan, batch_size=batch_size)
    state.data["batch_size"] = batch_size
    parts_dir.mkdir(exist_ok=True)
    state.save()

    resumed_rows = state.data["rows_done"]
    if progress:
        progress(resumed_rows, source.num_rows)
    try:
        if cfg.engine == "ray":
            from mpack.batch import ray_engine

            ray_engine.run_parts(plan, state, cfg.ray_address, cfg.ray_actors, progress)
        else:
            _run_local(plan, source, setup.session, state, progress)
    except KeyboardInterrupt:
        raise JobInterruptedError(
            f"interrupted after {state.data['rows_done']} of {source.num_rows} rows ({state.parts_done} of "
            f"{plan.num_parts} parts kept, recorded in {state_path})",
            hint="run the same command again to resume where it stopped") from None

    if single:
        formats.merge_parts([plan.part_path(i) for i in range(plan.num_parts)], kind, cfg.output)
    # N.B. order: the output is in place before the record goes, so a crash here at worst merges again.
    state_path.unlink(missing_ok=True)
    if single:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return BatchResult(output=cfg.output, format=kind, engine=cfg.engine, rows=source.num_rows,
                       rows_resumed=resumed_rows, parts=plan.num_parts, chunk_rows=chunk_rows, batch_size=batch_size,
                       batch_size_source=batch_source, inputs={i.name: i.column for i in setup.inputs},
                       outputs=setup.outputs, id_column=cfg.id_column, seconds=time.perf_counter() - started,
                       probe=probe, notes=notes)


@contextlib.contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """Hold ``OUTPUT.mpack-batch.lock`` (flock) while this process runs the job: a second run on the same output
    would interleave parts and commits. The kernel drops the lock when the process dies, however it dies; the file is
    removed when the job finishes."""
    import fcntl

    path = output.with_name(output.name + ".mpack-batch.lock")
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputFileError(f"another mpack batch is writing {output} right now",
                                 hint="wait for it, or give another -o") from None
        try:
            yield
        finally:
            if not state_path_for(output).exists():  # finished, or failed before writing: nothing to protect
                path.unlink(missing_ok=True)


def _replace(plan: JobPlan, **changes) -> JobPlan:
    import dataclasses

    return dataclasses.replace(plan, **changes)


def _clear_parts(parts_dir: Path, kind: str, single: bool) -> None:
    if single:
        shutil.rmtree(parts_dir, ignore_errors=True)
    elif parts_dir.is_dir():
        for part in parts_dir.glob(f"part-*{formats.EXTENSION[kind]}"):
            part.unlink()


def _remove_temporaries(parts_dir: Path) -> None:
    # A job killed while writing leaves `.part-NNNNN.<ext>.XXXX.tmp`; the part itself is redone.
    if parts_dir.is_dir():
        for tmp in parts_dir.glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)


def chunks(source: formats.Source, columns: list[str], first: int, chunk_rows: int
           ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(index, rows)`` for chunk ``first`` onwards: the source's blocks re-cut at exact chunk boundaries."""
    buffer: list[dict[str, np.ndarray]] = []
    have, index = 0, first
    for block in source.iter_blocks(first * chunk_rows, columns):
        rows = len(next(iter(block.values())))
        if not rows:
            continue
        buffer.append(block)
        have += rows
        while have >= chunk_rows:
            joined = formats.concat_blocks(buffer, columns)
            yield index, {k: v[:chunk_rows] for k, v in joined.items()}
            index += 1
            have -= chunk_rows
            buffer = [{k: v[chunk_rows:] for k, v in joined.items()}] if have else []
    if have:
        yield index, formats.concat_blocks(buffer, columns)


_DONE = object()


def _run_local(plan: JobPlan, source: formats.Source, session, state: JobState, progress: Progress | None) -> None:
    """Read ahead in one thread, infer in this one, write and commit in another: I/O overlaps inference."""
    pending = [i for i in range(plan.num_parts) if not state.is_done(i)]
    if not pending:
        return
    runner = ChunkRunner(plan, session)
    stop = threading.Event()
    to_infer: queue.Queue = queue.Queue(maxsize=1)
    to_write: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []
    done_rows = [state.data["rows_done"]]

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for index, block in chunks(source, plan.columns, pending[0], plan.chunk_rows):
                if state.is_done(index):
                    continue
                if not put(to_infer, (index, block)):
                    return
            put(to_infer, _DONE)
        except BaseException as exc:  # handed to the main thread, which raises it
            put(to_infer, exc)

    def writer() -> None:
        try:
            while True:
                item = to_write.get()
                if item is _DONE:
                    return
                index, columns = item
                formats.write_table(plan.part_path(index), plan.format, columns,
                                    dict(zip(plan.outputs, plan.fixed_outputs)))
                state.commit(index, len(next(iter(columns.values()))))
        except BaseException as exc:
            failure.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, name="mpack-batch-reader", daemon=True),
               threading.Thread(target=writer, name="mpack-batch-writer", daemon=True)]
    for thread in threads:
        thread.start()

    def advance(rows: int) -> None:
        done_rows[0] += rows
        if progress:
            progress(done_rows[0], plan.total_rows)

    try:
        while True:
            try:
                item = to_infer.get(timeout=0.1)
            except queue.Empty:
                if failure:
                    break
                continue
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            index, block = item
            start, _ = plan.part_rows(index)
            where = f"{source.path} rows {start + 1}-{start + len(next(iter(block.values())))}"
            columns = runner.result_columns(block, where, first_row=start, advance=advance)
            if not put(to_write, (index, columns)):
                break
        put(to_write, _DONE)
        threads[1].join()
    finally:
        # On an error or SIGINT: parts already handed to the writer finish (each is atomic and then committed);
        # the reader stops at its next put.
        while threads[1].is_alive():
            try:
                to_write.put(_DONE, timeout=0.1)
                break
            except queue.Full:
                continue
        threads[1].join()
        stop.set()
        threads[0].join(timeout=5)
    if failure:
        raise failure[0]
