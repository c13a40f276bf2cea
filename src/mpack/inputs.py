"""Seeded input feeds from tensor specs, and the size plans parity checks run on."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpack.errors import ConfigError, InputFileError, first_line
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
    other symbolic dim alternates between its example size and a second, larger size. A model whose batch dim is
    fixed still gets two cases when it has other symbolic dims (a frozen sequence length must show); a model with
    no symbolic dim gets one.
    """
    batch = batch_dim_name(specs)
    dims = symbolic_dim_names(specs)
    if not dims:
        return [SizeCase({})]
    count = len(batch_sizes) if batch else 2
    cases = []
    for i in range(count):
        sizes = {}
        for dim in dims:
            if dim == batch:
                sizes[dim] = batch_sizes[i]
            else:
                base = example_size(specs, dim)
                sizes[dim] = base if i % 2 == 0 else base + max(1, base // 2)
        cases.append(SizeCase(sizes))
    return cases


def random_feeds(specs: list[TensorSpec], sizes: dict[str, int], seed: int = 0,
                 int_high: int = 10) -> dict[str, np.ndarray]:
    """Seeded random inputs: normal floats, ints in ``[0, int_high)`` (0/1 for inputs named like masks), random
    bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = concrete_shape(spec, sizes)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif "mask" in spec.name.lower():
            # Attention masks are 0/1; keep the first position unmasked so no row is masked out entirely.
            mask = rng.integers(0, 2, shape)
            if mask.ndim:
                mask[..., 0] = 1
            feeds[spec.name] = mask.astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, int_high, shape).astype(dtype)
    return feeds


def load_samples(path: Path, specs: list[TensorSpec], what: str = "--data") -> list[dict[str, np.ndarray]]:
    """Read input samples from a ``.npz`` file or a directory of ``.npz`` / ``.npy`` files, checked against specs.

    An ``.npz`` file holds one array per input name; a directory holds one feed per file (``.npy`` only for
    single-input models). Every feed is checked for names, dtypes, ranks and fixed sizes.

    Raises:
        InputFileError: the path is missing, unreadable or empty.
        ConfigError: a feed does not match the model's inputs.
    """
    if not path.exists():
        raise InputFileError(f"{what} {path} does not exist", hint="give a .npz file or a directory of .npz/.npy")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
    feeds: list[dict[str, np.ndarray]] = []
    for file in files:
        try:
            if file.suffix == ".npy":
                if len(specs) != 1:
                    raise ConfigError(what, str(file), f"a .npy file feeds one input, the model has {len(specs)}",
                                      hint="use .npz files keyed by input name")
                feeds.append({specs[0].name: np.load(file, allow_pickle=False)})
            else:
                with np.load(file, allow_pickle=False) as archive:
                    feeds.append({k: archive[k] for k in archive.files})
        except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile) as exc:
            raise InputFileError(f"{what} {file} is not an .npz (or .npy) file of arrays ({first_line(exc)})",
                                 hint="save it with numpy.savez(path, input_name=array, ...)") from None
    pairs = [(feed, file) for feed, file in zip(feeds, files) if feed]
    if not pairs:
        raise InputFileError(f"{what} {path} holds no samples", hint="write arrays keyed by input name with np.savez")
    from mpack.backends.base import check_feeds

    for feed, file in pairs:
        try:
            check_feeds(specs, feed, "the model")
        except ConfigError as exc:
            raise ConfigError(what, str(file), f"does not fit the model's inputs: {exc.message}",
                              hint="the inputs are: " + " ".join(str(s) for s in specs)) from None
    return [feed for feed, _ in pairs]


def random_samples(specs: list[TensorSpec], count: int, batch: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` seeded random feeds at batch size ``batch`` (other symbolic dims at their example sizes)."""
    sizes = export_sizes(specs)
    name = batch_dim_name(specs)
    if name:
        sizes[name] = batch
    return [random_feeds(specs, sizes, seed=seed + i) for i in range(count)]


def sample_count(feeds: list[dict[str, np.ndarray]]) -> int:
    """Samples in a list of feeds: the length of each feed's first input along its batch axis."""
    return sum(len(next(iter(f.values()))) if next(iter(f.values())).ndim else 1 for f in feeds)


def sha256_samples(feeds: list[dict[str, np.ndarray]]) -> str:
    """A digest of sample data (names, dtypes, shapes and bytes), for the manifest."""
    import hashlib

    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name}:{array.dtype.name}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()
