# Rendered by mpack 0.1.0 (cpu variant). Edit the template, not this file.
# Hermetic: every Python package is pinned by version and sha256 (requirements.lock, mpack.lock) and its wheel is
# in this folder, so it builds with no network:  docker build --network none -t NAME:VERSION .
# Base image python:3.11-slim-bookworm, pinned as python@sha256:1111111111111111111111111111111111111111111111111111111111111111.

# ---- stage 1: the Python environment ----------------------------------------------------------------------------
# Only the locks and the wheels enter this stage, so its layers stay cached until a pin changes.
FROM python@sha256:1111111111111111111111111111111111111111111111111111111111111111 AS deps
# The wheels are built for CPython 3.11: refuse a base image with another Python here, not at run time.
RUN python3 -c 'import sys; want = sys.argv[1]; have = "%d.%d" % sys.version_info[:2]; sys.exit(0 if have == want else "the base image has Python " + have + "; the locked wheels need " + want)' 3.11
# A throw-away pip (from ensurepip: offline) installs into a venv with no pip of its own, so the image holds
# exactly the locked packages (checked against sbom.json in stage 2).
RUN python3 -m venv /opt/pip-tool \
 && python3 -m venv --without-pip /opt/venv
COPY requirements.lock /tmp/mpack/requirements.lock
COPY wheels/ /tmp/mpack/wheels/
# --no-index: nothing is fetched; --require-hashes: every wheel must match its sha256 in the lock;
# --no-deps: the lock already is the whole dependency closure.
RUN /opt/pip-tool/bin/pip --python /opt/venv/bin/python install --no-index --no-deps --require-hashes \
    --no-cache-dir --disable-pip-version-check --find-links /tmp/mpack/wheels --requirement /tmp/mpack/requirements.lock
# mpack itself changes more often than its dependencies: it gets its own layer, after theirs.
COPY mpack.lock /tmp/mpack/mpack.lock
COPY dist/ /tmp/mpack/dist/
RUN /opt/pip-tool/bin/pip --python /opt/venv/bin/python install --no-index --no-deps --require-hashes \
    --no-cache-dir --disable-pip-version-check --find-links /tmp/mpack/dist --requirement /tmp/mpack/mpack.lock

# ---- stage 2: the runtime ----------------------------------------------------------------------------------------
# The same pinned base, without pip, the wheels or the build tools: only the environment is carried over.
FROM python@sha256:1111111111111111111111111111111111111111111111111111111111111111
ENV PATH="/opt/venv/bin:$PATH" \
    HOME="/tmp" \
    MPACK_SERVE_CONFIG="/opt/mpack/deploy.json" \
    MPACK_SERVE_HOST="0.0.0.0" \
    PYTHONDONTWRITEBYTECODE="1" \
    PYTHONUNBUFFERED="1"
COPY --from=deps /opt/venv /opt/venv
COPY sbom.json entrypoint.py /opt/mpack/
# The installed distributions must be exactly the SBOM's (name and version): nothing missing, nothing extra.
RUN ["/opt/venv/bin/python", "/opt/mpack/entrypoint.py", "--verify-sbom"]
# ---- the model(s): last, so a new model version rebuilds only these two layers ----------------------------------
COPY deploy.json models.json /opt/mpack/
COPY models/ /opt/mpack/models/
# Not root; a numeric UID so an orchestrator can verify it (runAsNonRoot). The files above stay root-owned and
# read-only to the server.
USER 10001:10001
EXPOSE 8000
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/mpack/entrypoint.py", "--health"]
# Exec form: the server is PID 1 and gets SIGTERM itself (it stops reporting ready, drains, then exits).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/venv/bin/python", "/opt/mpack/entrypoint.py"]
# Labels last: they change with every model and would otherwise invalidate the layers after them.
# `created` is a build argument, not part of the context, so the context stays byte-identical between builds.
ARG CREATED=unknown
LABEL org.opencontainers.image.created="${CREATED}" \
      io.mpack.model.sha256="2590bd82b0a1aca9eb5a2cfd13585af3138ebba214a9028c29a48f81b16e2d55" \
      io.mpack.model.source="torch_export:cnn.pt2" \
      io.mpack.models="cnn:1=sha256:abababababababababababababababababababababababababababababababab" \
      io.mpack.sbom="/opt/mpack/sbom.json" \
      io.mpack.variant="cpu" \
      io.mpack.version="0.1.0" \
      org.opencontainers.image.base.digest="sha256:1111111111111111111111111111111111111111111111111111111111111111" \
      org.opencontainers.image.base.name="python:3.11-slim-bookworm" \
      org.opencontainers.image.description="ONNX models served by mpack (Open Inference Protocol V2)" \
      org.opencontainers.image.title="cnn" \
      org.opencontainers.image.version="1.0"
