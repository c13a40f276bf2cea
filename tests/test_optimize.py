"""`mpack optimize` on a real (tiny, randomly initialised) Hugging Face BERT exported by both PyTorch exporters."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, assert_clean_error, assert_nothing_written, mpack

pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from fixtures.transformer_models import INPUTS  # noqa: E402
from mpack.optimize import OPTIMIZED_FOR_KEY, optimized_for, provider_mismatch  # noqa: E402


def _export(directory: Path, exporter: str) -> Path:
    out = directory / f"bert_{exporter}.onnx"
    args = [a for spec in INPUTS for a in ("--input", spec)]
    result = mpack("convert", "fixtures.transformer_models:make_bert", *args, "--exporter", exporter, "-o", out)
    assert result.exit_code == 0, result
    return out


@pytest.fixture(scope="module")
def bert_ts(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("bert-ts"), "torchscript")


@pytest.fixture(scope="module")
def bert_dynamo(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("bert-dynamo"), "dynamo")


def _copy(model: Path, directory: Path) -> Path:
    """The model and its manifest in a directory of the test's own."""
    dest = directory / model.name
    shutil.copy(model, dest)
    shutil.copy(model.with_name(model.name.replace(".onnx", ".mpack.json")), directory)
    return dest


def _optimize_json(*args) -> dict:
    result = mpack("optimize", *args, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def _feeds(batch: int = 2, seq: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2:] = 0
    return {"input_ids": rng.integers(0, 300, (batch, seq)).astype(np.int64), "attention_mask": mask}


def test_torchscript_export_fuses_attention(bert_ts, tmp_path):
    out = tmp_path / "bert.opt.onnx"
    data = _optimize_json(bert_ts, "-o", out)
    fused = data["fused_ops"]
    assert fused["Attention"] == 2 and fused["SkipLayerNormalization"] == 4
    assert fused["EmbedLayerNormalization"] == 1 and fused["BiasGelu"] == 2
    assert data["attention_fused"] and data["fusion_status"] == "fused" and data["fusion_note"] is None
    assert data["model_type"] == "bert" and data["model_type_source"] == "detected"
    assert (data["num_heads"], data["hidden_size"]) == (4, 32)  # Transformers 5 reshapes to (b, s, -1, 8)
    assert data["nodes_after"] < data["nodes_before"] / 4
    assert data["parity"]["passed"] and set(data["parity"]["cases"]) == {"batch=1 seq=8", "batch=4 seq=12"}
    assert data["level"] == "basic" and data["optimized_for"] is None and optimized_for(out) is None
    # The optimized model gives the fp32 model's results on a padded batch too.
    feeds = _feeds()
    want = ort.InferenceSession(str(bert_ts)).run(None, feeds)
    got = ort.InferenceSession(str(out)).run(None, feeds)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-3)


def test_manifest_extends_converts_record(bert_ts, tmp_path):
    out = tmp_path / "bert.opt.onnx"
    mpack("optimize", bert_ts, "-o", out)
    before = json.loads(bert_ts.with_name("bert_torchscript.mpack.json").read_text())
    after = json.loads((tmp_path / "bert.opt.mpack.json").read_text())
    assert set(before) <= set(after)  # a superset of convert's record: quantize reads it the same way
    assert after["source"] == before["source"] and after["exporter"] == before["exporter"]
    assert after["model"]["path"] == out.name
    assert after["model"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert after["model"]["size_bytes"] == out.stat().st_size
    assert [i["name"] for i in after["inputs"]] == ["input_ids", "attention_mask"]
    assert [h["step"] for h in after["history"]] == ["convert", "optimize"]
    step = after["history"][-1]
    assert step["from"]["sha256"] == hashlib.sha256(bert_ts.read_bytes()).hexdigest()
    assert step["level"] == "basic" and step["provider"] == "cpu" and step["model_type"] == "bert"
    assert step["num_heads"] == 4 and step["hidden_size"] == 32 and step["fused_ops"]["Attention"] == 2
    assert step["nodes_after"] < step["nodes_before"] and step["float16"] is False
    assert step["parity"]["passed"] is True
    assert after["optimization"]["fusion_status"] == "fused"


def test_dynamo_export_fuses_through_onnxscript(bert_dynamo, tmp_path):
    """ONNX Runtime's optimizer finds no attention in a dynamo export; onnxscript's ORT fusions do (fuser auto)."""
    data = _optimize_json(bert_dynamo, "-o", tmp_path / "bert.opt.onnx")
    assert data["fusion_engine"] == "onnxscript.rewriter.ort_fusions" and data["fusion_status"] == "fused"
    assert data["fused_ops"]["Attention"] == 2 and data["fused_ops"]["SkipLayerNormalization"] == 4
    assert any("onnxscript" in n for n in data["notes"]) and data["parity"]["passed"]
    got = ort.InferenceSession(str(tmp_path / "bert.opt.onnx")).run(None, _feeds())
    want = ort.InferenceSession(str(bert_dynamo)).run(None, _feeds())
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-3)


