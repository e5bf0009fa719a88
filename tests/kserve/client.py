"""KServe's InferenceGRPCClient against a running convserve, for tests/test_grpc.py: run with
the python of tests/kserve/.venv (kserve's dependencies clash with the project's pins), it
prints one JSON object of what the client saw.

    tests/kserve/.venv/bin/python tests/kserve/client.py HOST:PORT IMAGE
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(url: str, image: str) -> dict[str, object]:
    client = InferenceGRPCClient(url, retries=0)
    data = Path(image).read_bytes()
    tensor = InferInput("image", [1], "BYTES", data=[data])
    seen: dict[str, object] = {
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready("digits"),
    }
    response = await client.infer(InferRequest("digits", [tensor], request_id="kserve-1"))
    (output,) = response.outputs
    seen["output"] = {"name": output.name, "shape": list(output.shape),
                      "datatype": output.datatype,
                      "data": [float(x) for x in output.as_numpy().reshape(-1)]}  # fmt: skip
    seen["model"] = response.model_name
    try:
        await client.infer(InferRequest("no-such-model", [tensor]))
    except grpc.RpcError as error:
        seen["unknown_model"] = {"code": error.code().name, "details": error.details()}
    await client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
