"""Node-by-node comparison of two ONNX graphs: where do two runs start to differ?

Every intermediate tensor the two graphs share (by name) is exposed as an extra graph output and compared, in the
topological order of the reference graph, with the same math as output parity (``parity.compare_arrays``). The
first tensor beyond tolerance names the first diverging node. Used by ``mpack validate`` (fp32 vs INT8, CPU vs
CUDA) and meant for ``mpack quantize`` to rank nodes by sensitivity (N.B. keep the public API stable:
:func:`compare_intermediates`, :func:`first_divergence`, :class:`NodeDivergence`).

How the graphs are run, and why:
    - Only the graph is loaded (``load_external_data=False``); the modified model is handed to ONNX Runtime as
      bytes with the original directory as its external-data folder
      (``session.model_external_initializers_file_folder_path``). Weights are never copied or re-serialised, so
      models past protobuf's 2 GB limit work, and ORT's external-data path checks (no absolute paths, nothing outside
      the model's directory) hold.
    - Tensors are exposed ``chunk_size`` at a time, one pair of sessions per chunk, so a large model never holds all
      its activations at once.
    - Added outputs carry the element type from ONNX shape inference when it knows one, and only the name when it
      does not (ORT infers the type itself); no shapes are given, so a wrong inferred shape cannot fail the session.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpack.errors import ConfigError, InputFileError, first_line
from mpack.parity import OutputComparison, Tolerances, compare_arrays

DEFAULT_CHUNK_SIZE = 64
# Op types whose outputs are weights rather than computations; a change there shows in the consuming node.
_SKIPPED_OPS = frozenset({"Constant"})


@dataclass(frozen=True)
class NodeDivergence:
    """How one intermediate tensor of the candidate compares with the reference.

    Args:
        index: Position of the producing node in the reference graph's topological order.
        node: The producing node's name in the reference graph (may be empty in unnamed graphs).
        op_type: The producing node's op type (with its domain when not the default one).
        tensor: The tensor's name, shared by both graphs.
        comparison: The figures (max/mean abs, max rel, cosine, NaN/Inf counts, shapes, tolerance used).
    """

    index: int
    node: str
    op_type: str
    tensor: str
    comparison: OutputComparison

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    @property
    def max_abs(self) -> float:
        return self.comparison.max_abs

    @property
    def max_rel(self) -> float:
        return self.comparison.max_rel

    @property
    def cosine(self) -> float:
        return self.comparison.cosine

    @property
    def label(self) -> str:
        """The node for humans: its name, or ``#index`` for an unnamed node."""
        return self.node or f"#{self.index}"

    def to_dict(self) -> dict:
        c = self.comparison.to_dict()
        c.pop("output", None)
        c.pop("case", None)
        return {"index": self.index, "node": self.node, "op_type": self.op_type, "tensor": self.tensor, **c}


def compare_intermediates(reference_onnx: Path, candidate_onnx: Path, feeds: dict[str, np.ndarray],
                          tolerances: Tolerances | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          reference_providers: tuple[str, ...] = ("cpu",),
                          candidate_providers: tuple[str, ...] = ("cpu",)) -> list[NodeDivergence]:
    """Compare every tensor both graphs share, in the reference graph's topological order.

    Args:
        reference_onnx: The reference model (e.g. the fp32 one).
        candidate_onnx: The candidate model (e.g. its INT8 version); may be the same file as the reference when
            only the providers differ.
        feeds: One set of inputs, by input name.
        tolerances: Per-tensor tolerances: the global one, or a per-name override when a tensor's name has one.
            Defaults to ``Tolerances()``.
        chunk_size: Tensors exposed per session. Defaults to 64.
        reference_providers: ONNX Runtime providers of the reference run, short names. Defaults to ("cpu",).
        candidate_providers: The same for the candidate run. Defaults to ("cpu",).

    Returns:
        One :class:`NodeDivergence` per shared tensor (outputs of ``Constant`` nodes left out), passed or not.

    Raises:
        InputFileError: a model is missing, is not ONNX, or ONNX Runtime cannot load it.
        ConfigError: a provider is unknown or unavailable, or ``chunk_size`` < 1.
    """
    return list(_divergences(reference_onnx, candidate_onnx, feeds, tolerances or Tolerances(), chunk_size,
                             reference_providers, candidate_providers))


def first_divergence(reference_onnx: Path, candidate_onnx: Path, feeds: dict[str, np.ndarray],
                     tolerances: Tolerances | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     reference_providers: tuple[str, ...] = ("cpu",),
                     candidate_providers: tuple[str, ...] = ("cpu",)) -> NodeDivergence | None:
    """The first shared tensor (in reference topological order) beyond tolerance, or None when all agree.

    Same arguments as :func:`compare_intermediates`; stops after the first chunk that holds a failure.
    """
    for item in _divergences(reference_onnx, candidate_onnx, feeds, tolerances or Tolerances(), chunk_size,
                             reference_providers, candidate_providers):
        if not item.passed:
            return item
    return None


