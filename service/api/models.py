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
    VersionStatus,
)
from service.catalog import Deployment, ModelEntry

CARD_PROBLEMS = problems(404, 503)


def model_status(entry: ModelEntry) -> ModelStatus:
    versions: dict[int, VersionStatus] = {}
    for number, reason in entry.failures.items():
        versions[number] = VersionStatus(number, "failed", error=reason)
    for number in entry.loading:
        versions[number] = VersionStatus(number, "loading")
    for number, deployment in entry.deployments.items():
        spec = deployment.classifier.spec
        versions[number] = VersionStatus(
            number,
            "ready",
            architecture=spec.architecture,
            device=deployment.classifier.device.type,
            engine=deployment.classifier.engine.name,
            accuracy=spec.metrics.accuracy,
            load_seconds=round(deployment.load_seconds, 4),
            loaded_at=deployment.loaded_at,
            error=entry.failures.get(number),
        )
    return ModelStatus(
        name=entry.name,
        ready=bool(entry.deployments),
        serving_version=entry.serving_version(),
        default_version=entry.default_version,
        aliases=dict(entry.aliases),
        versions=[versions[v] for v in sorted(versions)],
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
        device=classifier.device.type,
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
    )


@get("/models", summary="Every model and version with its status")
async def list_models(runtime: RuntimeDep) -> ModelList:
    catalog = runtime.catalog
    return ModelList([model_status(catalog.models[name]) for name in sorted(catalog.models)])


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
