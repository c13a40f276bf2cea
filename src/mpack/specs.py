"""Tensor specifications: names, dtypes and shapes with symbolic dimensions.

A spec is written on the command line as ``name:shape:dtype``, e.g. ``pixels:batch,3,32,32:float32`` or
``tokens:batch,seq=16:int64``. A shape entry is an integer (fixed), a name (symbolic) or ``name=N`` (symbolic, with
``N`` as the example size used for export and parity). The dtype defaults to float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mpack.errors import ConfigError

Dim = int | str

# Example sizes for symbolic dims when none is given. N.B. export examples avoid 0 and 1: torch.export specialises
# a dim whose example size is 1 (the "0/1 specialisation"), which would freeze it.
DEFAULT_DIM_EXAMPLE = 8
EXPORT_BATCH = 2

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DTYPES = {
    "float32": np.float32, "float": np.float32, "fp32": np.float32,
    "float16": np.float16, "fp16": np.float16, "half": np.float16,
    "float64": np.float64, "double": np.float64,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}

# ONNX TensorProto element types (onnx.TensorProto.*) to numpy dtype names, kept as data so this module does not
# import onnx.
ONNX_ELEM_TO_DTYPE = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                      10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}

ORT_TYPE_TO_DTYPE = {f"tensor({k})": v for k, v in {
    "float": "float32", "float16": "float16", "double": "float64", "int64": "int64", "int32": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor with a dtype and a shape whose entries are ints (fixed) or names (symbolic).

    Args:
        name: Tensor name.
        shape: One entry per axis: an int, or a str naming a symbolic dim.
        dtype: numpy dtype name, e.g. "float32".
        examples: Example sizes for symbolic dims, by dim name. Defaults to none (8 is used).
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    examples: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def symbolic_dims(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str)]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def __str__(self) -> str:
        return f"{self.name}:{','.join(str(d) for d in self.shape)}:{self.dtype}"


def parse_dtype(text: str, where: str = "dtype") -> str:
    key = text.strip().lower()
    if key not in DTYPES:
        raise ConfigError(where, text, "unknown dtype", hint=f"use one of {', '.join(sorted(set(DTYPES)))}")
    return np.dtype(DTYPES[key]).name


def parse_input_spec(text: str) -> TensorSpec:
    """Parse ``name:shape[:dtype]`` into a :class:`TensorSpec`.

    Raises:
        ConfigError: naming the part that does not parse.
    """
    hint = "write --input NAME:SHAPE[:DTYPE], e.g. --input pixels:batch,3,32,32:float32"
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError("--input", text, "expected NAME:SHAPE[:DTYPE]", hint=hint)
    name, shape_text = parts[0].strip(), parts[1].strip()
    if not _NAME.match(name):
        raise ConfigError("--input", text, f"'{name}' is not a valid tensor name", hint=hint)
    dtype = parse_dtype(parts[2], "--input dtype") if len(parts) == 3 else "float32"
    shape: list[Dim] = []
    examples: dict[str, int] = {}
    for raw in shape_text.split(","):
        entry = raw.strip()
        dim_name, _, example = entry.partition("=")
        if entry.isdigit():
            if int(entry) < 1:
                raise ConfigError("--input", text, f"dimension {entry} must be at least 1", hint=hint)
            shape.append(int(entry))
        elif _DIM_NAME.match(dim_name) and (not example or (example.isdigit() and int(example) >= 1)):
            shape.append(dim_name)
            if example:
                examples[dim_name] = int(example)
        else:
            raise ConfigError("--input", text, f"shape entry '{entry}' is neither a size, a name nor NAME=SIZE",
                              hint=hint)
    return TensorSpec(name, tuple(shape), dtype, examples)


def with_dynamic_batch(spec: TensorSpec, batch_name: str = "batch") -> TensorSpec:
    """Make axis 0 symbolic (named ``batch_name``) if it is fixed; scalars stay as they are."""
    if not spec.shape or isinstance(spec.shape[0], str):
        return spec
    return TensorSpec(spec.name, (batch_name, *spec.shape[1:]), spec.dtype, dict(spec.examples))


def symbolic_dim_names(specs: list[TensorSpec]) -> list[str]:
    names: list[str] = []
    for spec in specs:
        names += [d for d in spec.symbolic_dims if d not in names]
    return names


def batch_dim_name(specs: list[TensorSpec]) -> str | None:
    """The symbolic dim taken as the batch axis: the one on axis 0 of the inputs, if any."""
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], str):
            return spec.shape[0]
    return None


def example_size(specs: list[TensorSpec], dim: str) -> int:
    for spec in specs:
        if dim in spec.examples:
            return spec.examples[dim]
    return DEFAULT_DIM_EXAMPLE


def concrete_shape(spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes[d] for d in spec.shape)
