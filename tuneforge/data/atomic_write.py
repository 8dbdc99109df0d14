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
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the result should look like any new file
        self.fh = os.fdopen(fd, "w", encoding="utf-8")
        return self.fh

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                # On disk before the rename: otherwise a crash just after it could leave an empty file at `path`.
                self.fh.flush()
                os.fsync(self.fh.fileno())
            self.fh.close()
        except BaseException:  # the write itself failed at the end (a full disk shows up here): keep `path` as it was
            self.fh.close()
            os.unlink(self.tmp)
            raise
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when the two paths name one existing file (so writing b would overwrite the input a)."""
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and a.resolve() == b.resolve()
