"""V2 inference requests and responses, and their REST encoding: JSON tensors and the binary-tensor extension.

Binary extension (Triton's, which tritonclient and perf_analyzer use by default): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors, in the order of the inputs whose
``parameters.binary_data_size`` is set; outputs asked for with ``parameters.binary_data: true`` (or the request's
``binary_data_output: true``) come back the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from mpack.serving.errors import InvalidInputError
from mpack.serving.model import DTYPES


@dataclass
class InferRequest:
    """A decoded request. ``outputs`` None: every output; else requested name → binary (REST only)."""

    model: str
    version: str | None
    inputs: dict[str, np.ndarray]
    id: str = ""
    outputs: dict[str, bool] | None = None
    binary_default: bool = False
    routing_key: str | None = None
    parameters: dict = field(default_factory=dict)  # the request's own, e.g. callback_url for a job


@dataclass
class InferResponse:
    model: str
    version: str
    outputs: dict[str, np.ndarray]
    id: str = ""
    route: str = "direct"
    extra: dict = field(default_factory=dict)


def decode_rest(body: bytes, header_length: int | None, model: str, version: str | None) -> InferRequest:
    """Parse a REST infer body (JSON, or JSON header + binary tensors).

    Raises:
        InvalidInputError: malformed JSON, a lying header length, data not matching the shape, ...
    """
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInputError(f"Inference-Header-Content-Length {header_length} exceeds the body's "
                                    f"{len(body)} bytes")
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header_bytes, binary = body, memoryview(b"")
    try:
        header = json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"malformed JSON request: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInputError("the request must be a JSON object with an inputs list")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError("the request needs a non-empty inputs list")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInputError("every input needs a name, a datatype, a shape and data")
        name = item["name"]
        if name in inputs:
            raise InvalidInputError(f"input {name} is given twice")
        dtype = _dtype(name, item.get("datatype"))
        shape = _shape(name, item.get("shape"))
        count = math.prod(shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise InvalidInputError(f"input {name}: binary_data_size {size!r} is not a byte count")
            if offset + size > len(binary):
                raise InvalidInputError(f"input {name}: binary_data_size {size} runs past the end of the body "
                                        f"({len(binary) - offset} bytes left)")
            if size != count * dtype.itemsize:
                raise InvalidInputError(f"input {name}: {size} bytes of binary data, shape {list(shape)} of "
                                        f"{item['datatype']} needs {count * dtype.itemsize}")
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
            if not array.flags.aligned:  # the JSON header's length decides the offset: copy to aligned memory
                array = array.copy()
            offset += size
        else:
            if "data" not in item:
                raise InvalidInputError(f"input {name} has neither data nor parameters.binary_data_size")
            array = _from_json(name, item["data"], dtype, shape, count)
        inputs[name] = array
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes of binary data after the last binary input: the "
                                "Inference-Header-Content-Length or a binary_data_size is wrong")

    params = header.get("parameters") or {}
    binary_default = bool(params.get("binary_data_output")) if isinstance(params, dict) else False
    outputs = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInputError("outputs must be a list of {name: ...}")
        outputs = {}
        for item in raw_outputs:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInputError("every requested output needs a name")
            out_params = item.get("parameters") or {}
            outputs[item["name"]] = bool(out_params.get("binary_data", binary_default)) \
                if isinstance(out_params, dict) else binary_default
    request_id = header.get("id", "")
    return InferRequest(model=model, version=version, inputs=inputs, id=str(request_id) if request_id else "",
                        outputs=outputs, binary_default=binary_default,
                        parameters=params if isinstance(params, dict) else {})


def _dtype(name: str, datatype) -> np.dtype:
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInputError(f"input {name}: datatype {datatype!r} is not served",
                                hint=f"one of {', '.join(DTYPES)}")
    return dtype


def _shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InvalidInputError(f"input {name}: shape {shape!r} is not a list of sizes >= 0")
    return tuple(shape)


def _from_json(name: str, data, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInputError(f"input {name}: data is not a (nested) list of {dtype.name} values: "
                                f"{str(exc).splitlines()[0]}") from None
    if array.size != count:
        raise InvalidInputError(f"input {name}: {array.size} values, shape {list(shape)} needs {count}")
    return array.reshape(shape)


def encode_rest(response: InferResponse, request: InferRequest,
                output_specs: dict[str, str]) -> tuple[bytes, int | None]:
    """The REST body of a response, and the JSON header length when any output is binary (else None).

    Args:
        response: Outputs of the request.
        request: For the requested outputs and their binary flags.
        output_specs: Output name → V2 datatype.
    """
    wanted = request.outputs if request.outputs is not None else \
        {name: request.binary_default for name in response.outputs}
    entries, blobs = [], []
    for name, binary in wanted.items():
        array = response.outputs[name]
        entry = {"name": name, "datatype": output_specs[name], "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    # N.B. never write "parameters": null or "id": "" - perf_analyzer's parser breaks on null parameters.
    header = {"model_name": response.model, "model_version": response.version}
    if response.id:
        header["id"] = response.id
    header["outputs"] = entries
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
