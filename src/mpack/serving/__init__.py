"""``mpack serve``: an Open Inference Protocol V2 server (REST + gRPC) for ONNX models, with dynamic batching and
canary / shadow / A-B routing.

This package is the runtime of the serving image: it imports only numpy, onnxruntime and the server stack
(uvicorn, httptools, grpcio, protobuf; PyYAML for YAML deployment files; redis for the job endpoints of ``--queue``),
never the rest of mpack. Heavy modules load on first use, so importing it is cheap. ``jobs.py`` is the Redis Streams
queue and worker that ``mpack.queue`` re-exports.

Public API::

    from mpack.serving import load_config, serve, ServerThread
    config = load_config(("cnn=cnn.onnx",), overrides={"http_port": 8000})
    serve(config)                       # blocks until SIGTERM, then drains
    with ServerThread(config) as s:     # or in a background thread
        ...

Also ``python -m mpack.serving --config mpack.deploy.yaml`` (no typer/rich needed in the image).
"""

from __future__ import annotations

from mpack.serving.config import (
    ABSpec, BatchingSpec, CanarySpec, ModelSpec, RollbackSpec, ServeConfig, ShadowSpec, load_config)
from mpack.serving.errors import ServeConfigError, ServingError

__all__ = ["ABSpec", "BatchingSpec", "CanarySpec", "ModelSpec", "RollbackSpec", "ServeConfig", "ShadowSpec",
           "ServeConfigError", "ServerThread", "ServingError", "load_config", "serve"]


def __getattr__(name: str):
    # serve / ServerThread pull in uvicorn, grpc and onnxruntime: only when asked for.
    if name in ("serve", "ServerThread", "run_server"):
        from mpack.serving import server

        return getattr(server, name)
    raise AttributeError(name)
