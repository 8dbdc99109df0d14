"""Run names from requests become directories inside the runs directory, and never anything else.

A run is named by its path relative to --runs ("demo", "bench-methods/lora"). Names with `..`, absolute paths,
backslashes or NUL are refused outright (400); a name that resolves outside the runs directory through a symlink,
or that is not a run (no config.yaml), is "not found" (404) so that probing learns nothing about the disk.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from tuneforge.run_dir import is_run


class PathRefused(Exception):
    """A request path the UI will not touch: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def run_dir(runs_root: Path, name: str) -> Path:
    """The run directory `name` under `runs_root`, resolved; PathRefused(400 or 404) otherwise."""
    if not name or "\x00" in name or "\\" in name:
        raise PathRefused(400, f"run {name!r}: not a run name")
    given = PurePosixPath(name)
    if given.is_absolute() or ".." in given.parts:
        raise PathRefused(400, f"run {name!r}: names are relative to the runs directory, without '..'")
    root = runs_root.resolve()
    resolved = (root / given).resolve()
    if not resolved.is_relative_to(root) or resolved == root:
        raise PathRefused(404, f"run {name!r}: no such run")
    if not is_run(resolved):
        raise PathRefused(404, f"run {name!r}: no such run")
    return resolved


def child_name(name: str, what: str) -> str:
    """A single path component chosen by a request (a review id), refused unless it is a plain name."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise PathRefused(400, f"{what} {name!r}: not a valid name")
    return name


def run_name(runs_root: Path, path: Path) -> str:
    """The name a request uses for the run at `path`."""
    return path.resolve().relative_to(runs_root.resolve()).as_posix()
