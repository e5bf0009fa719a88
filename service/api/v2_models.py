"""Open Inference Protocol routes about the models themselves (metadata, readiness per model):
served where the catalog is, the single process or the model process."""

from __future__ import annotations

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


v2_models = Router(
    path="/", route_handlers=[model_metadata, model_ready], tags=["open inference protocol"]
)
