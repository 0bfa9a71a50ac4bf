"""Files written atomically: a reader (or a crash) never sees half a file.

One writer for every file psgd leaves behind that another process may read while it is
written: checkpoints, saved weights, the server's ready file, a run's summary.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data) -> None:
    """Write ``data`` (bytes, str, or a callable ``writer(fileobj)``) to a temporary file
    beside ``path``, fsync it, then rename it over ``path``. Raises OSError (a full disk,
    say) with ``path`` untouched and no temporary file left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
