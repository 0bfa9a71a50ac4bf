"""Files written atomically: a reader (or a crash) never sees half a file.

One writer for every file psgd leaves behind that another process may read while it is
written: checkpoints, saved weights, the server's ready file, a run's summary.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError


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


# Everything numpy, zipfile and zlib raise for a file that is not a whole .npz: truncated
# (BadZipFile, EOFError), corrupt (zlib.error, a CRC ValueError), a pickle (ValueError with
# allow_pickle=False), a folder or no permission (OSError).
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_npz(path: Path, what: str = "data file") -> dict:
    """Every array of the .npz at ``path``, read in full now (a lazy read would fail later,
    somewhere else). Any unreadable file raises DataError, one line naming the file and why."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with f:
            return {k: f[k] for k in f.files}
    except NPZ_READ_ERRORS as exc:
        why = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise DataError(f"{what} {path} is not a readable .npz ({type(exc).__name__}: {why}); "
                        "it is truncated, corrupt or of another format") from None
