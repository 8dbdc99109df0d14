"""tuneforge: fine-tune open LLMs on your own data.

The curated public API; everything else is internal and may change.
"""

from tuneforge.version import __version__  # its own module: internal users import it without a cycle


def load_config(path=None, overrides=()):
    from tuneforge.config import load_config as _load

    return _load(path, overrides)


def train(cfg, show_progress: bool = True):
    from tuneforge.train.loop import train as _train

    return _train(cfg, show_progress=show_progress)


__all__ = ["__version__", "load_config", "train"]
