"""Seeded input feeds from tensor specs, and the size plans parity checks run on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpack.specs import (EXPORT_BATCH, TensorSpec, batch_dim_name, concrete_shape, example_size,
                         symbolic_dim_names)

DEFAULT_BATCH_SIZES = (1, 4)


@dataclass(frozen=True)
class SizeCase:
    """One assignment of sizes to symbolic dims, e.g. ``batch=4 seq=12``."""

    sizes: dict[str, int]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.sizes.items()) or "static"


def export_sizes(specs: list[TensorSpec]) -> dict[str, int]:
    """Sizes for the export example: batch 2 and each other symbolic dim at its example size."""
    batch = batch_dim_name(specs)
    return {d: (EXPORT_BATCH if d == batch else example_size(specs, d)) for d in symbolic_dim_names(specs)}


def parity_cases(specs: list[TensorSpec], batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES) -> list[SizeCase]:
    """Size cases that tell a truly dynamic export from one that froze a dim.

    Each case differs from the others in every symbolic dim: the batch dim takes each of ``batch_sizes`` and every
    other symbolic dim alternates between its example size and a second, larger size.
    """
    batch = batch_dim_name(specs)
    dims = symbolic_dim_names(specs)
    if not dims:
        return [SizeCase({})]
    cases = []
    for i, batch_size in enumerate(batch_sizes):
        sizes = {}
        for dim in dims:
            if dim == batch:
                sizes[dim] = batch_size
            else:
                base = example_size(specs, dim)
                sizes[dim] = base if i % 2 == 0 else base + max(1, base // 2)
        cases.append(SizeCase(sizes))
    return cases


def random_feeds(specs: list[TensorSpec], sizes: dict[str, int], seed: int = 0,
                 int_high: int = 10) -> dict[str, np.ndarray]:
    """Seeded random inputs: normal floats, ints in ``[0, int_high)``, random bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = concrete_shape(spec, sizes)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, int_high, shape).astype(dtype)
    return feeds
