"""The Open Inference Protocol over gRPC, driven by the official Triton gRPC client against real
server processes, in one process (CONVSERVE_WORKERS=0) and with two front workers.

Calls tritonclient never makes (typed contents, malformed tensors) use the stub and messages
tritonclient ships. Not service.grpc_v2's: both register package `inference` in protobuf's
default descriptor pool, so one process cannot import the two.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import InferenceServerException

from service.imaging import DecodeLimits, prepare_image
from service.spec import read_spec
from tests.support import (
    BUNDLED_STORE,
    ROOT,
    ServerProcess,
    child_pids,
    free_port,
    held_out_digits,
    metric_value,
    png_bytes,
    running_server,
)

WORKERS = ["0", "2"]


@pytest.fixture(scope="module", params=WORKERS, ids=lambda w: f"workers={w}")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {"CONVSERVE_WORKERS": request.param}
    with running_server(tmp_path_factory.mktemp("grpc"), env) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tgrpc.InferenceServerClient]:
    connection = tgrpc.InferenceServerClient(server.grpc)
    yield connection
    connection.close()


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[GRPCInferenceServiceStub]:
    """The generated stub, for what tritonclient never sends (typed contents, odd shapes)."""
    with grpc.insecure_channel(server.grpc) as channel:
        yield GRPCInferenceServiceStub(channel)


def images_input(encoded: list[bytes]) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("image", [len(encoded)], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    return tensor


def failure(call: object) -> InferenceServerException:
    assert callable(call)
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_health_and_metadata(client: tgrpc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("lenet5", "1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("digits", "9")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "convserve"
    assert "classification" in metadata["extensions"]
    model = client.get_model_metadata("digits", as_json=True)
    assert model["name"] == "digits"
    assert model["versions"] == ["1"]
    inputs = {i["name"]: i for i in model["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES"
    assert inputs["input"] == {
        "name": "input",
        "datatype": "FP32",
        "shape": ["-1", "1", "28", "28"],
    }
    assert model["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}
    ]
    unknown = failure(lambda: client.get_model_metadata("nope"))
    assert unknown.status() == "StatusCode.NOT_FOUND"
    assert "no model named 'nope'" in unknown.message()


def test_bytes_images_answer_as_rest_does(
    server: ServerProcess, client: tgrpc.InferenceServerClient
) -> None:
    digits = held_out_digits(5)
    encoded = [png_bytes(d.image) for d in digits]
    result = client.infer("digits", [images_input(encoded)], request_id="grpc-1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (5, 10)
    assert probabilities.argmax(axis=1).tolist() == [d.label for d in digits]
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("digits", "1", "grpc-1")
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [5],
                "datatype": "BYTES",
                "data": [base64.b64encode(e).decode() for e in encoded],
            }
        ]
    }
    rest = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=10).json()
    (output,) = rest["outputs"]
    expected = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)


KSERVE = ROOT / "tests" / "kserve"


def test_kserves_grpc_client(server: ServerProcess, tmp_path: Path) -> None:
    """KServe's InferenceGRPCClient, run from its own venv (make test builds it)."""
    python = KSERVE / ".venv" / "bin" / "python"
    assert python.is_file(), "KServe's client venv is missing: run `make test` (it builds it)"
    digit = held_out_digits(1, seed=31)[0]
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(digit.image))
    done = subprocess.run(
        [str(python), str(KSERVE / "client.py"), server.grpc, str(image)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    output = seen["output"]
    assert (output["name"], output["shape"], output["datatype"]) == (
        "probabilities",
        [1, 10],
        "FP32",
    )
    rest = httpx.post(f"{server.url}/predict?top_k=1", content=image.read_bytes(),
                      headers={"content-type": "image/png"}).json()  # fmt: skip
    assert (
        max(range(10), key=output["data"].__getitem__)
        == rest["results"][0]["predictions"][0]["class_index"]
    )
    assert sum(output["data"]) == pytest.approx(1.0, abs=1e-5)
    assert seen["unknown_model"]["code"] == "NOT_FOUND"
    assert "no-such-model" in seen["unknown_model"]["details"]


def test_fp32_tensor_and_classification(client: tgrpc.InferenceServerClient) -> None:
    spec = read_spec(BUNDLED_STORE / "lenet5" / "1" / "model.json")
    digits = held_out_digits(4, seed=1)
    batch = np.stack(
        [prepare_image(png_bytes(d.image), spec.input, DecodeLimits(10**6)).array for d in digits]
    )
    tensor = tgrpc.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    probabilities = client.infer("lenet5", [tensor]).as_numpy("probabilities")
    assert probabilities.shape == (4, 10)
    assert probabilities.argmax(axis=1).tolist() == [d.label for d in digits]
    wanted = tgrpc.InferRequestedOutput("probabilities", class_count=2)
    top = client.infer("lenet5", [tensor], outputs=[wanted]).as_numpy("probabilities")
    assert top.shape == (4, 2)
    for row, p in zip(top, probabilities, strict=True):
        score, index, label = row[0].decode().split(":")
        assert int(index) == p.argmax()
        assert label == str(p.argmax())
        assert float(score) == pytest.approx(p.max(), abs=1e-6)


def test_typed_contents_instead_of_raw(stub: GRPCInferenceServiceStub) -> None:
    """The protocol's other encoding: bytes_contents / fp32_contents, not raw_input_contents."""
    digit = held_out_digits(1)[0]
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        png_bytes(digit.image)
    )
    answer = stub.ModelInfer(request, timeout=10)
    probabilities = np.frombuffer(answer.raw_output_contents[0], dtype="<f4")
    assert probabilities.argmax() == digit.label
    spec = read_spec(BUNDLED_STORE / "digits" / "1" / "model.json")
    array = prepare_image(png_bytes(digit.image), spec.input, DecodeLimits(10**6)).array
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    tensor.contents.fp32_contents.extend(array.reshape(-1).tolist())
    answer = stub.ModelInfer(request, timeout=10)
    assert np.frombuffer(answer.raw_output_contents[0], dtype="<f4").argmax() == digit.label


def nan_fp32(request: pb.ModelInferRequest) -> None:
    tensor = request.inputs[0]
    tensor.datatype = "FP32"
    tensor.shape[:] = [1, 1, 28, 28]
    values = np.zeros(28 * 28, dtype="<f4")
    values[3] = np.nan
    request.raw_input_contents[0] = values.tobytes()


def short_fp32(request: pb.ModelInferRequest) -> None:
    nan_fp32(request)
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]


