"""Open Inference Protocol routes about the models themselves (metadata, readiness per model,
and Triton's configuration and statistics): served where the catalog is, the single process
or the model process."""

from __future__ import annotations

from typing import Any

from litestar import Router, get
from litestar.params import FromPath

from service.api.openapi import problems
from service.api.runtime_dep import RuntimeDep
from service.api.v2 import ModelMetadata, Readiness, TensorSpec
from service.catalog import Deployment


def _metadata(deployment: Deployment, versions: list[str]) -> ModelMetadata:
    classifier = deployment.classifier
    channels, height, width = classifier.input_shape
    return ModelMetadata(
        name=classifier.name,
        versions=versions,
        platform=f"pytorch_{classifier.spec.architecture}",
        inputs=[
            TensorSpec("image", "BYTES", [-1]),
            TensorSpec("input", "FP32", [-1, channels, height, width]),
        ],
        outputs=[TensorSpec("probabilities", "FP32", [-1, len(classifier.labels)])],
    )


@get(["/v2/models/{name:str}", "/v2/models/{name:str}/versions/{version:str}"],
     summary="Open Inference Protocol: model metadata", responses=problems(404, 503))  # fmt: skip
async def model_metadata(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str | None] = None
) -> ModelMetadata:
    deployment = runtime.catalog.resolve(name, version)
    model = runtime.catalog.status().models[deployment.classifier.name]
    return _metadata(deployment, [str(v) for v in model.loaded])


@get(["/v2/models/{name:str}/ready", "/v2/models/{name:str}/versions/{version:str}/ready"],
     summary="Open Inference Protocol: model readiness (503 when not ready)",
     responses=problems(404, 503))  # fmt: skip
async def model_ready(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str | None] = None
) -> Readiness:
    runtime.catalog.resolve(name, version)  # 404 unknown, 503 not ready
    return Readiness(name, True)


def _config(deployment: Deployment) -> dict[str, Any]:
    """Triton's model configuration (its JSON, as model_config.proto spells it)."""
    classifier, batcher = deployment.classifier, deployment.batcher
    return {
        "name": classifier.name,
        "platform": f"pytorch_{classifier.spec.architecture}",
        "backend": classifier.engine.name,
        "max_batch_size": batcher.max_batch_size,
        # dims leave out the batch dimension; an image is one encoded file per batch row
        "input": [
            {"name": "image", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "input", "data_type": "TYPE_FP32", "dims": list(classifier.input_shape)},
        ],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [len(classifier.labels)]}
        ],
        # no preferred sizes: a batch takes whatever is queued, up to max_batch_size
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": round(batcher.max_delay_s * 1_000_000),
        },
    }


@get(["/v2/models/{name:str}/config", "/v2/models/{name:str}/versions/{version:str}/config"],
     summary="Triton: model configuration (batching, tensors)",
     responses=problems(404, 503))  # fmt: skip
async def model_config(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str | None] = None
) -> dict[str, Any]:
    return _config(runtime.catalog.resolve(name, version))


def _stats(deployments: list[Deployment]) -> dict[str, Any]:
    ordered = sorted(deployments, key=lambda d: (d.classifier.name, d.version))
    return {
        "model_stats": [d.batcher.statistics.to_json(d.classifier.name, d.version) for d in ordered]
    }


@get("/v2/models/stats", summary="Triton: inference statistics of every loaded version")
async def all_stats(runtime: RuntimeDep) -> dict[str, Any]:
    return _stats(runtime.catalog.deployments())


@get(["/v2/models/{name:str}/stats", "/v2/models/{name:str}/versions/{version:str}/stats"],
     summary="Triton: inference statistics (counts, queue and compute time in ns)",
     responses=problems(404, 503))  # fmt: skip
async def model_stats(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str | None] = None
) -> dict[str, Any]:
    """One version when named, else every loaded version of the model."""
    deployment = runtime.catalog.resolve(name, version)
    if version is not None:
        return _stats([deployment])
    model = deployment.classifier.name
    return _stats([d for d in runtime.catalog.deployments() if d.classifier.name == model])


v2_models = Router(
    path="/",
    route_handlers=[model_metadata, model_ready, model_config, all_stats, model_stats],
    tags=["open inference protocol"],
)
