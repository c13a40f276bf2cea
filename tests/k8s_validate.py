"""Validate `mpack export k8s` output against the kubernetes and KServe Python models, strictly.

    python -m tests.k8s_validate DIR     # prints a JSON summary; exits non-zero on the first invalid field
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def _strict(data, klass, modules):
    """Deserialize ``data`` into the OpenAPI model ``klass`` and fail on any key the model does not know."""
    # Generated type names come as list[X] / List[X] and dict(str, X) / Dict[str, X].
    if klass.lower().startswith("list["):
        assert isinstance(data, list), (klass, data)
        return [_strict(d, klass[5:-1], modules) for d in data]
    if klass.lower().startswith(("dict(", "dict[")):
        assert isinstance(data, dict), (klass, data)
        inner = klass[klass.index(",") + 1:-1].strip()
        return {k: _strict(v, inner, modules) for k, v in data.items()}
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if klass in scalars:
        assert isinstance(data, scalars[klass]), (klass, data)
        return data
    cls = next((getattr(m, klass) for m in modules if hasattr(m, klass)), None)
    assert cls is not None, f"unknown model {klass}"
    assert isinstance(data, dict), (klass, data)
    reverse = {v: k for k, v in cls.attribute_map.items()}
    unknown = set(data) - set(reverse)
    assert not unknown, f"{klass} has no field(s) {sorted(unknown)}"
    kwargs = {reverse[k]: _strict(v, cls.openapi_types[reverse[k]], modules) for k, v in data.items()}
    return cls(**kwargs)  # the models check required fields and enums themselves


def main(folder: Path) -> dict:
    import kserve.models
    import kubernetes.client.models

    modules = [kubernetes.client.models, kserve.models]
    docs = {p.name: yaml.safe_load(p.read_text()) for p in folder.iterdir()}
    deployment = _strict(docs["deployment.yaml"], "V1Deployment", modules)
    container = deployment.spec.template.spec.containers[0]
    service = _strict(docs["service.yaml"], "V1Service", modules)
    hpa = _strict(docs["hpa.yaml"], "V2HorizontalPodAutoscaler", modules)
    isvc = _strict(docs["inferenceservice.yaml"], "V1beta1InferenceService", modules)
    assert deployment.spec.selector.match_labels.items() <= deployment.spec.template.metadata.labels.items()
    return {"deployment": {"replicas": deployment.spec.replicas, "image": container.image,
                           "readiness": container.readiness_probe.http_get.path},
            "service_ports": sorted(p.name for p in service.spec.ports),
            "hpa": {"min": hpa.spec.min_replicas, "max": hpa.spec.max_replicas,
                    "target": hpa.spec.scale_target_ref.name},
            "isvc": {"canary": isvc.spec.predictor.canary_traffic_percent,
                     "image": isvc.spec.predictor.containers[0].image, "namespace": isvc.metadata.namespace}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
