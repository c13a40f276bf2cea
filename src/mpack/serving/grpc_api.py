"""The gRPC side: ``inference.GRPCInferenceService`` on grpc.aio (the fastest Python gRPC mode measured here),
sharing the event loop and the engine with the REST app.

The messages come from v2.proto (v2_pb2.py, generated once and committed; see the .proto's header for why). The
handlers are registered under the published service name, so the RPC paths are the ones tritonclient and
perf_analyzer call, whatever the proto package is called.
"""

from __future__ import annotations

import logging
import math

import grpc
import numpy as np

from mpack.serving import v2_pb2 as pb
from mpack.serving.engine import Engine
from mpack.serving.errors import InvalidInputError, ServingError
from mpack.serving.http_api import EXTENSIONS, server_version
from mpack.serving.model import DTYPES
from mpack.serving.protocol import InferRequest, InferResponse

log = logging.getLogger("mpack.serving")

SERVICE = "inference.GRPCInferenceService"
# V2 datatype → the InferTensorContents field that carries it (FP16 has none: it must come as raw bytes).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}
TYPE_ENUM = {name: getattr(pb, "TYPE_" + name) for name in DTYPES}


def decode_request(message: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest → InferRequest (raw_input_contents or typed contents).

    Raises:
        InvalidInputError: on any mismatch between datatypes, shapes and data.
    """
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs")
    if not message.inputs:
        raise InvalidInputError("the request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if name in inputs:
            raise InvalidInputError(f"input {name} is given twice")
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInputError(f"input {name}: datatype {tensor.datatype!r} is not served",
                                    hint=f"one of {', '.join(DTYPES)}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidInputError(f"input {name}: shape {list(shape)} has a negative size")
        count = math.prod(shape)
        if raw:
            data = raw[index]
            if len(data) != count * dtype.itemsize:
                raise InvalidInputError(f"input {name}: {len(data)} bytes of raw data, shape {list(shape)} of "
                                        f"{tensor.datatype} needs {count * dtype.itemsize}")
            array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)
            if not array.flags.aligned:
                array = array.copy()
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidInputError(f"input {name}: {tensor.datatype} must be sent as raw_input_contents")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise InvalidInputError(f"input {name}: {len(values)} values, shape {list(shape)} needs {count}")
            try:
                array = np.array(values, dtype=dtype).reshape(shape)
            except (ValueError, OverflowError) as exc:
                raise InvalidInputError(f"input {name}: {exc}") from None
        inputs[name] = array
    outputs = {o.name: True for o in message.outputs} if message.outputs else None
    return InferRequest(model=message.model_name, version=message.model_version or None, inputs=inputs,
                        id=message.id, outputs=outputs)


def encode_response(response: InferResponse, output_types: dict[str, str]) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for name, array in response.outputs.items():
        message.outputs.add(name=name, datatype=output_types[name], shape=array.shape)
        message.raw_output_contents.append(
            np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return message


class _Service:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=self.engine.live)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.engine.ready)

    async def model_ready(self, request, context):
        return pb.ModelReadyResponse(ready=self.engine.model_ready(request.name, request.version or None))

    async def server_metadata(self, request, context):
        return pb.ServerMetadataResponse(name="mpack", version=server_version(), extensions=EXTENSIONS)

    async def model_metadata(self, request, context):
        try:
            meta = self.engine.metadata(request.name, request.version or None)
        except ServingError as exc:
            await _abort(context, exc)
        response = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for tensor in meta[kind]:
                getattr(response, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    async def model_config(self, request, context):
        try:
            config = self.engine.model_config(request.name, request.version or None)
        except ServingError as exc:
            await _abort(context, exc)
        message = pb.ModelConfig(name=config["name"], platform=config["platform"], backend=config["backend"],
                                 max_batch_size=config["max_batch_size"])
        for item in config["input"]:
            message.input.add(name=item["name"], data_type=TYPE_ENUM[item["data_type"][5:]], dims=item["dims"])
        for item in config["output"]:
            message.output.add(name=item["name"], data_type=TYPE_ENUM[item["data_type"][5:]], dims=item["dims"])
        if "dynamic_batching" in config:
            batching = config["dynamic_batching"]
            message.dynamic_batching.preferred_batch_size.extend(batching["preferred_batch_size"])
            message.dynamic_batching.max_queue_delay_microseconds = batching["max_queue_delay_microseconds"]
        return pb.ModelConfigResponse(config=message)

    async def _infer(self, message: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        request = decode_request(message)
        key_header = self.engine.key_header(request.model)
        if key_header is not None:
            request.routing_key = next((v for k, v in context.invocation_metadata() or () if k == key_header), None)
        response = await self.engine.infer(request)
        return encode_response(response, self.engine.output_types(response.model, response.version))

    async def model_infer(self, message, context):
        try:
            return await self._infer(message, context)
        except ServingError as exc:
            await _abort(context, exc)
        except Exception as exc:  # a bug: INTERNAL, logged, the server keeps serving
            log.exception("internal error in ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    async def model_stream_infer(self, request_iterator, context):
        # Errors go into the stream (error_message), as Triton does, so one bad request does not end the stream.
        async for message in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(message, context))
            except ServingError as exc:
                yield pb.ModelStreamInferResponse(error_message=_text(exc))
            except Exception as exc:
                log.exception("internal error in ModelStreamInfer")
                yield pb.ModelStreamInferResponse(error_message=f"internal error: {type(exc).__name__}: {exc}")


def _text(exc: ServingError) -> str:
    return f"{exc.message} ({exc.hint})" if exc.hint else exc.message


async def _abort(context, exc: ServingError):
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), _text(exc))


def make_grpc_server(engine: Engine, *, max_request_bytes: int, max_concurrent_rpcs: int | None = None) \
        -> grpc.aio.Server:
    """A grpc.aio server with the V2 service registered; add a port and start it on the running loop. Past
    ``max_concurrent_rpcs`` RPCs in flight, new ones fail RESOURCE_EXHAUSTED. Defaults to no limit."""
    service = _Service(engine)

    def unary(fn, request_type, response_type):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)

    handlers = {
        "ServerLive": unary(service.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(service.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": unary(service.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": unary(service.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": unary(service.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": unary(service.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelInfer": unary(service.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            service.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString),
    }
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.max_send_message_length", max(max_request_bytes, 64 * 1024 * 1024)),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it silently
    ], maximum_concurrent_rpcs=max_concurrent_rpcs)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return server
