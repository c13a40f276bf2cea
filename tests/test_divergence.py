"""First-divergence localisation on real converted models: an induced fault is found at exactly its node."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mpack.divergence import NodeDivergence, compare_intermediates, first_divergence  # noqa: E402
from mpack.errors import ConfigError, InputFileError  # noqa: E402
from mpack.parity import Tolerance, Tolerances  # noqa: E402
from tests.validate_models import cnn, scale_initializer  # noqa: E402,F401  (cnn is a fixture)


@pytest.fixture(scope="module")
def feeds():
    return {"pixels": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}


def _where(d: NodeDivergence) -> tuple[str, str, str]:
    return d.node, d.op_type, d.tensor


def test_identical_models_agree_everywhere(cnn, feeds):
    found = compare_intermediates(cnn["fp32"], cnn["fp32"], feeds)
    graph = onnx.load(str(cnn["fp32"]), load_external_data=False).graph
    produced = [o for n in graph.node if n.op_type != "Constant" for o in n.output if o]
    assert [d.tensor for d in found] == produced  # every node output, in topological order
    assert all(d.passed and d.max_abs == 0 and d.cosine == pytest.approx(1.0) for d in found)
    assert first_divergence(cnn["fp32"], cnn["fp32"], feeds) is None


def test_induced_fault_is_located_at_the_edited_node(cnn, feeds):
    edited = cnn["edited"]
    found = compare_intermediates(cnn["fp32"], cnn["faulty"], feeds)
    first_bad = next(i for i, d in enumerate(found) if not d.passed)
    assert _where(found[first_bad]) == (edited["node"], edited["op_type"], edited["tensor"])
    assert first_bad > 0 and all(d.passed for d in found[:first_bad])  # earlier nodes agree exactly
    assert all(not d.passed for d in found[first_bad:])  # and the fault propagates to the output
    first = first_divergence(cnn["fp32"], cnn["faulty"], feeds)
    assert _where(first) == _where(found[first_bad]) and first.max_abs > 0.01 and first.index == found[first_bad].index
    d = first.to_dict()
    assert {"node", "op_type", "tensor", "max_abs", "max_rel", "cosine", "passed", "index"} <= set(d)
    assert d["node"] == edited["node"] and d["passed"] is False


def test_chunked_runs_give_the_same_answer(cnn, feeds):
    whole = compare_intermediates(cnn["fp32"], cnn["faulty"], feeds, chunk_size=1000)
    for size in (1, 2):
        chunked = compare_intermediates(cnn["fp32"], cnn["faulty"], feeds, chunk_size=size)
        assert [(_where(d), d.max_abs, d.passed) for d in chunked] == [(_where(d), d.max_abs, d.passed) for d in whole]
    assert _where(first_divergence(cnn["fp32"], cnn["faulty"], feeds, chunk_size=2)) == (
        cnn["edited"]["node"], cnn["edited"]["op_type"], cnn["edited"]["tensor"])


def test_external_data_and_no_type_info(cnn, feeds, tmp_path):
    """Weights in .onnx.data files and graphs without value_info: the same node is found."""
    ref_dir, cand_dir = tmp_path / "ref", tmp_path / "cand"
    ref_dir.mkdir()
    cand_dir.mkdir()
    model = onnx.load(str(cnn["fp32"]))
    del model.graph.value_info[:]
    onnx.save_model(model, str(ref_dir / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
    edited = scale_initializer(ref_dir / "m.onnx", cand_dir / "m.onnx", save_as_external_data=True,
                               location="m.onnx.data")
    assert (ref_dir / "m.onnx.data").stat().st_size > 10_000 and (cand_dir / "m.onnx.data").exists()
    assert not onnx.load(str(cand_dir / "m.onnx"), load_external_data=False).graph.value_info
    first = first_divergence(ref_dir / "m.onnx", cand_dir / "m.onnx", feeds, chunk_size=2)
    assert _where(first) == (edited["node"], edited["op_type"], edited["tensor"]) == (
        cnn["edited"]["node"], cnn["edited"]["op_type"], cnn["edited"]["tensor"])


def test_int8_diverges_at_the_first_quantized_node_and_tolerance_rules(cnn, feeds):
    graph = onnx.load(str(cnn["fp32"]), load_external_data=False).graph
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    tight = first_divergence(cnn["fp32"], cnn["int8"], feeds)
    assert (tight.node, tight.op_type) == (first_conv.name, "Conv") and tight.cosine > 0.999
    loose = Tolerances(Tolerance(atol=1.0, rtol=1.0))
    assert first_divergence(cnn["fp32"], cnn["int8"], feeds, loose) is None
    # Per-tensor override: the first conv's output loose, the rest tight → the next tensor is reported.
    per = Tolerances(Tolerance(), {first_conv.output[0]: Tolerance(1.0, 1.0)})
    assert first_divergence(cnn["fp32"], cnn["int8"], feeds, per).tensor != first_conv.output[0]


def test_bad_input(cnn, feeds, tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        first_divergence(tmp_path / "none.onnx", cnn["fp32"], feeds)
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(InputFileError, match="not an ONNX model"):
        first_divergence(cnn["fp32"], tmp_path / "text.onnx", feeds)
    with pytest.raises(ConfigError, match="at least 1"):
        compare_intermediates(cnn["fp32"], cnn["fp32"], feeds, chunk_size=0)
    with pytest.raises(ConfigError, match="available here"):
        first_divergence(cnn["fp32"], cnn["faulty"], feeds, candidate_providers=("foo",))
