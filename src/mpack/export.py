"""``mpack export``: hand a packaged model to the engines users scale out on.

- ``triton``: a Triton model repository, ``<name>/<version>/model.onnx`` plus ``config.pbtxt`` (inputs, outputs,
  ``max_batch_size``, ``dynamic_batching`` from our batching settings, instance groups; no ensembles).
- ``k8s``: Kubernetes Deployment + Service + HorizontalPodAutoscaler for a built serving image, and a KServe
  ``InferenceService`` (V2 protocol) with ``canaryTrafficPercent``.

Everything is rendered from data by pure functions and written into a private directory first, then renamed into
place, so a failed export leaves no half-written repository.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from mpack import manifest
from mpack.errors import ConfigError, InputFileError
from mpack.onnx_io import load_graph, read_facts
from mpack.specs import TensorSpec

# numpy dtype name -> Triton data type (model_config.proto DataType).
TRITON_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
                "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
                "bfloat16": "TYPE_BF16"}
# Same defaults as `mpack serve`: 5 ms queue delay (the serving lesson's figure), batches of up to 32.
DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE_DELAY_US = 5000
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS-1123 label (Kubernetes names)
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@]*$")


DEPLOY_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class TritonExportConfig:
    """Args:
        model: The .onnx file (its manifest, if any, names it), or a deployment file (``mpack.deploy.yaml``, the
            format ``mpack serve`` reads): then every model and version in it, with its batching settings.
        output: The repository directory (created; must not exist or be empty).
        name: Model name in the repository. Defaults to the file's stem.
        version: Version directory. Defaults to 1.
        max_batch_size: Triton's max_batch_size; 0 for models without a symbolic batch axis. Defaults to 32.
        queue_delay_us: dynamic_batching max_queue_delay_microseconds. Defaults to 5000.
        preferred_batch_sizes: dynamic_batching preferred sizes. Defaults to none.
        instances: Instances per device. Defaults to 1.
        kind: "cpu" or "gpu". Defaults to "cpu".
    """

    model: Path
    output: Path
    name: str | None = None
    version: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    kind: str = "cpu"


@dataclass(frozen=True)
class K8sExportConfig:
    """Args:
        image: The serving image (from ``mpack build-image``), pinned by tag or digest.
        output: Directory for the manifests.
        name: Name of the Kubernetes objects (a DNS-1123 label).
        replicas: Initial replicas, and the HPA minimum. Defaults to 1.
        max_replicas: HPA maximum. Defaults to 4.
        target_cpu: HPA target average CPU utilisation, percent. Defaults to 70.
        cpu: CPU request (and limit). Defaults to "1".
        memory: Memory request (and limit). Defaults to "1Gi".
        http_port / grpc_port: The server's ports in the container. Default 8000 / 8001.
        canary_percent: KServe canaryTrafficPercent for a new revision; None leaves it out.
        namespace: Namespace of the objects. Defaults to none (kubectl's current one).
        deployment: An ``mpack serve`` deployment file: its ports, and its canary weight as canaryTrafficPercent
            (flags given explicitly win). Defaults to none.
    """

    image: str
    output: Path
    name: str
    replicas: int = 1
    max_replicas: int = 4
    target_cpu: int = 70
    cpu: str = "1"
    memory: str = "1Gi"
    http_port: int = 8000
    grpc_port: int = 8001
    canary_percent: int | None = None
    namespace: str | None = None
    deployment: Path | None = None


@dataclass
class ExportResult:
    target: str
    output: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"target": self.target, "output": str(self.output), "files": self.files, "notes": self.notes}


def _batch_axis(specs: list[TensorSpec]) -> str | None:
    """The symbolic dim every input and output starts with, if there is one."""
    firsts = {s.shape[0] if s.shape else None for s in specs}
    if len(firsts) == 1:
        (first,) = firsts
        if isinstance(first, str):
            return first
    return None


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    shape = spec.shape[1:] if batched else spec.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def triton_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], cfg: TritonExportConfig,
                  notes: list[str], versions: list[int] | None = None) -> str:
    """config.pbtxt text for one ONNX model (protobuf text format of Triton's ModelConfig)."""
    batched = cfg.max_batch_size > 0 and _batch_axis(inputs + outputs) is not None
    if cfg.max_batch_size > 0 and not batched:
        notes.append("the model has no symbolic batch axis shared by all inputs and outputs: max_batch_size 0 "
                     "(Triton will not batch it)")

    def tensor(spec: TensorSpec) -> str:
        if spec.dtype not in TRITON_TYPES:
            raise ConfigError("tensor", spec.name, f"has dtype {spec.dtype}, which Triton does not support")
        dims = ", ".join(str(d) for d in _dims(spec, batched))
        return f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_TYPES[spec.dtype]}\n    dims: [ {dims} ]\n  }}'

    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {cfg.max_batch_size if batched else 0}",
             "input [", ",\n".join(tensor(s) for s in inputs), "]",
             "output [", ",\n".join(tensor(s) for s in outputs), "]"]
    if batched:
        lines.append("dynamic_batching {")
        if cfg.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in cfg.preferred_batch_sizes)} ]")
        lines += [f"  max_queue_delay_microseconds: {cfg.queue_delay_us}", "}"]
    kind = "KIND_GPU" if cfg.kind == "gpu" else "KIND_CPU"
    lines += ["instance_group [", f"  {{\n    count: {cfg.instances}\n    kind: {kind}\n  }}", "]",
              f"version_policy: {{ specific: {{ versions: [ {', '.join(str(v) for v in versions or [cfg.version])} ] }} }}"]
    return "\n".join(lines) + "\n"


