"""A short, bounded run of the decode fuzzer (`make fuzz` runs it for ten minutes)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.data.make_corpus import HERE as CORPUS

TARGET = Path(__file__).resolve().parent / "fuzz_decode.py"
# Every input must decode within this resident size (the fuzzer's own included), as in `make fuzz`.
RSS_LIMIT_MB = int(
    re.search(r"FUZZ_RSS_MB := (\d+)", (TARGET.parent.parent / "Makefile").read_text())[1]  # type: ignore[index]
)


def test_decode_path_survives_fuzzing(tmp_path: Path) -> None:
    seeds = tmp_path / "corpus"  # the fuzzer adds what it finds: keep the committed corpus clean
    seeds.mkdir()
    for upload in CORPUS.glob("*.bin"):  # images: not the requests (.http) nor the heavy ones
        shutil.copy(upload, seeds)
    fuzz = shlex.join(
        [sys.executable, str(TARGET), str(seeds), "-max_total_time=20", "-seed=1",
         f"-rss_limit_mb={RSS_LIMIT_MB}", "-timeout=10", f"-artifact_prefix={tmp_path}/"]
    )  # fmt: skip
    # Through a shell that forks it: Linux carries a process's peak RSS (which libFuzzer's
    # limit reads) across exec, so spawned straight from this pytest process the fuzzer would
    # start at pytest's own peak (torch and the models: about 2 GB) and trip the limit.
    result = subprocess.run(
        ["sh", "-c", f"{fuzz}; exit $?"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    runs = re.search(r"Done (\d+) runs", result.stderr)
    assert runs is not None
    assert int(runs[1]) > 10_000
    found = [
        p.name for pattern in ("crash-*", "oom-*", "timeout-*") for p in tmp_path.glob(pattern)
    ]
    assert not found, result.stderr[-4000:]
