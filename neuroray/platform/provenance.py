"""Fingerprints: what produced an output, so a rerun resumes only the very same work.

Every resumable output (an ingested layer, LM layers, a blockwise segmentation, a benchmark
cache) keeps ``.neuroray/fingerprint.json``: its sources (path, size and modification time, or a
layer's own fingerprint) and every setting that changes the result. A rerun with the same
fingerprint resumes; a different one is refused before anything is written, naming what differs
and the flag that overwrites; an overwrite empties the output first, so no marker of the old
content can make a rerun skip work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from neuroray.errors import VolumeError
from neuroray.paths import absolute, local_file
from neuroray.platform.storage import get, put_atomic

FINGERPRINT_NAME = ".neuroray/fingerprint.json"
_METADATA_FILES = ("info", "zarr.json", ".zarray", ".zattrs")


def local_dir(path: str | Path) -> str:
    """A ``file://`` (or bucket) directory URL for a local path or URL."""
    text = str(path)
    return text if "://" in text else "file://" + absolute(text)


def read_fingerprint(directory: str) -> dict[str, Any] | None:
    content = get(directory, FINGERPRINT_NAME)
    return None if content is None else json.loads(content)


def write_fingerprint(directory: str, fingerprint: dict[str, Any]) -> None:
    put_atomic(directory, FINGERPRINT_NAME, json.dumps(fingerprint, sort_keys=True).encode())


def digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path: str | Path) -> dict[str, Any]:
    """A local file by path, size and modification time (cheap; a changed file shows)."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def source_identity(url: str, content_sha256: str | None = None) -> dict[str, Any]:
    """What identifies a source volume without reading it all.

    In-memory arrays pass their ``content_sha256``; local files are identified by
    :func:`file_identity`; a layer folder by its own fingerprint when neuroray wrote it, else by
    its metadata files; a remote URL by the URL alone (changes inside a bucket are not seen).
    """
    if content_sha256 is not None:
        return {"content_sha256": content_sha256}
    path = local_file(url)
    if path is None:
        return {"url": url}
    key = url.partition("#")[2]
    if path.is_file():
        return {**file_identity(path), **({"key": key} if key else {})}
    own = read_fingerprint(local_dir(path))
    if own is not None:
        return {"path": str(path.resolve()), "fingerprint": digest(own)}
    return {
        "path": str(path.resolve()),
        "metadata": {
            name: file_identity(path / name) for name in _METADATA_FILES if (path / name).is_file()
        },
    }


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every (nested) key whose value differs."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return found


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else "..." + text[-57:]  # a path's end tells it apart


def check_resume(directory: str, wanted: dict[str, Any], *, what: str, overwrite_hint: str) -> bool:
    """True when ``directory`` already holds ``what`` with this fingerprint (resume), False when
    it holds none; raises a VolumeError, before anything is written, when it holds another."""
    found = read_fingerprint(directory)
    if found is None:
        return False
    changed = differences(found, wanted)
    if changed:
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        raise VolumeError(
            f"{what} was written from other inputs or settings ({'; '.join(changed[:3])}{more}); "
            f"{overwrite_hint} to replace it, or choose another destination"
        )
    return True
