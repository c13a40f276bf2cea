"""The package manifest ``<model>.mpack.json``: the provenance record every command appends to.

``convert`` creates it; later commands add an entry to ``history`` (and may set their own top-level section).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
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
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"manifest {path} is not valid JSON: {exc}",
                             hint="delete it and re-run mpack convert to rebuild it") from None


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file in the same directory, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
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


def publish(final_dir: Path, output: Path) -> None:
    """Rename a finished package from its private directory into place: data files first, then the model, then the
    manifest, so a reader never sees a model without its weights or a manifest without its model."""
    mpath = manifest_path_for(output)
    for item in final_dir.iterdir():
        if item.name not in (output.name, mpath.name):
            os.replace(item, output.parent / item.name)
    os.replace(final_dir / output.name, output)
    with contextlib.suppress(FileNotFoundError):
        os.replace(final_dir / mpath.name, mpath)