def load_deployment(path: Path):
    """The ``mpack serve`` deployment file as a ServeConfig, its errors as one-line mpack errors."""
    from mpack.serving import ServeConfigError, load_config

    try:
        return load_config(config_file=path, env={})
    except ServeConfigError as exc:
        raise ConfigError("deployment file", str(path), exc.message, hint=exc.hint) from None


def _check_triton(cfg: TritonExportConfig) -> None:
    if cfg.version < 1:
        raise ConfigError("--version", cfg.version, "must be >= 1")
    if cfg.max_batch_size < 0 or cfg.queue_delay_us < 0 or cfg.instances < 1:
        raise ConfigError("batching", (cfg.max_batch_size, cfg.queue_delay_us, cfg.instances),
                          "need max batch >= 0, delay >= 0 and instances >= 1")
    if any(b < 1 or b > cfg.max_batch_size for b in cfg.preferred_batch_sizes):
        raise ConfigError("--preferred-batch-sizes", list(cfg.preferred_batch_sizes),
                          f"must lie between 1 and --max-batch-size {cfg.max_batch_size}")
    if cfg.kind not in ("cpu", "gpu"):
        raise ConfigError("--kind", cfg.kind, "is not one of cpu, gpu")


def _triton_plan(cfg: TritonExportConfig,
                 notes: list[str]) -> list[tuple[str, TritonExportConfig, list[tuple[int, Path]]]]:
    """(model name, settings, [(version, file)]) for each model to export."""
    if cfg.model.suffix.lower() not in DEPLOY_SUFFIXES:
        if not cfg.model.is_file():
            raise InputFileError(f"{cfg.model} does not exist", hint="give the .onnx model to export")
        return [(cfg.name or cfg.model.name.removesuffix(".onnx"), cfg, [(cfg.version, cfg.model)])]
    if not cfg.model.is_file():
        raise InputFileError(f"{cfg.model} does not exist", hint="give the deployment file mpack serve reads")
    if cfg.name is not None:
        raise ConfigError("--name", cfg.name, "applies to a single .onnx model",
                          hint="a deployment file names its models itself")
    plan = []
    for model in load_deployment(cfg.model).models:
        versions = []
        for version, path in model.versions:
            if not version.isdigit() or int(version) < 1:
                raise ConfigError(f"models.{model.name}.versions", version, "is not a positive integer, which "
                                  "Triton's version directories must be")
            versions.append((int(version), Path(path)))
        b = model.batching
        plan.append((model.name, TritonExportConfig(
            model=cfg.model, output=cfg.output, name=model.name, max_batch_size=b.max_batch_size,
            queue_delay_us=int(b.max_queue_delay_ms * 1000), preferred_batch_sizes=tuple(b.preferred_batch_sizes),
            instances=b.instances, kind=cfg.kind), versions))
        if model.canary or model.shadow or model.ab:
            notes.append(f"{model.name}: Triton serves every listed version but does not route canary / shadow / "
                         "A-B traffic; route with KServe (mpack export k8s) or your gateway")
    return plan


