"""Content hashes of a run's data files, kept in every checkpoint: a resume on a file edited under the same path
would continue a different data stream, and the path alone cannot tell."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tuneforge.config import DataSettings, data_sources

CHUNK = 1 << 20


def data_file_hashes(data: DataSettings) -> dict[str, str]:
    """{path: sha256 hex} of every local training and validation source (a saved `datasets` directory hashes its
    files' names and contents); hub datasets (`hf:`) have no local file and are left out."""
    hashes: dict[str, str] = {}
    for value in (data.train, data.val):
        for source in data_sources(value) if value is not None else []:
            if source.path and not source.path.startswith("hf:"):
                hashes[source.path] = _hash_path(Path(source.path))
    return hashes


def changed_data_files(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """The paths whose content differs from the checkpoint's (paths the checkpoint does not know are compared by the
    config's data keys, not here)."""
    return [path for path, digest in current.items() if path in saved and saved[path] != digest]


def _hash_path(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