def test_dynamo_export_with_ort_fuser_says_why_nothing_fused(bert_dynamo, tmp_path):
    result = mpack("optimize", bert_dynamo, "-o", tmp_path / "bert.opt.onnx", "--fuser", "ort")
    assert result.exit_code == 0, result
    assert "no attention fused" in result.stderr and "dynamo" in result.stderr
    assert "--exporter torchscript" in result.stderr and "eager" in result.stderr
    data = _optimize_json(bert_dynamo, "-o", tmp_path / "again.onnx", "--fuser", "ort")
    assert data["fusion_status"] == "partial" and not data["attention_fused"]
    assert "Attention" not in data["fused_ops"] and data["fused_ops"]["SkipLayerNormalization"] == 4
    assert "drop --fuser ort" in data["fusion_note"] and data["parity"]["passed"]


@pytest.mark.parametrize("level", ["extended", "all"])
def test_provider_specific_levels_are_recorded(bert_ts, tmp_path, level):
    out = tmp_path / "bert.opt.onnx"
    data = _optimize_json(bert_ts, "-o", out, "--level", level)
    assert data["level"] == level and data["optimized_for"] == "cpu" and data["parity"]["passed"]
    assert data["fused_ops"]["Attention"] == 2
    assert optimized_for(out) == "cpu"
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert props[OPTIMIZED_FOR_KEY] == "cpu" and json.loads(props["mpack.optimize"])["level"] == level
    assert provider_mismatch(out, "cpu") is None
    assert "optimized for cpu" in provider_mismatch(out, "cuda")
    manifest = json.loads((tmp_path / "bert.opt.mpack.json").read_text())
    assert manifest["optimized_for"] == "cpu" and manifest["history"][-1]["optimized_for"] == "cpu"


def test_float16_on_cpu_keeps_float32_io(bert_ts, tmp_path):
    out = tmp_path / "bert.fp16.onnx"
    result = mpack("optimize", bert_ts, "-o", out, "--float16", "--json")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)
    assert data["float16"] and data["parity"]["passed"]
    worst = data["parity"]["outputs"]["output_0"]
    assert worst["atol"] == 1e-2 and 1e-5 < worst["max_abs"] <= 1e-2  # really float16, under fp16 tolerances
    if data["provider"] == "cpu":  # --provider auto picks cuda only where a CUDA device works
        assert data["timing"]["meaningful"] is False and "not meaningful" in data["timing"]["note"]
        assert any("no CUDA device here" in n for n in data["notes"])
    session = ort.InferenceSession(str(out))
    assert {i.type for i in session.get_inputs()} == {"tensor(int64)"}
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}
    model = onnx.load(str(out))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


@pytest.mark.gpu
def test_float16_on_cuda(bert_ts, tmp_path):
    """Unverified without a GPU here: float16 for the CUDA provider, verified there (skipped on CPU machines)."""
    data = _optimize_json(bert_ts, "-o", tmp_path / "m.onnx", "--float16", "--provider", "cuda", "--level",
                          "extended")
    assert data["optimized_for"] == "cuda" and data["parity"]["passed"]
    assert data["parity"]["candidate"] == "optimized[cuda]" and data["timing"]["meaningful"] is True


