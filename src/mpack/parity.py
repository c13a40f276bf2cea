"""Numerical parity: run two runners on the same feeds and compare every output.

The comparison math is pure (numpy only). Shape errors and value errors stay separate categories, and both fail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from mpack.errors import ConfigError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


@dataclass(frozen=True)
class Tolerance:
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL


@dataclass(frozen=True)
class Tolerances:
    """A global tolerance plus per-output overrides. An element passes when |out - ref| <= atol + rtol * |ref|,
    ``ref`` being the reference (source) value."""

    default: Tolerance = Tolerance()
    per_output: dict[str, Tolerance] = field(default_factory=dict)

    def for_output(self, name: str) -> Tolerance:
        return self.per_output.get(name, self.default)


def parse_tolerances(atol: list[str] | None, rtol: list[str] | None) -> Tolerances:
    """Build :class:`Tolerances` from ``--atol``/``--rtol`` values: ``1e-4`` (global) or ``NAME=1e-3``.

    A per-output value overrides only its own half; the other half comes from the global value.
    """
    glob = {"atol": DEFAULT_ATOL, "rtol": DEFAULT_RTOL}
    per: dict[str, dict[str, float]] = {}
    for kind, values in (("atol", atol or []), ("rtol", rtol or [])):
        for text in values:
            name, sep, number = text.rpartition("=")
            try:
                value = float(number)
            except ValueError:
                raise ConfigError(f"--{kind}", text, "is not a number",
                                  hint=f"write --{kind} 1e-4 or --{kind} OUTPUT=1e-3") from None
            if not value >= 0:
                raise ConfigError(f"--{kind}", text, "must be a number >= 0")
            if sep:
                per.setdefault(name, {})[kind] = value
            else:
                glob[kind] = value
    return Tolerances(Tolerance(**glob), {name: Tolerance(**{**glob, **v}) for name, v in per.items()})


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the candidate compares with the reference, in one size case."""

    case: str
    output: str
    shape_ref: tuple[int, ...]
    shape_out: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    nan_ref: int
    nan_out: int
    inf_ref: int
    inf_out: int
    atol: float
    rtol: float
    mismatched: int

    @property
    def shape_ok(self) -> bool:
        return self.shape_ref == self.shape_out

    @property
    def passed(self) -> bool:
        return self.shape_ok and self.mismatched == 0 and self.nan_out == self.nan_ref and self.inf_out == self.inf_ref

    @property
    def problem(self) -> str | None:
        if not self.shape_ok:
            return f"shape {list(self.shape_out)} != {list(self.shape_ref)}"
        if self.nan_out != self.nan_ref or self.inf_out != self.inf_ref:
            return "NaN/Inf counts differ"
        if self.mismatched:
            return f"{self.mismatched} values beyond tolerance"
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(shape_ref=list(self.shape_ref), shape_out=list(self.shape_out), passed=self.passed)
        return d


@dataclass
class ParityReport:
    """All comparisons of one parity check; truthy when every one passed."""

    reference: str
    candidate: str
    comparisons: list[OutputComparison] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (bool(self.comparisons) and not self.missing_outputs and not self.errors
                and all(c.passed for c in self.comparisons))

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> list[OutputComparison]:
        return [c for c in self.comparisons if not c.passed]

    def worst_per_output(self) -> dict[str, OutputComparison]:
        """The worst comparison of each output: a failure before a pass, then the largest max_abs."""
        worst: dict[str, OutputComparison] = {}
        for c in self.comparisons:
            if c.output not in worst or _badness(c) > _badness(worst[c.output]):
                worst[c.output] = c
        return worst

    def summary(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "passed": self.passed,
                "cases": sorted({c.case for c in self.comparisons}),
                "outputs": {name: {"max_abs": c.max_abs, "max_rel": c.max_rel, "atol": c.atol, "rtol": c.rtol,
                                   "passed": c.passed}
                            for name, c in self.worst_per_output().items()},
                "missing_outputs": self.missing_outputs, "errors": self.errors}

    def to_dict(self) -> dict:
        return {**self.summary(), "comparisons": [c.to_dict() for c in self.comparisons]}


def _badness(c: OutputComparison) -> tuple[bool, float]:
    return (not c.passed, float(np.nan_to_num(c.max_abs, nan=np.inf)))


def compare_arrays(case: str, name: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> OutputComparison:
    """Compare one output. Arrays of different shapes get a shape error and NaN figures."""
    ref, out = np.asarray(ref), np.asarray(out)
    counts = dict(nan_ref=_count(ref, np.isnan), nan_out=_count(out, np.isnan),
                  inf_ref=_count(ref, np.isinf), inf_out=_count(out, np.isinf))
    if ref.shape != out.shape:
        nan = float("nan")
        return OutputComparison(case, name, ref.shape, out.shape, nan, nan, nan, nan, **counts,
                                atol=tol.atol, rtol=tol.rtol, mismatched=max(ref.size, out.size))
    a, b = ref.astype(np.float64), out.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(a - b)
    diff = np.where(finite, diff, 0.0)
    rel = diff / np.maximum(np.abs(a), np.finfo(np.float64).tiny)
    allowed = tol.atol + tol.rtol * np.abs(a)
    # Non-finite values must agree exactly (NaN with NaN, +Inf with +Inf).
    nonfinite_bad = ~finite & ~((np.isnan(a) & np.isnan(b)) | (a == b))
    mismatched = int(np.count_nonzero((diff > allowed) & finite) + np.count_nonzero(nonfinite_bad))
    fa, fb = a[finite].ravel(), b[finite].ravel()
    norm = float(np.linalg.norm(fa) * np.linalg.norm(fb))
    cosine = float(fa @ fb / norm) if norm > 0 else (1.0 if not np.any(fa) and not np.any(fb) else 0.0)
    return OutputComparison(case, name, ref.shape, out.shape,
                            max_abs=float(diff.max(initial=0.0)), mean_abs=float(diff.mean()) if diff.size else 0.0,
                            max_rel=float(np.where(finite, rel, 0.0).max(initial=0.0)), cosine=cosine, **counts,
                            atol=tol.atol, rtol=tol.rtol, mismatched=mismatched)


def _count(array: np.ndarray, predicate) -> int:
    return int(np.count_nonzero(predicate(array))) if array.dtype.kind in "fc" else 0


def compare_outputs(report: ParityReport, case: str, reference: dict[str, np.ndarray],
                    candidate: dict[str, np.ndarray], tolerances: Tolerances) -> None:
    """Add the comparisons of one case to ``report``; outputs the candidate lacks are recorded as missing."""
    for name, ref in reference.items():
        if name not in candidate:
            if name not in report.missing_outputs:
                report.missing_outputs.append(name)
            continue
        report.comparisons.append(compare_arrays(case, name, ref, candidate[name], tolerances.for_output(name)))
