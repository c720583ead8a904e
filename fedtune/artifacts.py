"""Plain-file artifacts: hashing, atomic writes and atomic folders.

Every artifact is written under a temporary name in the folder it will live in and then renamed,
so a crash never leaves a half-written artifact under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from fedtune import __version__
from fedtune.errors import BadInput


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write `data` to `path` all at once or not at all. `private` keeps the file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if not private:  # mkstemp creates 0600; artifacts are shared files, so give them the usual permissions.
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: not valid JSON ({err})") from None


@contextlib.contextmanager
def atomic_folder(final: Path, replace: bool = False, private: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it is renamed to `final`.

    Args:
        final: where the finished folder must appear.
        replace: swap out an existing folder instead of refusing.
        private: names of files that keep the owner-only mode they were written with (secrets, a ledger).
    """
    if final.exists() and not replace:
        raise BadInput(f"{final}: already exists; remove it or write somewhere else")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                if child.name not in private:
                    os.chmod(child, 0o666 & ~_umask())
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stamp() -> dict[str, str]:
    """Provenance fields every manifest carries."""
    return {"fedtune_version": __version__, "created": now()}
