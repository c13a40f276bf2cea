"""PyTorch runner: calls a module (or an exported program's module) on named inputs, in eval mode."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mpack._optional import require
from mpack.backends.base import BaseRunner
from mpack.specs import TensorSpec


def flatten_outputs(value) -> list:
    """Tensors of a model's output in order: a tensor, or nested tuples/lists/dicts of them."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    return [value]


class TorchRunner(BaseRunner):
    """Runs a PyTorch callable with positional inputs in the order of ``specs``.

    Args:
        load: Returns the module to call; called once, on activation.
        specs: The model's inputs, in forward-argument order.
        output_names: Names given to the flattened outputs, in order.
    """

    name = "torch"

    def __init__(self, load: Callable[[], object], specs: list[TensorSpec], output_names: list[str]):
        super().__init__()
        self.load = load
        self.specs = specs
        self.output_names = output_names
        self.module = None

    def _activate(self) -> None:
        self.module = self.load()

    def _deactivate(self) -> None:
        self.module = None

    def input_specs(self) -> list[TensorSpec]:
        return self.specs

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = require("torch")
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.specs]
        with torch.no_grad():
            outputs = flatten_outputs(self.module(*args))
        return {name: out.detach().cpu().numpy() for name, out in zip(self.output_names, outputs)}
