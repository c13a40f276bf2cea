"""The image's Python packages: mpack's own wheel plus the serving runtime's dependency closure, every one pinned
by exact version and sha256, downloaded on the host for the image's platform and Python.

The build then installs them with ``pip install --no-index --require-hashes`` from the context, so it needs no
network at all. Resolving is the only step that reaches an index; its result (the lock) is cached by a key of
everything it depends on, so the same inputs give the same lock and wheels without asking the index again.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mpack.errors import DockerError, InputFileError

LOCK_SCHEMA = 1


@dataclass(frozen=True)
class LockedWheel:
    """One wheel of the image, pinned: ``name==version --hash=sha256:...``."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int

    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get("MPACK_CACHE_DIR"):
        return Path(os.environ["MPACK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpack"


def wheel_metadata(path: Path):
    """The METADATA of a wheel, as an email.message.Message (Requires-Dist, Provides-Extra, ...)."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return email.parser.Parser().parsestr(zf.read(name).decode("utf-8"))


def locked_wheel(path: Path) -> LockedWheel:
    meta = wheel_metadata(path)
    return LockedWheel(name=canonical_name(meta["Name"]), version=meta["Version"], filename=path.name,
                       sha256=sha256_file(path), size=path.stat().st_size)


def _run_pip(args: list[str], what: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DockerError(f"{what}: pip took longer than {timeout:.0f} s", hint="check the package index") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        error = next((ln for ln in lines if ln.startswith("ERROR:")), lines[-1] if lines else "pip failed")
        raise DockerError(f"{what}: {error.removeprefix('ERROR: ')}",
                          hint="the index must offer wheels for the image's platform and Python "
                               "(--only-binary): check the pins and the index", details=tuple(lines[-15:]))
    return proc


def mpack_source_tree() -> Path | None:
    """The source checkout mpack runs from (editable or in-tree), or None for an installed wheel."""
    import importlib.metadata

    try:
        direct = importlib.metadata.distribution("mpack").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        direct = None
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://") and (Path(url[7:]) / "pyproject.toml").is_file():
            return Path(url[7:])
    here = Path(__file__).resolve().parents[3]
    return here if (here / "pyproject.toml").is_file() and (here / "src" / "mpack").is_dir() else None


def build_mpack_wheel(dest: Path, version: str) -> Path:
    """mpack's own wheel: built from the source tree (hatchling builds are reproducible: fixed timestamps, sorted
    entries, so the same tree gives the same bytes), else the released wheel of this version from the index.
    ``MPACK_WHEEL`` names a ready wheel instead."""
    dest.mkdir(parents=True, exist_ok=True)
    if os.environ.get("MPACK_WHEEL"):
        given = Path(os.environ["MPACK_WHEEL"])
        if not given.is_file():
            raise InputFileError(f"MPACK_WHEEL {given} does not exist", hint="unset it or point it at a wheel")
        shutil.copy2(given, dest / given.name)
        return dest / given.name
    tree = mpack_source_tree()
    if tree is not None:
        # --no-build-isolation when hatchling is here (the dev extra), so no index is needed for the build backend.
        import importlib.util

        isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
        _run_pip(["wheel", "--no-deps", "-q", *isolation, "-w", str(dest), str(tree)], "building mpack's wheel")
    else:
        _run_pip(["download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), f"mpack=={version}"],
                 "downloading mpack's wheel")
    found = sorted(dest.glob("mpack-*.whl"))
    if len(found) != 1:
        raise DockerError(f"expected one mpack wheel in {dest}, found {len(found)}")
    return found[0]


_REQ_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*\(?([^;)]*)\)?\s*(?:;(.*))?$")


def parse_requirement(text: str) -> tuple[str, str, str, str | None]:
    """A Requires-Dist line → (canonical name, "[extras]" or "", specifier without spaces, the extra it belongs
    to or None). Markers other than ``extra == ...`` are kept out of scope: mpack's metadata has none."""
    match = _REQ_RE.match(text)
    if not match:
        raise DockerError(f"cannot read the requirement {text!r} in mpack's metadata")
    name, extras, specifier, marker = match.groups()
    extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker or "")
    return (canonical_name(name), (extras or "").replace(" ", ""), specifier.replace(" ", ""),
            extra.group(1) if extra else None)


