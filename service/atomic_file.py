"""Files written whole or not at all: under a temporary name in the same folder, then renamed
over the target, so a reader (another worker, a restarted process, `convserve train`) never
sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, content: bytes, prefix: str = ".writing-") -> None:
    """Write `content` to `path`; on any failure the temporary file is removed and the error
    raised (OSError for a disk that is full or gone)."""
    handle, staging = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        Path(staging).replace(path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
