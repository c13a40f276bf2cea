"""``python -m mpack.serving``: the server without the mpack CLI (typer, rich, onnx), for a slim image.

Configuration comes from ``--config`` / MPACK_SERVE_CONFIG, MODEL arguments and the MPACK_SERVE_* variables; the
full set of flags is ``mpack serve``'s.
"""

from __future__ import annotations

import argparse
import sys

from mpack.serving import ServeConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpack.serving", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="PATH, NAME=PATH or NAME:VERSION=PATH")
    parser.add_argument("--config", help="deployment file (YAML or JSON)")
    parser.add_argument("--host")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--grpc-port")
    parser.add_argument("--queue", help="Redis URL for the job endpoints (POST /v2/models/{m}/jobs)")
    args = parser.parse_args(argv)
    from pathlib import Path

    try:
        config = load_config(tuple(args.models), config_file=Path(args.config) if args.config else None,
                             overrides={"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
                                        "queue": args.queue})
        from mpack.serving.server import serve

        return serve(config)
    except ServeConfigError as exc:
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
