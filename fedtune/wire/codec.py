"""Bytes that arrive from another party: read with a size cap, never through a link, parsed strictly.

A file that crosses a boundary may be anything: a symlink to another site's file or to /dev/zero, a FIFO that
never ends, a 2 GB sparse file, JSON nested 100k deep or holding a 5000-digit number. Every reader here opens the
path once (no following links, no blocking on FIFOs), checks it is a regular file under a cap, and parses
what it read, so nothing is ever reopened by path after it was checked.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any


class WireError(Exception):
    """Bytes from another party that cannot be used; the message names the file and what is wrong."""


def printable(text: object, limit: int = 80) -> str:
    """`text` safe for a terminal and a log line: control characters escaped, long values cut."""
    value = str(text)
    cleaned = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in value[:limit])
    # An escaped character takes up to 10, so the cut is made on what is printed: the result stays bounded.
    if len(value) > limit or len(cleaned) > limit:
        return cleaned[:limit] + "…"
    return cleaned


def open_regular(path: Path, max_bytes: int) -> tuple[int, int]:
    """An open descriptor of `path` and its size; refuses links, FIFOs, devices and files over `max_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise WireError(f"{path.name}: missing") from None
    except OSError as err:
        if os.path.islink(path):
            raise WireError(f"{path.name}: is a symbolic link; send the file itself") from None
        raise WireError(f"{path.name}: cannot be opened ({err.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise WireError(f"{path.name}: not a regular file (a FIFO, device or folder)")
        if info.st_size > max_bytes:
            raise WireError(f"{path.name}: {info.st_size} bytes, over the limit of {max_bytes}")
        return fd, info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most `max_bytes` bytes, read through one descriptor."""
    fd, _size = open_regular(path, max_bytes)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew after the size check
        raise WireError(f"{path.name}: over the limit of {max_bytes} bytes")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise WireError(f"key '{printable(duplicate)}' appears twice")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise WireError(f"{name} is not JSON")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(data: bytes, source: str) -> Any:
    """Strict JSON: UTF-8 (no escaped lone surrogates), no duplicate keys, no NaN/Infinity, bounded nesting and
    number size."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise WireError(f"{source}: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except WireError as err:
        raise WireError(f"{source}: {err}") from None
    except RecursionError:
        raise WireError(f"{source}: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and ints past Python's digit limit
        raise WireError(f"{source}: not valid JSON ({printable(err, 120)})") from None
    # Python accepts a \u escape of a lone surrogate; it is no character, cannot be written as UTF-8 again
    # (canonical_json) and other readers (safetensors) refuse it.
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise WireError(f"{source}: not valid JSON (a \\u escape of a lone surrogate, which is no "
                            "character)") from None
        except RecursionError:
            raise WireError(f"{source}: nested too deeply") from None
    return value


def canonical_json(value: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def pretty_json(value: Any) -> bytes:
    """How a manifest is written to disk (readable; its signature covers `canonical_json` of the same value)."""
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
