"""The runner protocol every backend implements.

After Polygraphy's runners: a runner is a context manager that activates lazily (the model is loaded on
``activate``), checks feeds against its input specs before running, and returns outputs by name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mpack.errors import ConfigError
from mpack.specs import TensorSpec


@runtime_checkable
class Runner(Protocol):
    name: str

    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    def input_specs(self) -> list[TensorSpec]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...


class BaseRunner:
    """Context-manager plumbing and feed checking shared by the runners.

    Subclasses implement ``_activate``, ``_infer`` and ``input_specs`` (and ``_deactivate`` when they hold
    resources).
    """

    name = "runner"

    def __init__(self) -> None:
        self.active = False

    def activate(self) -> None:
        if not self.active:
            self._activate()
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            self.activate()
        check_feeds(self.input_specs(), feeds, self.name)
        return self._infer(feeds)

    def input_specs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def check_feeds(specs: list[TensorSpec], feeds: dict[str, np.ndarray], where: str) -> None:
    """Check names, ranks, fixed sizes and dtypes of ``feeds`` against ``specs``."""
    expected = {s.name for s in specs}
    missing, extra = expected - set(feeds), set(feeds) - expected
    if missing or extra:
        raise ConfigError("inputs", sorted(feeds), f"{where} expects inputs {sorted(expected)}"
                          + (f"; missing {sorted(missing)}" if missing else "")
                          + (f"; unknown {sorted(extra)}" if extra else ""))
    for spec in specs:
        array = feeds[spec.name]
        if array.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape)):
            raise ConfigError(f"input {spec.name}", list(array.shape),
                              f"{where} expects shape {list(spec.shape)}")
        if array.dtype.name != spec.dtype:
            raise ConfigError(f"input {spec.name}", array.dtype.name, f"{where} expects dtype {spec.dtype}")