def export_triton(cfg: TritonExportConfig) -> ExportResult:
    """Write a Triton model repository for one model, or for every model of a deployment file.

    Raises:
        InputFileError: a model is missing or not ONNX.
        ConfigError: a setting is invalid, or the output exists and is not empty.
    """
    _check_triton(cfg)
    notes: list[str] = []
    plan = _triton_plan(cfg, notes)
    _check_output(cfg.output)
    files: list[str] = []
    jobs = []
    for name, settings, versions in plan:
        if not _MODEL_NAME.match(name):
            raise ConfigError("--name", name, "may hold only letters, digits, '_', '.' and '-'")
        _check_triton(settings)
        facts = [read_facts(path, load_graph(path)) for _, path in versions]
        first = facts[0]
        for (version, path), f in zip(versions, facts):
            if [(s.name, s.dtype) for s in f.inputs + f.outputs] != [(s.name, s.dtype) for s in
                                                                       first.inputs + first.outputs]:
                raise ConfigError(f"{name} version {version}", str(path), "has other inputs or outputs than "
                                  f"version {versions[0][0]}", hint="one Triton model's versions share one config")
        config = triton_config(name, first.inputs, first.outputs, settings, notes, versions=[v for v, _ in versions])
        files.append(f"{name}/config.pbtxt")
        for (version, path), f in zip(versions, facts):
            files += [f"{name}/{version}/model.onnx"] + [f"{name}/{version}/{x}" for x in f.external_files]
            if manifest.load(path) is not None:
                files.append(f"{name}/{version}/model.mpack.json")
        jobs.append((name, config, versions, facts))

    def write(root: Path) -> None:
        for name, config, versions, facts in jobs:
            (root / name).mkdir()
            (root / name / "config.pbtxt").write_text(config)
            for (version, path), f in zip(versions, facts):
                version_dir = root / name / str(version)
                version_dir.mkdir()
                shutil.copyfile(path, version_dir / "model.onnx")
                for extra in f.external_files:
                    shutil.copyfile(path.parent / extra, version_dir / extra)
                data = manifest.load(path)
                if data is not None:
                    # Provenance travels with the model; Triton ignores files it does not know.
                    manifest.write_atomic(version_dir / "model.mpack.json", data)

    _publish_dir(cfg.output, write)
    for name, _, versions, _ in jobs:
        for version, path in versions:
            if manifest.load(path) is not None:
                manifest.append_step(path, "export", {"target": "triton", "output": str(cfg.output), "name": name,
                                                      "version": version})
    return ExportResult("triton", cfg.output, files, notes)


def k8s_objects(cfg: K8sExportConfig) -> dict[str, dict]:
    """The Kubernetes and KServe objects, as plain dicts, by file name."""
    labels = {"app.kubernetes.io/name": cfg.name, "app.kubernetes.io/managed-by": "mpack"}
    meta = {"name": cfg.name, "labels": labels, **({"namespace": cfg.namespace} if cfg.namespace else {})}
    resources = {"requests": {"cpu": cfg.cpu, "memory": cfg.memory}, "limits": {"cpu": cfg.cpu, "memory": cfg.memory}}
    ports = [{"name": "http", "containerPort": cfg.http_port, "protocol": "TCP"},
             {"name": "grpc", "containerPort": cfg.grpc_port, "protocol": "TCP"}]
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "server", "image": cfg.image, "ports": ports, "resources": resources,
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 2,
                         "failureThreshold": 60},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {"replicas": cfg.replicas, "selector": {"matchLabels": {"app.kubernetes.io/name": cfg.name}},
                 "template": {"metadata": {"labels": labels},
                              # The server drains in-flight requests on SIGTERM; give it time to.
                              "spec": {"terminationGracePeriodSeconds": 30, "containers": [container]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {"selector": {"app.kubernetes.io/name": cfg.name}, "type": "ClusterIP",
                 "ports": [{"name": "http", "port": cfg.http_port, "targetPort": "http", "protocol": "TCP"},
                           {"name": "grpc", "port": cfg.grpc_port, "targetPort": "grpc", "protocol": "TCP"}]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": cfg.name},
                 "minReplicas": cfg.replicas, "maxReplicas": cfg.max_replicas,
                 "metrics": [{"type": "Resource", "resource": {
                     "name": "cpu", "target": {"type": "Utilization", "averageUtilization": cfg.target_cpu}}}]},
    }
    predictor: dict = {"minReplicas": cfg.replicas, "maxReplicas": cfg.max_replicas,
                       "containers": [{"name": "kserve-container", "image": cfg.image, "resources": resources,
                                       # KServe routes one port to a custom container: the REST one.
                                       "ports": [{"containerPort": cfg.http_port, "protocol": "TCP"}],
                                       "readinessProbe": probe}]}
    if cfg.canary_percent is not None:
        predictor["canaryTrafficPercent"] = cfg.canary_percent
    inference_service = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {**meta, "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"}},
        # protocolVersion applies to model-format predictors; for a custom container the V2 protocol is what our
        # server speaks, recorded as a label for humans and tooling.
        "spec": {"predictor": predictor},
    }
    inference_service["metadata"]["labels"] = {**labels, "mpack.io/protocol": "v2"}
    return {"deployment.yaml": deployment, "service.yaml": service, "hpa.yaml": hpa,
            "inferenceservice.yaml": inference_service}


