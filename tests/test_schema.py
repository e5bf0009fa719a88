"""Property-based tests from the API's own OpenAPI schema (schemathesis, against a real server):
no 5xx for anything the schema allows or Hypothesis invents, and every response matches the
schema (status, content type, body, headers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import ARTIFACTS, running_server

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance"
)


def test_api_conforms_to_its_schema(tmp_path: Path) -> None:
    env = {"CONVSERVE_API_KEY": "schema-key", "CONVSERVE_MAX_BATCH_SIZE": "8"}
    with running_server(tmp_path, env) as server:
        schemathesis = Path(sys.executable).parent / "schemathesis"
        result = subprocess.run(
            [str(schemathesis), "run", f"{server.url}/schema/openapi.json",
             "--checks", CHECKS, "--max-examples", "40", "--seed", "1",
             "--header", "Authorization: Bearer schema-key", "--no-color"],
            capture_output=True, text=True, timeout=600, check=False,
            cwd=tmp_path,  # its .schemathesis/ cache stays out of the work tree
        )  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "schemathesis.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:]
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert tested is not None
    assert int(tested[1]) >= 24  # every operation, management and /v2 included
    cases = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert cases is not None
    assert cases[1] == cases[2]
    assert int(cases[1]) > 500
