"""Rollouts through the management API: try a candidate version as a canary (a share of the
requests that name no version) or in shadow (it also runs, unseen, and its agreement with the
serving version shows in /metrics), then promote it or roll it back, each in one step."""

from __future__ import annotations

from typing import Literal

import msgspec
from litestar import post, put
from litestar.params import FromPath, JSONBody

from service.api.management import MANAGEMENT_DOCS, changed, load_or_refuse
from service.api.runtime_dep import RuntimeDep
from service.api.schemas import ModelStatus
from service.errors import InvalidParameterError, ModelRefusedError
from service.spec import check_name


class RolloutPlan(msgspec.Struct, forbid_unknown_fields=True):
    """Body of PUT /models/{name}/rollout. `share` defaults to 0.1 for a canary and 1.0 (every
    request) for a shadow."""

    version: int
    mode: Literal["canary", "shadow"] = "canary"
    share: float | None = None


@put(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/rollout",
    summary="Try a version as a canary or in shadow, beside the one serving",
)
async def start_rollout(
    runtime: RuntimeDep, name: FromPath[str], data: JSONBody[RolloutPlan]
) -> ModelStatus:
    share = data.share if data.share is not None else (0.1 if data.mode == "canary" else 1.0)
    if not 0.0 < share <= 1.0:
        raise InvalidParameterError(f"share must be above 0 and at most 1, not {share}")
    runtime.store.path(check_name(name), data.version)  # 404 unless the store has it
    catalog = runtime.catalog
    catalog.start_rollout(name, data.version, data.mode, share)
    state = catalog.status().models[name].versions.get(data.version)
    if state is None or state.state == "failed":
        try:  # loaded as the candidate: it serves no request before the rollout routes it
            await load_or_refuse(runtime, name, data.version)
        except ModelRefusedError:
            catalog.abandon_rollout(name)
            raise
    return changed(runtime, name)


@post(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/rollout/promote",
    summary="The candidate serves every request that names no version",
    status_code=200,
)
async def promote(runtime: RuntimeDep, name: FromPath[str]) -> ModelStatus:
    runtime.catalog.end_rollout(name, promote=True)
    return changed(runtime, name)


@post(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/rollout/rollback",
    summary="The stable version serves every request again",
    status_code=200,
)
async def rollback(runtime: RuntimeDep, name: FromPath[str]) -> ModelStatus:
    runtime.catalog.end_rollout(name, promote=False)
    return changed(runtime, name)