# --- graph walking -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    index: int
    node: str
    op_type: str
    name: str


def _load(path: Path):
    """The model without its external weights (they stay on disk; ORT reads them from ``path.parent``)."""
    from mpack.onnx_io import load_graph

    model = load_graph(Path(path))
    if not model.graph.output:
        raise InputFileError(f"{path} is not an ONNX model (it has no graph outputs)",
                             hint="give an .onnx file written by an exporter or by mpack convert")
    return model


def topological_nodes(graph) -> list:
    """The graph's nodes in topological order, keeping the file's order among ready nodes.

    ONNX requires files to be sorted already; this keeps the order right for files that are not (ORT sorts
    itself and runs them).
    """
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    waiting = []
    users: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        deps = {produced_by[name] for name in node.input if name in produced_by and produced_by[name] != i}
        waiting.append(len(deps))
        for dep in deps:
            users.setdefault(dep, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, ()):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(graph.node):  # a cycle: an invalid graph; keep the file order and let ORT complain
        return list(graph.node)
    return [graph.node[i] for i in order]


def _tensors(model) -> list[_Tensor]:
    graph = model.graph
    outside = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    tensors = []
    for index, node in enumerate(topological_nodes(graph)):
        if node.op_type in _SKIPPED_OPS and node.domain in ("", "ai.onnx"):
            continue
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        tensors += [_Tensor(index, node.name, op, out) for out in node.output if out and out not in outside]
    return tensors


def _elem_types(model) -> dict[str, int]:
    """Element types of the graph's tensors, from the file's value_info and ONNX shape inference."""
    import onnx

    known = {v.name: v.type.tensor_type.elem_type
             for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)
             if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    try:  # shapes of external initializers come from their dims, so inference works without the weights
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # inference is a help, not a requirement: ORT infers the rest itself
        return known
    for v in inferred.graph.value_info:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            known.setdefault(v.name, v.type.tensor_type.elem_type)
    return known


def _with_outputs(model, names: list[str], types: dict[str, int]) -> bytes:
    """The model serialised with exactly ``names`` as its outputs; ``model`` is left as it was."""
    import onnx

    graph = model.graph
    saved = [onnx.ValueInfoProto() for _ in graph.output]
    for copy, value in zip(saved, graph.output):
        copy.CopyFrom(value)
    del graph.output[:]
    for name in names:
        if name in types:
            graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        else:
            graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        return model.SerializeToString()
    finally:
        del graph.output[:]
        graph.output.extend(saved)


# --- running -----------------------------------------------------------------------------------------------------


def session_from_bytes(model_bytes: bytes, folder: Path, providers: tuple[str, ...], where: str):
    """An ORT session on a serialised model whose external data lies in ``folder``."""
    from mpack.backends.onnxruntime import session_from_onnx

    return session_from_onnx(model_bytes, providers, external_folder=folder,
                             where=f"{where} with exposed intermediate tensors")


def _run(model, path: Path, names: list[str], types: dict[str, int], providers: tuple[str, ...],
         feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = session_from_bytes(_with_outputs(model, names, types), Path(path).parent, providers, str(path))
    wanted = {i.name for i in session.get_inputs()}
    try:
        values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as exc:  # a run failure of the modified graph: name the model, keep one line
        raise InputFileError(f"ONNX Runtime fails to run {path} with exposed intermediate tensors: "
                             f"{first_line(exc)}") from None
    return dict(zip(names, values))


def _divergences(reference_onnx: Path, candidate_onnx: Path, feeds: dict[str, np.ndarray], tolerances: Tolerances,
                 chunk_size: int, reference_providers: tuple[str, ...],
                 candidate_providers: tuple[str, ...]) -> Iterator[NodeDivergence]:
    if chunk_size < 1:
        raise ConfigError("chunk_size", chunk_size, "must be at least 1")
    reference = _load(reference_onnx)
    candidate = reference if Path(candidate_onnx).resolve() == Path(reference_onnx).resolve() \
        else _load(candidate_onnx)
    candidate_tensors = {t.name for t in _tensors(candidate)}
    shared = [t for t in _tensors(reference) if t.name in candidate_tensors]
    ref_types, cand_types = _elem_types(reference), _elem_types(candidate)
    for start in range(0, len(shared), chunk_size):
        chunk = shared[start:start + chunk_size]
        names = [t.name for t in chunk]
        ref_values = _run(reference, reference_onnx, names, ref_types, reference_providers, feeds)
        cand_values = _run(candidate, candidate_onnx, names, cand_types, candidate_providers, feeds)
        for t in chunk:
            a, b = ref_values.pop(t.name), cand_values.pop(t.name)
            if not _numeric(a) or not _numeric(b):
                continue
            comparison = compare_arrays("", t.name, a, b, tolerances.for_output(t.name))
            yield NodeDivergence(t.index, t.node, t.op_type, t.name, comparison)


def _numeric(array) -> bool:
    return isinstance(array, np.ndarray) and array.dtype.kind in "biufc"
