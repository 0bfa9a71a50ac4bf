"""MNIST from the original IDX files: find, verify, parse, and (for real users) fetch.

MNIST is by Y. LeCun, C. Cortes and C. J. C. Burges, distributed under CC BY-SA 3.0.

A file is accepted only if its *decompressed* content has the SHA-256 of the original
release: a gzip stream of the same bytes can differ from mirror to mirror, the content
cannot. Files are looked for as ``NAME.gz`` or ``NAME`` in ``DATA_DIR/mnist/`` and then
in ``DATA_DIR/`` itself.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError, DownloadError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of each decompressed file of the original release.
CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Public mirrors of the gzip files, tried in order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOAD_CHUNK = 1 << 16


def default_data_dir() -> Path:
    """``$PSGD_DATA_DIR``, else ``$XDG_CACHE_HOME/psgd``, else ``~/.cache/psgd``."""
    if os.environ.get("PSGD_DATA_DIR"):
        return Path(os.environ["PSGD_DATA_DIR"])
    return default_cache_dir()


def _candidates(data_dir: Path, name: str) -> list[Path]:
    return [d / f for d in (data_dir / "mnist", data_dir) for f in (name + ".gz", name)]


def find(data_dir: Path, name: str) -> Path | None:
    for path in _candidates(Path(data_dir), name):
        if path.is_file():
            return path
    return None


def read_verified(path: Path, name: str) -> bytes:
    """The decompressed content of ``path``, or a DataError saying what is wrong with it."""
    try:
        raw = path.read_bytes()
        content = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read it as MNIST's {name} ({exc}); the file is truncated or corrupt, delete it and fetch it again") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != CONTENT_SHA256[name]:
        raise DataError(
            f"{path}: content SHA-256 {digest[:16]}... is not that of the original {name} "
            f"({CONTENT_SHA256[name][:16]}...); the file is corrupt, truncated or another file: delete it and fetch it again"
        )
    return content


def parse_idx(content: bytes, name: str) -> np.ndarray:
    """An IDX file (ubyte data) as a uint8 array of the shape its header states (a view of
    ``content``: bytes, or a memory map)."""
    head = bytes(content[:4])
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
        raise DataError(f"{name}: not an IDX file of unsigned bytes")
    ndim = head[3]
    header = 4 + 4 * ndim
    head = bytes(content[:header])
    dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(content) != header + int(np.prod(dims)):
        raise DataError(f"{name}: IDX header says {dims}, but the file holds {len(content) - header} bytes of data")
    return np.frombuffer(content, np.uint8, offset=header).reshape(dims)


def mapped(path: Path, name: str) -> np.ndarray:
    """The IDX file ``name`` found at ``path`` as a read-only memory map of its decompressed
    content, verified. Every process on a machine that maps the same file shares its pages:
    256 workers hold MNIST's 47 MB of training images once, not 256 times (decompressed and
    converted to float32, each held 188 MB). A compressed file is decompressed once into a
    cache file in the user's cache (``$XDG_CACHE_HOME/psgd/decoded``; the data folder may
    be read-only and shared), named after its content's SHA-256 and checked against it at
    every map, written to a temporary name and renamed into place, so that workers starting
    together never map half a file."""
    if _magic(path) == b"\x1f\x8b":
        folder = default_cache_dir() / "decoded"
        target = folder / f"{name}-{CONTENT_SHA256[name][:16]}"
        if target.is_file():
            content = _verified_map(target, name)
            if content is not None:
                return parse_idx(content, name)
        if not _writable(folder):
            return parse_idx(read_verified(path, name), name)  # nowhere to cache it: in memory
        content = read_verified(path, name)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(content)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        del content
        path = target
    content = _verified_map(path, name)
    if content is None:
        read_verified(path, name)  # raises the DataError that says what is wrong
    return parse_idx(content, name)


def default_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "psgd"


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(2)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _verified_map(path: Path, name: str):
    """A read-only memory map of ``path`` if its content is MNIST's ``name``, else None."""
    try:
        content = np.memmap(path, np.uint8, mode="r")
    except (OSError, ValueError):
        return None
    if hashlib.sha256(content).hexdigest() != CONTENT_SHA256[name]:
        return None
    return content


def missing_message(data_dir: Path) -> str:
    names = ", ".join(n + ".gz" for n in FILES.values())
    return (
        f"MNIST is not in {data_dir}; run 'psgd fetch' to download it, or, offline, place "
        f"{names} in {Path(data_dir) / 'mnist'} (or point --data-dir / PSGD_DATA_DIR at a folder that has them)"
    )


def load(data_dir: Path | None = None, shared: bool = False) -> dict[str, np.ndarray]:
    """The four arrays (uint8 images (N, 28, 28), uint8 labels (N,)), verified. ``shared``:
    read-only memory maps that every process on the machine shares (see :func:`mapped`)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    arrays = {}
    for key, name in FILES.items():
        path = find(data_dir, name)
        if path is None:
            raise DataError(missing_message(data_dir))
        arrays[key] = mapped(path, name) if shared else parse_idx(read_verified(path, name), name)
    if arrays["train_images"].shape[0] != arrays["train_labels"].shape[0]:
        raise DataError("MNIST training images and labels differ in number")
    return arrays


def fetch(data_dir: Path | None = None, mirrors=MIRRORS, timeout: float = DOWNLOAD_TIMEOUT_S, log=None) -> Path:
    """Download whichever of the four files are missing or bad into ``DATA_DIR/mnist``.

    Each file goes to a temporary name in the same folder, is verified, and only then
    renamed into place, so an interrupted download never leaves a half file behind.
    Returns the folder. Raises DownloadError naming every mirror tried and why.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    target_dir = data_dir / "mnist"
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        existing = find(data_dir, name)
        if existing is not None:
            try:
                read_verified(existing, name)
                continue
            except DataError:
                pass  # replaced below
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name + ".gz"
            try:
                _download_verified(url, target_dir / (name + ".gz"), name, timeout)
                if log:
                    log(f"fetched {url}")
                if existing is not None and existing != target_dir / (name + ".gz"):
                    existing.unlink(missing_ok=True)  # a bad copy would shadow nothing, but confuse people
                break
            except (OSError, urllib.error.URLError, DataError) as exc:
                failures.append(f"{url}: {exc}")
        else:
            tried = "\n  ".join(failures)
            raise DownloadError(
                f"could not fetch {name}.gz from any mirror:\n  {tried}\n"
                f"Offline? Place the four MNIST .gz files in {target_dir} by hand (or set PSGD_DATA_DIR)."
            )
    return target_dir


def _download_verified(url: str, dest: Path, name: str, timeout: float) -> None:
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(DOWNLOAD_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        read_verified(Path(tmp), name)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
