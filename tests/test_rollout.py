"""Canary and shadow rollouts through the management API, on real servers with two front
workers: the canary's share holds over 2,000 requests and every answer names its version; a
shadow candidate's agreement and latency reach /metrics while clients only see the stable
version; promote and roll back switch every later request at once and lose none."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    ServerProcess,
    child_pids,
    digits_versions,
    held_out_digits,
    metric_value,
    png_bytes,
    running_server,
)

KEY = "rollout-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = {"content-type": "image/png"}


def serve(tmp_path: Path, relabelled: tuple[int, ...] = (), **env: str) -> Any:
    store = digits_versions(tmp_path / "store", relabelled)
    environ = {"CONVSERVE_STORE": str(store), "CONVSERVE_API_KEY": KEY,
               "CONVSERVE_WORKERS": "2", **env}  # fmt: skip
    return running_server(tmp_path, environ)


def manage(server: ServerProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=60, **kwargs)


def versions_answering(server: ServerProcess, bodies: list[bytes], **params: str) -> list[int]:
    """The version that answered each request, sent by 16 clients at once."""

    def send(body: bytes) -> int:
        response = httpx.post(f"{server.url}/predict", content=body, headers=PNG,
                              params=params, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        return int(response.json()["model"]["version"])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(send, bodies))


def test_a_canary_takes_its_share_and_each_answer_names_its_version(tmp_path: Path) -> None:
    bodies = [png_bytes(d.image) for d in held_out_digits(2000)]
    with serve(tmp_path, CONVSERVE_CACHE_ENTRIES="0") as server:
        assert versions_answering(server, bodies[:20]) == [2] * 20  # the highest serves
        started = manage(server, "PUT", "/models/digits/rollout",
                         json={"version": 2, "mode": "canary", "share": 0.1})  # fmt: skip
        assert started.status_code == 200, started.text
        status = started.json()
        assert status["serving_version"] == 1
        rollout = status["rollout"]
        assert rollout == {"mode": "canary", "candidate": 2, "stable": 1, "share": 0.1,
                           "started": rollout["started"]}  # fmt: skip
        counts = Counter(versions_answering(server, bodies))
        assert set(counts) == {1, 2}
        assert abs(counts[2] / len(bodies) - 0.1) <= 0.03, counts
        # a request that names a version is never split
        assert set(versions_answering(server, bodies[:50], version="1")) == {1}
        body = httpx.get(f"{server.url}/v2/models/digits", timeout=10).json()
        assert body["versions"] == ["1", "2"]
        v2 = httpx.post(f"{server.url}/v2/models/digits/infer", timeout=30, json={"inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES",
             "data": [base64.b64encode(bodies[0]).decode()]}]}).json()  # fmt: skip
        assert v2["model_version"] in {"1", "2"}
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric_value(text, "convserve_rollout_share", model="digits", version="2",
                            mode="canary") == pytest.approx(0.1)  # fmt: skip


def test_a_shadow_is_measured_and_never_seen(tmp_path: Path) -> None:
    bodies = [png_bytes(d.image) for d in held_out_digits(200)]
    with serve(tmp_path, relabelled=(3,)) as server:
        # v3 names every class backwards: it disagrees with v1 on every image
        assert manage(server, "PUT", "/models/digits/default", json={"version": 1}).is_success
        started = manage(server, "PUT", "/models/digits/rollout",
                         json={"version": 3, "mode": "shadow"})  # fmt: skip
        assert started.status_code == 200, started.text
        assert started.json()["rollout"]["share"] == 1.0
        assert set(versions_answering(server, bodies[:100])) == {1}
        text = wait_for_shadow(server, "3", 100)
        assert metric_value(text, "convserve_shadow_agreed_total", version="3") == 0
        assert metric_value(text, "convserve_shadow_seconds_count", version="3") >= 1
        # the same rollout on an identical candidate agrees on every image
        assert manage(server, "POST", "/models/digits/rollout/rollback").is_success
        assert manage(server, "PUT", "/models/digits/rollout",
                      json={"version": 2, "mode": "shadow", "share": 0.5}).is_success  # fmt: skip
        assert set(versions_answering(server, bodies[100:])) == {1}
        text = wait_for_shadow(server, "2", 40)
        images = metric_value(text, "convserve_shadow_images_total", version="2")
        assert metric_value(text, "convserve_shadow_agreed_total", version="2") == images
        assert images <= 60  # about half of the 100 requests: a sampled share
        # the stable version's batches hold the clients' images only: the candidate ran in its own
        assert metric_value(text, "convserve_batch_size_sum", version="1") == 200


def wait_for_shadow(server: ServerProcess, version: str, images: int) -> str:
    """/metrics once the candidate's shadow runs (off the request path) add up to `images`."""
    give_up = time.monotonic() + 30
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        seen = metric_value(text, "convserve_shadow_images_total", version=version)
        if seen >= images or time.monotonic() > give_up:
            assert seen >= images, text
            return text
        time.sleep(0.2)