def from_deployment(cfg: K8sExportConfig, notes: list[str]) -> K8sExportConfig:
    """Fill ports and canaryTrafficPercent from the deployment file the image serves."""
    if not cfg.deployment.is_file():
        raise InputFileError(f"{cfg.deployment} does not exist", hint="give the deployment file mpack serve reads")
    serve = load_deployment(cfg.deployment)
    canaries = {m.name: m.canary.weight for m in serve.models if m.canary}
    if len(canaries) > 1 and cfg.canary_percent is None:
        raise ConfigError("deployment file", str(cfg.deployment), f"has canaries for {len(canaries)} models "
                          f"({', '.join(canaries)}) but an InferenceService has one canaryTrafficPercent",
                          hint="give --canary-percent, or export one deployment file per model")
    percent = cfg.canary_percent
    if percent is None and canaries:
        percent = round(next(iter(canaries.values())) * 100)
    if any(m.shadow or m.ab for m in serve.models):
        notes.append("shadow and A/B routing stay inside the mpack server (the image); KServe sees one predictor")
    return replace(cfg, http_port=serve.http_port, grpc_port=serve.grpc_port or cfg.grpc_port,
                   canary_percent=percent)


def export_k8s(cfg: K8sExportConfig) -> ExportResult:
    """Write Deployment, Service, HPA and KServe InferenceService manifests for a serving image."""
    import yaml

    notes: list[str] = []
    if cfg.deployment is not None:
        cfg = from_deployment(cfg, notes)

    if not _NAME.match(cfg.name) or len(cfg.name) > 63:
        raise ConfigError("--name", cfg.name, "is not a valid Kubernetes name (lower-case letters, digits and '-', "
                          "at most 63)", hint="e.g. --name tiny-cnn")
    if not _IMAGE.match(cfg.image) or ":" not in cfg.image.rsplit("/", 1)[-1] and "@" not in cfg.image:
        raise ConfigError("--image", cfg.image, "must name a pinned image (NAME:TAG or NAME@sha256:...)",
                          hint="use the tag you gave mpack build-image")
    if cfg.replicas < 1 or cfg.max_replicas < cfg.replicas:
        raise ConfigError("--replicas", (cfg.replicas, cfg.max_replicas), "need 1 <= replicas <= max replicas")
    if not 1 <= cfg.target_cpu <= 100:
        raise ConfigError("--target-cpu", cfg.target_cpu, "must be a percentage between 1 and 100")
    if cfg.canary_percent is not None and not 0 <= cfg.canary_percent <= 100:
        raise ConfigError("--canary-percent", cfg.canary_percent, "must be between 0 and 100")
    _check_output(cfg.output)
    objects = k8s_objects(cfg)

    def write(root: Path) -> None:
        for file, obj in objects.items():
            (root / file).write_text(yaml.safe_dump(obj, sort_keys=False))

    _publish_dir(cfg.output, write)
    return ExportResult("k8s", cfg.output, list(objects), notes)


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError("--output", str(output), "exists and is not an empty directory",
                          hint="choose a new directory; mpack does not overwrite a repository")
    if not output.parent.is_dir():
        raise ConfigError("--output", str(output), f"directory {output.parent} does not exist",
                          hint=f"create it first: mkdir -p {output.parent}")


def _publish_dir(output: Path, write) -> None:
    """Build the tree in a private directory beside ``output``, then rename it into place."""
    work = manifest.private_dir(output)
    try:
        tree = work / "tree"
        tree.mkdir()
        write(tree)
        if output.exists():
            output.rmdir()  # empty, checked before
        os.replace(tree, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
