"""Small, atomic file operations on local folders and buckets (``file://``, ``gs://``, ``s3://``).

Markers, manifests and fingerprints are tiny files next to the data they describe. They are
written whole or not at all (readers never see part of one), and a folder neuroray wrote can be
emptied before an overwrite so that no marker of the old content survives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def put_atomic(directory: str, name: str, content: bytes) -> None:
    """Write ``directory/name`` so readers see the old file or the whole new one, never a part."""
    if directory.startswith("file://"):
        path = Path(directory.removeprefix("file://")) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    else:  # object stores replace whole objects atomically
        from cloudfiles import CloudFiles

        CloudFiles(directory).put(name, content, compress=None)


def get(directory: str, name: str) -> bytes | None:
    """The content of ``directory/name``, or None when it does not exist."""
    if directory.startswith("file://"):
        path = Path(directory.removeprefix("file://")) / name
        return path.read_bytes() if path.is_file() else None
    from cloudfiles import CloudFiles

    return CloudFiles(directory).get(name)


def delete(directory: str, name: str) -> None:
    """Delete ``directory/name`` if it exists."""
    if directory.startswith("file://"):
        Path(directory.removeprefix("file://"), name).unlink(missing_ok=True)
        return
    from cloudfiles import CloudFiles

    CloudFiles(directory).delete(name)


def remove_tree(directory: str) -> None:
    """Delete ``directory`` and everything under it (a local folder or a bucket prefix)."""
    if directory.startswith("file://"):
        path = Path(directory.removeprefix("file://"))
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return
    from cloudfiles import CloudFiles

    files = CloudFiles(directory)
    files.delete(list(files.list()))
