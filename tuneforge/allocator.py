"""The memory allocator `tuneforge train` runs with: tcmalloc when it is installed, glibc's malloc otherwise.

A training step allocates and frees the same large activation tensors again and again. glibc's malloc hands big
blocks back to the kernel and gets them again as fresh, zeroed pages, and keeps fragments of the rest resident;
tcmalloc keeps them in its caches. On the 2-core CPU of bench/train_speed.py that made LoRA steps on short rows
about 10-15% faster and the peak RSS about 15% lower (the README's benchmark table has the measured figures).

An allocator can only be chosen before a process starts (LD_PRELOAD), so the command re-executes itself once with
the library preloaded: when it is installed (Debian/Ubuntu: libtcmalloc-minimal4), nothing else is preloaded, and
TUNEFORGE_ALLOCATOR is not `system`. Code that calls `tuneforge.train` from Python keeps its process's allocator.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARY = "libtcmalloc_minimal.so.4"
SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
MARK = "TUNEFORGE_PRELOADED"  # set in the re-executed process: never re-execute twice


def find_tcmalloc() -> Path | None:
    return next((Path(d) / LIBRARY for d in SEARCH if (Path(d) / LIBRARY).is_file()), None)


def train_environment() -> dict[str, str] | None:
    """The environment `tuneforge train` re-executes itself with (tcmalloc preloaded), or None where it keeps this
    process's: asked for the system allocator, already re-executed, something else preloaded, or no tcmalloc."""
    if os.environ.get("TUNEFORGE_ALLOCATOR", "auto") == "system" or MARK in os.environ:
        return None
    if os.environ.get("LD_PRELOAD"):  # the user chose what to preload
        return None
    library = find_tcmalloc()
    if library is None:
        return None
    return {**os.environ, "LD_PRELOAD": str(library), MARK: str(library)}


def use_tcmalloc(argv: list[str]) -> None:
    """Re-execute `python -m tuneforge ARGV` with tcmalloc preloaded, when it can and should; else return."""
    env = train_environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tuneforge", *argv], env)


def allocator_line() -> str:
    """One line for the run's log: which allocator this process has."""
    if MARK in os.environ:
        return f"allocator: tcmalloc ({os.environ[MARK]}; TUNEFORGE_ALLOCATOR=system turns it off)"
    preload = os.environ.get("LD_PRELOAD")
    if preload:
        return f"allocator: LD_PRELOAD={preload}"
    return ("allocator: glibc malloc (installing tcmalloc, e.g. apt-get install libtcmalloc-minimal4, makes training "
            "faster and lighter: tuneforge preloads it when present)")
