"""The CLI shell: help and version stay light (no framework imports), usage errors are one clean line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, assert_clean_error, mpack

HEAVY = ("torch", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "ray", "redis", "pyarrow")


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["inspect", "--help"], ["validate", "--help"],
                                  ["quantize", "--help"], ["bench", "--help"], ["optimize", "--help"],
                                  ["export", "triton", "--help"], ["export", "k8s", "--help"],
                                  ["build-image", "--help"], ["batch", "--help"], ["worker", "--help"],
                                  ["serve", "--help"], ["--version"]])
def test_help_imports_no_framework(argv):
    script = (
        "import json, sys\n"
        "from mpack.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert "Usage" in proc.stdout or "mpack" in proc.stdout


def test_help_lists_commands_and_exit_codes():
    result = mpack("--help")
    assert result.exit_code == 0
    for word in ("convert", "inspect", "parity failure"):
        assert word in result.stdout


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "mpack", "--version"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("mpack ")


def test_missing_extra_names_the_extra(tmp_path):
    """With tensorflow unimportable, converting a Keras file says which extra to install (exit 4)."""
    model = tmp_path / "model.keras"
    model.write_bytes(b"not really a model")
    script = (
        "import sys\n"
        "sys.modules['tensorflow'] = None  # makes `import tensorflow` raise ImportError\n"
        "from mpack.cli import main\n"
        f"sys.argv = ['mpack', 'convert', {str(model)!r}, '-o', {str(tmp_path / 'out.onnx')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "mpack[tf]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpack", "--debug", "inspect", str(tmp_path / "none.onnx")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--input", "x"], "expected NAME:SHAPE"),
    (["--input", "x:batch,-3"], "neither a size"),
    (["--input", "x:4:complex7"], "unknown dtype"),
    (["--atol", "abc"], "not a number"),
    (["--batch-sizes", "0,2"], "integers >= 1"),
    (["--opset", "7"], "supported range"),
    (["--exporter", "magic"], "not one of"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, needle):
    result = mpack("convert", "examples.tiny_cnn:make_model", "-o", tmp_path / "m.onnx", *args)
    assert_clean_error(result, 2, needle)
    assert list(tmp_path.iterdir()) == []