def test_promote_and_rollback_switch_at_once_and_lose_nothing(tmp_path: Path) -> None:
    bodies = [png_bytes(d.image) for d in held_out_digits(40)]
    answered: list[tuple[float, float, int]] = []  # (sent, received, version)
    failures: list[str] = []
    stop = threading.Event()
    with serve(tmp_path, CONVSERVE_CACHE_ENTRIES="0") as server:

        def client(offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as session:
                index = offset
                while not stop.is_set():
                    sent = time.monotonic()
                    response = session.post("/predict", content=bodies[index % 40], headers=PNG)
                    if response.status_code != 200:
                        failures.append(response.text)
                    else:
                        answered.append(
                            (sent, time.monotonic(), response.json()["model"]["version"])
                        )
                    index += 1

        assert manage(server, "PUT", "/models/digits/rollout",
                      json={"version": 2, "share": 0.3}).is_success  # fmt: skip
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        promoted = manage(server, "POST", "/models/digits/rollout/promote")
        promoted_at = time.monotonic()
        time.sleep(1.5)
        rolled_back = manage(server, "POST", "/models/digits/rollout/rollback")
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["default_version"] == 2
        assert "rollout" not in promoted.json()
        # with no rollout running, a rollback is refused and changes nothing
        assert rolled_back.status_code == 409, rolled_back.text
        assert rolled_back.headers["content-type"] == "application/problem+json"
    assert not failures
    before = {v for sent, received, v in answered if received < promoted_at - 0.2}
    after = {v for sent, received, v in answered if sent > promoted_at}
    assert before == {1, 2}
    assert after == {2}, "a request sent after the promote was answered by the old version"


def test_rollback_keeps_the_stable_version_and_errors_are_clear(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        url = f"{server.url}/models/digits/rollout"
        assert httpx.put(url, json={"version": 2}, timeout=10).status_code == 401
        for plan, status in [({"version": 9}, 404), ({"version": 2, "share": 0}, 422),
                             ({"version": 2, "share": 1.5}, 422),
                             ({"version": 2, "mode": "blue"}, 422)]:  # fmt: skip
            refused = manage(server, "PUT", "/models/digits/rollout", json=plan)
            assert refused.status_code == status, (plan, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["detail"]
        assert manage(server, "PUT", "/models/digits/rollout", json={"version": 2}).is_success
        busy = manage(server, "POST", "/models/digits/versions/2/unload")
        assert busy.status_code == 409
        assert "rollout" in busy.json()["detail"]
        other = manage(server, "PUT", "/models/digits/rollout", json={"version": 1})
        assert other.status_code == 409
        assert "already rolling out v2" in other.json()["detail"]
        back = manage(server, "POST", "/models/digits/rollout/rollback")
        assert back.status_code == 200, back.text
        assert back.json()["serving_version"] == 1
        assert back.json()["default_version"] == 1
        one = png_bytes(held_out_digits(1)[0].image)
        assert set(versions_answering(server, [one] * 20)) == {1}
        # a candidate not loaded yet is loaded by the rollout, and serves nothing before it
        assert manage(server, "POST", "/models/digits/versions/2/unload").is_success
        again = manage(server, "PUT", "/models/digits/rollout", json={"version": 2, "share": 0.5})
        assert again.status_code == 200, again.text
        assert [v["status"] for v in again.json()["versions"]] == ["ready", "ready"]


def test_a_restarted_model_process_keeps_the_rollout_pins_and_aliases(tmp_path: Path) -> None:
    """The model process dies (SIGKILL) mid-canary: the one the supervisor starts routes as it
    did, instead of handing every request to the candidate, the highest version."""
    bodies = [png_bytes(d.image) for d in held_out_digits(400)]
    with serve(tmp_path, relabelled=(3,), CONVSERVE_CACHE_ENTRIES="0") as server:
        assert manage(server, "PUT", "/models/digits/default", json={"version": 1}).is_success
        assert manage(server, "PUT", "/models/digits/aliases/old", json={"version": 1}).is_success
        assert manage(server, "PUT", "/models/digits/rollout",
                      json={"version": 3, "share": 0.1}).is_success  # fmt: skip
        before = digits_status(server)
        (victim,) = child_pids(server, "service.modelhost")
        os.kill(victim, signal.SIGKILL)
        give_up = time.monotonic() + 60
        while not (child_pids(server, "service.modelhost") - {victim}) or (
            httpx.get(f"{server.url}/health/ready", timeout=10).status_code != 200
        ):
            assert time.monotonic() < give_up, "the model process did not come back"
            time.sleep(0.2)
        after = digits_status(server)
        for key in ("serving_version", "default_version", "aliases"):
            assert after[key] == before[key], key
        assert {k: v for k, v in after["rollout"].items() if k != "started"} == {
            "mode": "canary", "candidate": 3, "stable": 1, "share": 0.1}  # fmt: skip
        counts = Counter(versions_answering(server, bodies))
        assert set(counts) == {1, 3}
        assert abs(counts[3] / len(bodies) - 0.1) <= 0.03, counts


def digits_status(server: ServerProcess) -> dict[str, Any]:
    """The digits model as GET /models lists it."""
    models = httpx.get(f"{server.url}/models", timeout=10).json()["models"]
    found: dict[str, Any] = next(m for m in models if m["name"] == "digits")
    return found


def test_a_candidate_refused_at_load_leaves_no_rollout(tmp_path: Path) -> None:
    store = digits_versions(tmp_path / "store")
    broken = store / "digits" / "3"
    shutil.copytree(store / "digits" / "2", broken)
    spec = json.loads((broken / "model.json").read_text())
    spec["sha256"] = "0" * 64  # the weights no longer match: verification refuses them
    (broken / "model.json").write_text(json.dumps(spec))
    environ = {"CONVSERVE_STORE": str(store), "CONVSERVE_API_KEY": KEY, "CONVSERVE_WORKERS": "2"}
    with running_server(tmp_path, environ) as server:
        refused = manage(server, "PUT", "/models/digits/rollout", json={"version": 3})
        assert refused.status_code == 422, refused.text
        assert "was refused and nothing changed" in refused.json()["detail"]
        status = digits_status(server)
        assert "rollout" not in status
        assert status["serving_version"] == 2
