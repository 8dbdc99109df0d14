"""tuneforge: fine-tune open LLMs on your own data.

The curated public API; everything else is internal and may change.
"""

__version__ = "0.1.0"


def load_config(path=None, overrides=()):
    from tuneforge.config import load_config as _load

    return _load(path, overrides)


def train(cfg, show_progress: bool = True):
    from tuneforge.train.loop import train as _train

    return _train(cfg, show_progress=show_progress)


__all__ = ["__version__", "load_config", "train"]
