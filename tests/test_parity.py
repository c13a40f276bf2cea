from __future__ import annotations

import numpy as np
import pytest

from mpack.errors import ConfigError
from mpack.parity import ParityReport, Tolerance, compare_arrays, compare_outputs, parse_tolerances


def test_equal_arrays_pass():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    c = compare_arrays("c", "y", a, a.copy(), Tolerance(0, 0))
    assert c.passed and c.max_abs == 0 and c.cosine == pytest.approx(1.0)


def test_value_error_counts_mismatches():
    a = np.zeros(4, np.float32)
    b = np.array([0, 0, 1e-3, 2e-3], np.float32)
    c = compare_arrays("c", "y", a, b, Tolerance(atol=1.5e-3, rtol=0))
    assert not c.passed and c.mismatched == 1 and c.max_abs == pytest.approx(2e-3)
    assert "beyond tolerance" in c.problem


def test_shape_error_is_separate():
    c = compare_arrays("c", "y", np.zeros((2, 3)), np.zeros((3, 2)), Tolerance())
    assert not c.shape_ok and not c.passed and c.problem.startswith("shape")


def test_nan_where_reference_has_none_fails():
    c = compare_arrays("c", "y", np.zeros(3), np.array([0, np.nan, 0]), Tolerance(1, 1))
    assert not c.passed and c.nan_out == 1
    same = compare_arrays("c", "y", np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), Tolerance(0, 0))
    assert same.passed


def test_report_missing_output_fails():
    report = ParityReport("a", "b")
    compare_outputs(report, "c", {"y": np.zeros(2), "z": np.zeros(2)}, {"y": np.zeros(2)}, parse_tolerances(None, None))
    assert not report.passed and report.missing_outputs == ["z"]
    assert not bool(ParityReport("a", "b"))  # nothing compared is not a pass


def test_per_output_tolerances():
    tol = parse_tolerances(["1e-5", "logits=1e-2"], ["logits=0"])
    assert tol.for_output("other") == Tolerance(1e-5, 1e-3)
    assert tol.for_output("logits") == Tolerance(1e-2, 0.0)
    with pytest.raises(ConfigError):
        parse_tolerances(["-1"], None)
