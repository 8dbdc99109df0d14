"""Files that appear whole or not at all: written under a temporary name in the target directory, then renamed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class atomic_text_writer:
    """`with atomic_text_writer(path) as fh:` - on success the file replaces `path`; on an exception it vanishes,
    and whatever was at `path` before is untouched."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.fh = os.fdopen(fd, "w", encoding="utf-8")
        return self.fh

    def __exit__(self, exc_type, exc, tb):
        self.fh.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when the two paths name one existing file (so writing b would overwrite the input a)."""
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and a.resolve() == b.resolve()