def runtime_requirements(mpack_wheel: Path, serve_extra: str, runtime_extra: str, runtime_distribution: str,
                         runtime_extras: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the image needs, read from mpack's own wheel metadata so it never drifts from pyproject.toml.

    Returns:
        (requirements, constraints): the ``serve`` extra's requirements plus the ONNX Runtime pin of the variant's
        extra (with its own extras, e.g. ``onnxruntime-gpu[cuda,cudnn]``); and mpack's exact core pins as
        constraints, so a package the image shares with mpack's core (numpy, protobuf) gets the tested version.
        mpack's core itself (typer, rich, onnx, ...) is not installed: the server does not use it.
    """
    meta = wheel_metadata(mpack_wheel)
    requirements, constraints = [], []
    runtime = None
    for text in meta.get_all("Requires-Dist") or []:
        name, extras_text, specifier, extra = parse_requirement(text)
        if extra is None:
            if specifier.startswith("==") and "," not in specifier:
                constraints.append(f"{name}{specifier}")
        elif extra == serve_extra:
            requirements.append(f"{name}{extras_text}{specifier}")
        elif extra == runtime_extra and name == canonical_name(runtime_distribution):
            runtime = (name, specifier)
    if not requirements:
        raise DockerError(f"mpack's metadata has no '{serve_extra}' extra: the image would have no server stack",
                          hint="mpack's pyproject.toml must declare the serving runtime's dependencies as "
                               f"[project.optional-dependencies] {serve_extra}")
    if runtime is None:
        raise DockerError(f"mpack's metadata has no {runtime_distribution} pin in its '{runtime_extra}' extra",
                          hint="mpack's pyproject.toml and resources/compat.json disagree")
    extras = f"[{','.join(runtime_extras)}]" if runtime_extras else ""
    requirements.append(f"{runtime[0]}{extras}{runtime[1]}")
    return tuple(sorted(set(requirements))), tuple(sorted(set(constraints)))


def target_args(platforms: tuple[str, ...], python: str) -> list[str]:
    """pip options selecting wheels for the image (not this machine): binary only, its platforms, its CPython."""
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", "cp" + python.replace(".", "")]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def resolve(requirements: tuple[str, ...], constraints: tuple[str, ...], platforms: tuple[str, ...],
            python: str, cache_dir: Path) -> tuple[tuple[LockedWheel, ...], Path]:
    """Download the closure of ``requirements`` as wheels for the target platform and Python, and pin them.

    The result is cached under ``cache_dir/wheels/<key>``, the key being a hash of every input; a cached lock is
    re-verified against the wheels' sha256 before it is reused.

    Returns:
        (wheels sorted by name, the folder holding them).
    """
    key_doc = json.dumps({"schema": LOCK_SCHEMA, "requirements": requirements, "constraints": constraints,
                          "platforms": platforms, "python": python}, sort_keys=True)
    key = hashlib.sha256(key_doc.encode()).hexdigest()[:24]
    folder = cache_dir / "wheels" / key
    lock_path = folder / "lock.json"
    if lock_path.is_file():
        wheels = tuple(LockedWheel(**w) for w in json.loads(lock_path.read_text())["wheels"])
        if all((folder / w.filename).is_file() and sha256_file(folder / w.filename) == w.sha256 for w in wheels):
            return wheels, folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
    try:
        (staging / "constraints.txt").write_text("".join(f"{c}\n" for c in constraints))
        args = ["download", "-q", *target_args(platforms, python), "-d", str(staging),
                "-c", str(staging / "constraints.txt")]
        _run_pip(args + list(requirements),
                 "resolving the image's Python packages")
        (staging / "constraints.txt").unlink()
        wheels = tuple(sorted((locked_wheel(p) for p in staging.glob("*.whl")), key=lambda w: w.name))
        names = [w.name for w in wheels]
        if len(set(names)) != len(names):
            raise DockerError(f"the resolved wheels hold one package twice: {names}")
        (staging / "lock.json").write_text(json.dumps(
            {"schema": LOCK_SCHEMA, "inputs": json.loads(key_doc), "wheels": [asdict(w) for w in wheels]},
            indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheels, folder


def lock_text(wheels: tuple[LockedWheel, ...], header: str) -> str:
    """A pip requirements file with every line pinned by version and hash (``pip install --require-hashes``)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [w.requirement() for w in sorted(wheels, key=lambda w: w.name)]
    return "\n".join(lines) + "\n"
