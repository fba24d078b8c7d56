"""Safe file handling: atomic writes and checked reads.

Outputs are written to a temporary name beside the target, flushed and fsync'ed, then renamed, so
a crash never leaves a partial file under the final name. Inputs are opened read-only.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from neurofm.errors import NeurofmError

logger = logging.getLogger(__name__)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed and check it is writable, else raise NeurofmError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NeurofmError(
            f"cannot create output directory {path}: {error.strerror}; choose a writable output directory (--out)"
        ) from None
    if not os.access(path, os.W_OK):
        raise NeurofmError(
            f"output directory {path} is not writable; choose a writable output directory (--out)"
        )
    return path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left beside it; return what was removed.

    A temporary is ``.NAME.HOST-PID.<random>.tmp``: it is stale when HOST is this machine and process PID
    is gone (a SIGKILL or power cut skips the clean-up). Temporaries of live processes, or written from
    another host sharing the directory, are left alone.
    """
    path = Path(path)
    host = _host()
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        owner = candidate.name[len(path.name) + 2 :].split(".", 1)[0]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    if removed:
        logger.info("removed %d temporaries left by killed writers of %s", len(removed), path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``.

    Works for files and for directories: a directory target is swapped whole in one atomic
    ``renameat2(RENAME_EXCHANGE)`` (Linux), so a crash leaves either the old or the new directory under
    the final name. On any error the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    sweep_stale_temporaries(path)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    )
    target = tmp / path.name
    try:
        yield target
        if target.is_file():
            with open(target, "rb+") as handle:
                os.fsync(handle.fileno())
        if target.is_dir():
            if not path.exists():
                os.replace(target, path)
            elif not _exchange(target, path):  # no renameat2 (not Linux): two renames, a short window
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(target, path)
                shutil.rmtree(old, ignore_errors=True)
        elif target.exists():
            os.replace(target, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` to ``path`` atomically (gzip-free, so it stays fast to read)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically; numpy scalars/arrays are converted."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


def write_text(text: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_h5ad_path(path: str | os.PathLike) -> Path:
    """Check ``path`` exists and is an HDF5 file, else raise NeurofmError naming the fix."""
    path = Path(path)
    if not path.exists():
        raise NeurofmError(f"input file {path} does not exist; check the path (--data for run.py)")
    if path.is_dir():
        raise NeurofmError(f"input {path} is a directory; pass an .h5ad file, not a directory")
    with open(path, "rb") as handle:
        signature = handle.read(8)
    if signature != b"\x89HDF\r\n\x1a\n":
        raise NeurofmError(
            f"input file {path} is not an HDF5/.h5ad file (bad signature); pass an AnnData .h5ad file"
        )
    return path


def read_h5ad(path: str | os.PathLike, backed: bool = False) -> ad.AnnData:
    """Read an .h5ad read-only, turning unreadable/truncated files into one clear NeurofmError."""
    path = check_h5ad_path(path)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as error:  # h5py/anndata raise many types for corrupt files
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise NeurofmError(
            f"cannot read {path} as AnnData ({reason}); the file is truncated or not an .h5ad — re-export it"
        ) from None


def file_fingerprint(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """A cheap content fingerprint: size, mtime and a SHA-256 of the first and last MiB.

    Used as a cache key for input files too large to hash whole (atlas files are tens of GB).
    """
    import hashlib

    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(sample_bytes))
        if stat.st_size > sample_bytes:
            handle.seek(max(stat.st_size - sample_bytes, sample_bytes))
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()
