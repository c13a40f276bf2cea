"""``mpack inspect``: what an ONNX file holds, read without loading its weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mpack import manifest
from mpack.onnx_io import OnnxFacts, load_graph, read_facts


@dataclass
class InspectResult:
    facts: OnnxFacts
    size_bytes: int
    parameters: int
    nodes: int
    op_histogram: dict[str, int]
    manifest: dict | None = None
    manifest_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def manifest_summary(self) -> dict | None:
        m = self.manifest
        if not m:
            return None
        return {"path": str(self.manifest_path), "source": m.get("source", {}).get("path"),
                "framework": m.get("framework"), "exporter": m.get("exporter"),
                "parity_passed": m.get("parity", {}).get("passed"), "created_at": m.get("created_at"),
                "history": [h.get("step") for h in m.get("history", [])]}

    def to_dict(self) -> dict:
        f = self.facts
        return {"path": str(f.path), "ir_version": f.ir_version, "producer": f.producer, "opsets": f.opsets,
                "inputs": [s.to_dict() for s in f.inputs], "outputs": [s.to_dict() for s in f.outputs],
                "size_bytes": self.size_bytes, "external_data": f.external_files, "parameters": self.parameters,
                "nodes": self.nodes, "op_histogram": self.op_histogram, "manifest": self.manifest_summary()}


def _all_nodes(graph):
    """Nodes of the graph and of every subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def run(path: Path) -> InspectResult:
    model = load_graph(path)
    facts = read_facts(path, model)
    parameters = 0
    for tensor in model.graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        parameters += count
    histogram = Counter(
        (f"{n.domain}." if n.domain and n.domain != "ai.onnx" else "") + n.op_type for n in _all_nodes(model.graph))
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in facts.external_files
                                     if (path.parent / f).exists())
    data = manifest.load(path)
    return InspectResult(facts, size, parameters, sum(histogram.values()), dict(histogram.most_common()), data,
                         manifest.manifest_path_for(path) if data else None)