def test_relative_paths_leave_the_working_directory_clean(bert_ts, tmp_path, monkeypatch):
    """ORT's symbolic shape inference drops temporary files in the working directory; mpack keeps them in its own."""
    _copy(bert_ts, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    result = mpack("optimize", bert_ts.name, "-o", "bert.fp16.onnx", "--float16", "--level", "extended")
    assert result.exit_code == 0, result
    assert {p.name for p in tmp_path.iterdir()} - before == {"bert.fp16.onnx", "bert.fp16.mpack.json"}


def test_flags_override_detection_and_no_verify(bert_ts, tmp_path):
    data = _optimize_json(bert_ts, "-o", tmp_path / "m.onnx", "--model-type", "bert", "--num-heads", "4",
                          "--hidden-size", "32", "--no-verify")
    assert data["model_type_source"] == "flag" and data["fused_ops"]["Attention"] == 2
    assert data["parity"] is None and data["timing"] is None
    manifest = json.loads((tmp_path / "m.mpack.json").read_text())
    assert manifest["history"][-1]["parity"] == {"skipped": True}


def test_model_type_none_runs_graph_optimization_only(bert_ts, tmp_path):
    data = _optimize_json(bert_ts, "-o", tmp_path / "m.onnx", "--model-type", "none", "--level", "extended")
    assert data["fusion_status"] == "skipped" and "Attention" not in data["fused_ops"]
    assert data["nodes_after"] < data["nodes_before"] and data["parity"]["passed"]


def test_parity_failure_exits_3_and_writes_nothing(bert_ts, tmp_path):
    result = mpack("optimize", bert_ts, "-o", tmp_path / "m.onnx", "--atol", "0", "--rtol", "0")
    assert_clean_error(result, 3, "parity check failed")
    assert "output_0" in result.stdout  # the table of failing cases
    assert_nothing_written(tmp_path)


def test_plain_graph_without_manifest(tmp_path):
    """A non-transformer graph built with onnx.helper: no fusions (and says why), a fresh manifest."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
              for n, s in (("w1", (6, 16)), ("w2", (16, 3))))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Identity", ["r"], ["r2"]), helper.make_node("MatMul", ["r2", "w2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w1, w2])
    src = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(src))
    data = _optimize_json(src, "-o", tmp_path / "mlp.opt.onnx")
    assert data["model_type"] is None and data["fusion_status"] == "skipped"
    assert "no Softmax" in data["fusion_note"]
    assert data["nodes_after"] < data["nodes_before"] and data["parity"]["passed"]
    manifest = json.loads((tmp_path / "mlp.opt.mpack.json").read_text())
    assert manifest["source"]["format"] == "onnx" and [h["step"] for h in manifest["history"]] == ["optimize"]


def test_optimize_then_quantize_chain(bert_ts, tmp_path):
    """convert → optimize → quantize: the fused graph quantizes (fused contrib ops need the default tensor type
    set), stays within the accuracy budget, and the manifest holds the whole chain."""
    model = _copy(bert_ts, tmp_path)
    fused = tmp_path / "bert.opt.onnx"
    assert mpack("optimize", model, "-o", fused).exit_code == 0
    result = mpack("quantize", fused, "-o", tmp_path / "bert.int8.onnx", "--json")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)
    assert data["mode"] == "dynamic" and data["quantized_ops"]
    assert all(a["cosine"] >= 0.99 for a in data["accuracy"])
    manifest = json.loads((tmp_path / "bert.int8.mpack.json").read_text())
    assert [h["step"] for h in manifest["history"]] == ["convert", "optimize", "quantize"]
    assert manifest["optimization"] and manifest["quantization"]["mode"] == "dynamic"
    got = ort.InferenceSession(str(tmp_path / "bert.int8.onnx")).run(None, _feeds())[0]
    want = ort.InferenceSession(str(bert_ts)).run(None, _feeds())[0]
    assert float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)) > 0.99


def test_runs_without_torch(bert_ts, tmp_path):
    """mpack[cpu] alone can optimize: ORT's optimize_model() imports torch, mpack's pipeline does not."""
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # makes `import torch` raise ImportError\n"
        "from mpack.cli import main\n"
        f"sys.argv = ['mpack', 'optimize', {str(bert_ts)!r}, '-o', {str(tmp_path / 'm.onnx')!r}, '--json']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fused_ops"]["Attention"] == 2


def test_missing_sympy_names_the_extra(bert_ts, tmp_path):
    """ONNX Runtime's fusions need sympy, which onnxruntime does not depend on: exit 4 naming mpack[cpu]."""
    script = (
        "import sys\n"
        "sys.modules['sympy'] = None\n"
        "from mpack.cli import main\n"
        f"sys.argv = ['mpack', 'optimize', {str(bert_ts)!r}, '-o', {str(tmp_path / 'm.onnx')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "sympy" in proc.stderr and "mpack[cpu]" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- bad input: one line, non-zero exit, nothing written -------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["--model-type", "bort"], ["bort", "bert", "gpt2", "vit"]),
    (["--num-heads", "3"], ["hidden size 32 is not divisible by 3"]),
    (["--num-heads", "4", "--hidden-size", "30"], ["not divisible"]),
    (["--level", "max"], ["not one of basic, extended, all"]),
    (["--provider", "tpu"], ["not one of auto, cpu, cuda"]),
    (["--float16-io"], ["needs --float16"]),
    (["--fuser", "magic"], ["not one of auto, ort, onnxscript"]),
])
def test_bad_options(bert_ts, tmp_path, args, needles):
    model = _copy(bert_ts, tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    result = mpack("optimize", model, "-o", tmp_path / "m.onnx", *args)
    assert_clean_error(result, 2, *needles)
    assert_nothing_written(tmp_path, before)


def test_already_quantized_model(bert_ts, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    quantized = tmp_path / "q.onnx"
    quantize_dynamic(str(bert_ts), str(quantized))
    before = {p.name for p in tmp_path.iterdir()}
    result = mpack("optimize", quantized, "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "already quantized", "MatMulInteger", "optimize the float model first")
    assert_nothing_written(tmp_path, before)


def test_model_optimized_for_another_provider(bert_ts, tmp_path):
    """A graph optimized for CUDA (as its metadata says) cannot be re-optimized for CPU."""
    model = onnx.load(str(bert_ts))
    prop = model.metadata_props.add()
    prop.key, prop.value = OPTIMIZED_FOR_KEY, "cuda"
    gpu_model = tmp_path / "gpu.onnx"
    onnx.save(model, str(gpu_model))
    assert optimized_for(gpu_model) == "cuda" and "cuda" in provider_mismatch(gpu_model, "cpu")
    before = {p.name for p in tmp_path.iterdir()}
    result = mpack("optimize", gpu_model, "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "optimized for cuda", "--provider cpu")
    assert_nothing_written(tmp_path, before)


def test_bad_paths(bert_ts, tmp_path):
    result = mpack("optimize", bert_ts, "-o", tmp_path / "missing" / "m.onnx")
    assert_clean_error(result, 2, "does not exist", "mkdir")
    result = mpack("optimize", tmp_path / "none.onnx", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "does not exist")
    (tmp_path / "notes.onnx").write_text("not a model")
    result = mpack("optimize", tmp_path / "notes.onnx", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "not an ONNX model")
    (tmp_path / "model.json").write_text('{"schema": 1}')
    result = mpack("optimize", tmp_path / "model.json", "-o", tmp_path / "m.onnx")
    assert_clean_error(result, 2, "not an ONNX model")
    result = mpack("optimize", bert_ts, "-o", tmp_path / "m.txt")
    assert_clean_error(result, 2, "must end in .onnx")
    assert_nothing_written(tmp_path, {"notes.onnx", "model.json"})