@pytest.mark.parametrize(
    ("change", "code", "detail"),
    [
        (lambda r: setattr(r, "model_name", "nope"), "NOT_FOUND", "no model named 'nope'"),
        (lambda r: setattr(r, "model_version", "7"), "NOT_FOUND", "has no version 7"),
        (lambda r: None, "INVALID_ARGUMENT", "cannot identify an image"),
        (lambda r: r.inputs[0].shape.extend([0]), "INVALID_ARGUMENT", "every dimension"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), "INVALID_ARGUMENT", "BYTES or FP32"),
        (lambda r: r.inputs.add(name="x"), "INVALID_ARGUMENT", "exactly one input"),
        (lambda r: r.outputs.add(name="logits"), "INVALID_ARGUMENT", "unknown output 'logits'"),
        (
            lambda r: (
                r.outputs.add(name="probabilities")
                .parameters["classification"]
                .CopyFrom(pb.InferParameter(int64_param=0))
            ),
            "INVALID_ARGUMENT",
            "'classification' must be an integer >= 1",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", "FP32"),
            "INVALID_ARGUMENT",
            "expected [-1, 1, 28, 28]",
        ),
        (lambda r: r.raw_input_contents.append(b"x"), "INVALID_ARGUMENT", "raw_input_contents"),
        (lambda r: r.inputs[0].shape.extend([-1]), "INVALID_ARGUMENT", "every dimension"),
        (lambda r: r.inputs[0].shape.extend([1] * 8), "INVALID_ARGUMENT", "at most 8"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 2**40), "INVALID_ARGUMENT", "every dimension"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 300), "INVALID_ARGUMENT", "the limit is 256"),
        (
            lambda r: r.raw_input_contents.__setitem__(0, b"\xff\xff\x00\x00ab"),
            "INVALID_ARGUMENT",
            "declares 65535 bytes",
        ),
        (nan_fp32, "INVALID_ARGUMENT", "NaN or infinite"),
        (short_fp32, "INVALID_ARGUMENT", "shape [1, 1, 28, 28] needs 3136"),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "garbage-bytes",
        "bad-shape",
        "datatype",
        "two-inputs",
        "unknown-output",
        "bad-classification",
        "fp32-shape",
        "two-raw",
        "negative-dim",
        "rank-9",
        "huge-dim",
        "too-many-images",
        "short-bytes",
        "nan",
        "short-fp32",
    ],
)
def test_errors_are_status_codes_with_the_detail(
    stub: GRPCInferenceServiceStub, change: object, code: str, detail: str
) -> None:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\x07\x00\x00\x00garbage")
    assert callable(change)
    change(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() == getattr(grpc.StatusCode, code), error.details()
    assert detail in (error.details() or "")


def test_message_over_the_body_limit_is_refused_by_grpc(stub: GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\0" * (16 * 1024 * 1024 + 1))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metrics_count_grpc_requests(
    server: ServerProcess, client: tgrpc.InferenceServerClient
) -> None:
    def scrape() -> str:
        return httpx.get(f"{server.url}/metrics", timeout=10).text

    before = scrape()
    image = images_input([png_bytes(held_out_digits(1, seed=2)[0].image)])
    client.infer("digits", [image])
    again = client.infer("digits", [image])  # the same image: the response cache answers
    failure(lambda: client.infer("nope", [image]))
    failure(lambda: client.infer("digits", [images_input([b"not an image"])]))
    after = scrape()

    def grew(**labels: str) -> float:
        name = "convserve_requests_total"
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew(model="digits", version="1", status="200") == 2
    hits = "convserve_cache_lookups_total"
    assert metric_value(after, hits, model="digits", result="hit") > metric_value(
        before, hits, model="digits", result="hit"
    )
    assert again.as_numpy("probabilities").shape == (1, 10)
    assert grew(model="-", status="404") == 1
    assert grew(model="digits", version="1", status="400") == 1


def test_config_and_statistics(server: ServerProcess, client: tgrpc.InferenceServerClient) -> None:
    rest = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        config = rest.get_model_config("digits")
        before = rest.get_inference_statistics("digits")["model_stats"][0]
        digits = held_out_digits(3, seed=3)
        client.infer("digits", [images_input([png_bytes(d.image) for d in digits])])
        after = rest.get_inference_statistics("digits", "1")["model_stats"][0]
        everything = rest.get_inference_statistics()["model_stats"]
    finally:
        rest.close()
    assert config["name"] == "digits"
    assert config["max_batch_size"] == 32
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000
    assert config["input"][1] == {"name": "input", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] > before["execution_count"]
    stats = after["inference_stats"]
    assert stats["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert stats["compute_infer"]["ns"] > 0
    assert stats["queue"]["count"] >= 3
    assert {(s["name"], s["version"]) for s in everything} == {("digits", "1"), ("lenet5", "1")}
    # the gRPC twins answer the same
    twin = client.get_model_config("digits", as_json=True)["config"]
    assert twin["max_batch_size"] == 32
    assert twin["input"][1]["data_type"] == "TYPE_FP32"
    grpc_stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    assert int(grpc_stats["inference_count"]) >= after["inference_count"]
    assert failure(lambda: client.get_model_config("nope")).status() == "StatusCode.NOT_FOUND"


def big_png(seed: int, side: int = 1200) -> bytes:
    """A large picture that compresses well: small to send, long to decode and shrink."""
    x = np.arange(side, dtype=np.uint32)
    pattern = ((x[:, None] * (7 + seed) + x[None, :] * 13) % 251).astype(np.uint8)
    return png_bytes(Image.fromarray(pattern), compress_level=1)


@pytest.mark.parametrize("workers", WORKERS)
def test_queue_full_is_resource_exhausted(tmp_path: Path, workers: str) -> None:
    env = {"CONVSERVE_WORKERS": workers, "CONVSERVE_MAX_QUEUE": "2", "CONVSERVE_CACHE_ENTRIES": "0"}
    with running_server(tmp_path, env) as server:
        client = tgrpc.InferenceServerClient(server.grpc)
        try:
            full = failure(lambda: client.infer("digits", [images_input([b"a", b"b", b"c"])]))
            assert full.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "holds 0 of 2 images" in full.message()
            # a flood: a pair of slow pictures holds both places while it decodes
            pair = images_input([big_png(1, side=3000), big_png(2, side=3000)])

            def send(_: int) -> str:
                try:
                    client.infer("digits", [pair])
                except InferenceServerException as exc:
                    return str(exc.status())
                return "OK"

            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(send, range(8)))
            assert "StatusCode.RESOURCE_EXHAUSTED" in codes
            assert "OK" in codes
            assert set(codes) <= {"StatusCode.RESOURCE_EXHAUSTED", "OK"}
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            refused = metric_value(text, "convserve_requests_total", model="digits", status="503")
            assert refused == 1 + codes.count("StatusCode.RESOURCE_EXHAUSTED")
        finally:
            client.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_deadline_is_deadline_exceeded(tmp_path: Path, workers: str) -> None:
    env = {"CONVSERVE_WORKERS": workers, "CONVSERVE_DEADLINE_MS": "1"}
    with running_server(tmp_path, env) as server:
        client = tgrpc.InferenceServerClient(server.grpc)
        try:
            late = failure(lambda: client.infer("digits", [images_input([big_png(0)])]))
            assert late.status() == "StatusCode.DEADLINE_EXCEEDED", late.message()
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert metric_value(text, "convserve_requests_total", model="digits", status="504") == 1
        finally:
            client.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_sigterm_drains_grpc(tmp_path: Path, workers: str) -> None:
    """An admitted call finishes; new calls get UNAVAILABLE and readiness turns false; exit 0."""
    env = {"CONVSERVE_WORKERS": workers, "CONVSERVE_DRAIN_DELAY_S": "2"}
    with running_server(tmp_path, env) as server:
        client = tgrpc.InferenceServerClient(server.grpc)
        slow = images_input([big_png(seed, side=3000) for seed in range(24)])
        outcome: list[object] = []
        call = threading.Thread(
            target=lambda: outcome.append(client.infer("digits", [slow], client_timeout=30))
        )
        call.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the call is admitted
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            if metric_value(text, "convserve_inflight_requests") >= 1:
                break
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        other = tgrpc.InferenceServerClient(server.grpc)
        try:
            deadline = time.monotonic() + 1.5
            while other.is_server_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not other.is_server_ready()
            assert not other.is_model_ready("digits")
            image = images_input([png_bytes(held_out_digits(1, seed=4)[0].image)])
            refused = failure(lambda: other.infer("digits", [image]))
            assert refused.status() == "StatusCode.UNAVAILABLE"
            assert "shutting down" in refused.message()
        finally:
            other.close()
        call.join(timeout=30)
        client.close()
        assert server.process.wait(timeout=30) == 0, server.output()
        (result,) = outcome
        assert isinstance(result, tgrpc.InferResult)
        assert result.as_numpy("probabilities").shape == (24, 10)


@pytest.mark.parametrize("workers", WORKERS)
def test_a_taken_grpc_port_stops_start_up(workers: str) -> None:
    """At once, naming the setting: not a worker that fails and is replaced again and again.
    Held with SO_REUSEPORT, as another convserve's gRPC server holds it: not joined either."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "CONVSERVE_WORKERS": workers,
            "CONVSERVE_PORT": str(free_port()),
            "CONVSERVE_GRPC_PORT": str(port),
        }
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert f"cannot serve gRPC on 127.0.0.1:{port} (CONVSERVE_GRPC_PORT)" in done.stderr


@pytest.mark.parametrize(
    "name", ["", "..", "../digits", "a/b", "digits%2F1", "\x00", "é" * 300, "x" * 100_000]
)
def test_hostile_model_names_get_a_status_never_a_crash(
    stub: GRPCInferenceServiceStub, client: tgrpc.InferenceServerClient, name: str
) -> None:
    assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready
    calls: list[Callable[[], object]] = [
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10),
        lambda: stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10),
        lambda: stub.ModelInfer(pb.ModelInferRequest(model_name=name or "nope"), timeout=10),
    ]
    if name:  # "" is every model (statistics) and the default version (metadata)
        calls += [
            lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=10),
            lambda: stub.ModelMetadata(
                pb.ModelMetadataRequest(name="digits", version=name), timeout=10
            ),
        ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert isinstance(caught.value, grpc.Call)
        code = caught.value.code()
        assert code in {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, (
            code,
            caught.value.details(),
        )
    assert client.is_server_ready()


def grpc_listeners(pid: int, port: int) -> int:
    """Listening TCP sockets of one process on `port` (IPv4 or IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                count += 1
    return count


def test_every_worker_serves_grpc_and_a_replacement_does_too(tmp_path: Path) -> None:
    with running_server(tmp_path, {"CONVSERVE_WORKERS": "2"}) as server:
        port = int(server.grpc.rsplit(":", 1)[1])
        fronts = child_pids(server, "service.front")
        assert len(fronts) == 2
        deadline = time.monotonic() + 10  # each starts its gRPC server after its own HTTP
        while not all(grpc_listeners(pid, port) == 1 for pid in fronts):
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        victim = min(fronts)
        os.kill(victim, signal.SIGKILL)
        client = tgrpc.InferenceServerClient(server.grpc)
        image = images_input([png_bytes(held_out_digits(1)[0].image)])
        try:
            deadline = time.monotonic() + 30
            replaced: set[int] = set()
            while time.monotonic() < deadline:
                replaced = child_pids(server, "service.front") - fronts
                if replaced and all(grpc_listeners(pid, port) == 1 for pid in replaced):
                    break
                time.sleep(0.1)
            assert len(replaced) == 1, server.output()
            for _ in range(10):  # whichever worker the kernel picks
                assert client.infer("digits", [image]).as_numpy("probabilities").shape == (1, 10)
        finally:
            client.close()
