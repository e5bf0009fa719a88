"""GET /models and the model cards: labels, input spec, metrics and the per-layer table."""

from __future__ import annotations

import dataclasses

import msgspec
from litestar import get
from litestar.params import FromPath

from service.api.openapi import problems
from service.api.runtime_dep import RuntimeDep
from service.api.schemas import (
    AnatomyInfo,
    HeatmapLayer,
    LayerInfo,
    ModelCard,
    ModelList,
    ModelStatus,
    RolloutStatus,
    VersionStatus,
)
from service.catalog import Deployment
from service.catalog_status import ModelState, VersionState
from service.graph_files import heatmaps_unavailable

CARD_PROBLEMS = problems(404, 503)


def version_status(version: VersionState) -> VersionStatus:
    serving = version.serving
    if serving is None:  # a version loading again shows no error until this load ends
        error = None if version.state == "loading" else version.reason
        return VersionStatus(version.version, version.state, error=error)
    return VersionStatus(
        version.version,
        version.state,
        architecture=serving.architecture,
        device=serving.device,
        engine=serving.engine,
        accuracy=serving.accuracy,
        load_seconds=round(serving.load_seconds, 4),
        loaded_at=serving.loaded_at,
        error=version.reason,
    )


def model_status(model: ModelState) -> ModelStatus:
    return ModelStatus(
        name=model.name,
        ready=model.ready,
        serving_version=model.serving_version,
        default_version=model.default_version,
        aliases=dict(model.aliases),
        versions=[version_status(v) for v in model.versions.values()],
        rollout=None
        if model.rollout is None
        else RolloutStatus(**dataclasses.asdict(model.rollout)),
    )


def model_card(deployment: Deployment) -> ModelCard:
    classifier = deployment.classifier
    spec = classifier.spec
    anatomy = classifier.anatomy
    return ModelCard(
        name=classifier.name,
        version=classifier.version,
        architecture=spec.architecture,
        arguments=spec.arguments,
        description=spec.description,
        created=spec.created,
        sha256=spec.sha256,
        device=classifier.device_type,
        engine=classifier.engine.name,
        labels=spec.labels,
        input=msgspec.to_builtins(spec.input),
        metrics=msgspec.to_builtins(spec.metrics),
        heatmap_layer=spec.heatmap_layer,
        heatmap_layers=[
            HeatmapLayer(p.layer, p.module_name, p.kind, *p.shape)
            for p in classifier.layers.values()
        ],
        batching={
            "max_batch_size": deployment.batcher.max_batch_size,
            "max_delay_ms": deployment.batcher.max_delay_s * 1000.0,
            "max_queue": deployment.batcher.max_queue,
        },
        anatomy=AnatomyInfo(
            input_shape=anatomy.input_shape,
            output_shape=anatomy.output_shape,
            layers=[LayerInfo(**dataclasses.asdict(row)) for row in anatomy.rows],
            total_params=anatomy.total_params,
            total_macs=anatomy.total_macs,
            receptive_field=anatomy.receptive_field,
        ),
        warnings=classifier.warnings,
        heatmaps_unavailable=heatmaps_unavailable(spec),
    )


@get("/models", summary="Every model and version with its status")
async def list_models(runtime: RuntimeDep) -> ModelList:
    models = runtime.catalog.status().models
    return ModelList([model_status(models[name]) for name in sorted(models)])


@get("/models/{name:str}", summary="Model card of the serving version", responses=CARD_PROBLEMS)
async def card(runtime: RuntimeDep, name: FromPath[str]) -> ModelCard:
    return model_card(runtime.catalog.resolve(name, None))


@get(
    "/models/{name:str}/{version:str}",
    summary="Model card of one version (number or alias)",
    responses=CARD_PROBLEMS,
)
async def card_version(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str]
) -> ModelCard:
    return model_card(runtime.catalog.resolve(name, version))
