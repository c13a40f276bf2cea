"""The package manifest ``<model>.mpack.json``: the provenance record every command appends to.

``convert`` creates it; later commands add an entry to ``history`` (and may set their own top-level section).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import contextlib
import os
import tempfile
from pathlib import Path

from mpack.errors import InputFileError

SCHEMA = 1


def manifest_path_for(model: Path) -> Path:
    """``model.onnx`` → ``model.mpack.json`` (in the same directory)."""
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{stem}.mpack.json")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load(model: Path) -> dict | None:
    """The manifest beside ``model``, or None when there is none."""
    path = manifest_path_for(model)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"manifest {path} is not valid JSON: {exc}",
                             hint="delete it and re-run mpack convert to rebuild it") from None
    if not _well_formed(data):
        raise InputFileError(f"manifest {path} is not an mpack manifest (unexpected structure)",
                             hint="delete it and re-run mpack convert to rebuild it")
    return data


# The sections later commands read, and the JSON type each must have when present.
_SECTIONS = {"model": dict, "source": dict, "framework": dict, "inputs": list, "outputs": list, "history": list}


def _well_formed(data: object) -> bool:
    if not isinstance(data, dict):
        return False
    if any(key in data and not isinstance(data[key], kind) for key, kind in _SECTIONS.items()):
        return False
    tensors = data.get("inputs", []) + data.get("outputs", [])
    return all(isinstance(t, dict) and "name" in t and isinstance(t.get("shape"), list) for t in tensors)


def finite(value):
    """``value`` with NaN and ±Inf floats replaced by None: strict JSON (jq and most parsers reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file in the same directory, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a published file gets the mode any new file would (0644 under umask 022).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            json.dump(finite(data), fh, indent=2, sort_keys=False, default=str, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_step(model: Path, step: str, record: dict) -> dict:
    """Append ``{"step": step, "at": ..., **record}`` to the manifest's history (creating a minimal one)."""
    data = load(model) or {"schema": SCHEMA, "model": {"path": model.name}, "history": []}
    data.setdefault("history", []).append({"step": step, "at": now(), **record})
    write_atomic(manifest_path_for(model), data)
    return data


def check_output(output: Path, example: str, source: Path | None = None) -> None:
    """The checks every command that writes a model makes on ``-o`` before doing any work.

    Raises:
        ConfigError: not a .onnx name, a missing directory, a directory, or the input model itself.
    """
    from mpack.errors import ConfigError

    if not output.name.endswith(".onnx"):
        raise ConfigError("--output", str(output), "must end in .onnx", hint=f"e.g. -o {example}")
    if not output.parent.is_dir():
        raise ConfigError("--output", str(output), f"directory {output.parent} does not exist",
                          hint=f"create it first: mkdir -p {output.parent}")
    if output.is_dir():
        raise ConfigError("--output", str(output), "is a directory", hint="name the .onnx file to write")
    if source is not None and source.exists() and output.exists() and output.resolve() == source.resolve():
        raise ConfigError("--output", str(output), "is the input model", hint=f"write it beside, e.g. -o {example}")


def private_dir(output: Path) -> Path:
    """A new private directory beside ``output`` to build it in (same filesystem, so publishing is a rename).

    Raises:
        ConfigError: the output's directory cannot be written.
    """
    try:
        return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.mpack-"))
    except OSError as exc:
        from mpack.errors import ConfigError

        raise ConfigError("--output", str(output), f"cannot be written: {exc.strerror}",
                          hint="choose a directory you can write to") from None


def publish(final_dir: Path, output: Path) -> None:
    """Rename a finished package from its private directory into place: data files first, then the model, then the
    manifest, so a reader never sees a model without its weights or a manifest without its model. A weights file
    an earlier run left under our name (``<model>.onnx.data``) that the new model no longer uses is removed."""
    mpath = manifest_path_for(output)
    moved = set()
    for item in list(final_dir.iterdir()):
        if item.name not in (output.name, mpath.name):
            os.replace(item, output.parent / item.name)
            moved.add(item.name)
    os.replace(final_dir / output.name, output)
    stale = output.parent / f"{output.name}.data"
    if stale.name not in moved and stale.exists() and not _referenced(output, stale.name):
        stale.unlink()
    with contextlib.suppress(FileNotFoundError):
        os.replace(final_dir / mpath.name, mpath)


def _referenced(model: Path, name: str) -> bool:
    from mpack.onnx_io import external_files, load_graph

    return name in external_files(load_graph(model))
