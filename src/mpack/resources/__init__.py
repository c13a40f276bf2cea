"""Data files that ship with mpack: compatibility tables (``*.json`` here) and the image templates.

N.B. ``templates/`` lives at the repository root and is force-included into the wheel as ``mpack/templates``
(pyproject.toml); from a source checkout (editable install) it is read in place.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path


def templates_dir() -> Path:
    """The folder holding the ``build-image`` templates, in a wheel or in a source checkout."""
    packaged = Path(str(resources.files("mpack"))) / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "templates"


@functools.lru_cache(maxsize=None)
def load_json(name: str) -> dict:
    """A JSON table shipped in ``mpack/resources`` (e.g. ``compat.json``), parsed once."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
