"""`tuneforge serve`'s settings: the one home of their defaults, help and ranges.

The command line's options are made from these fields (cli/options.py), and `ModelServer`, `load_server` and
`run_server` read the same object, so a default is written only here. This module imports no torch or FastAPI:
`tuneforge serve --help` builds its options from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.config import setting


@dataclass
class ServeSettings:
    host: str = setting("127.0.0.1", "Address to listen on (127.0.0.1: this machine only).")
    port: int = setting(8000, "Port to listen on.")
    api_key: str | None = setting(None, "Require 'Authorization: Bearer KEY' on every route but /health "
                                        "(default: $TUNEFORGE_API_KEY, else no key).")
    admin_dir: Path | None = setting(None, "Enable /admin/adapters to load and unload adapters found inside this "
                                           "directory at run time (off by default).")
    max_body_bytes: int = setting(1_000_000, "Largest request body, in bytes.", min=1)
    max_tokens_limit: int = setting(2048, "Largest max_tokens a request may ask for.", min=1)
    max_model_len: int | None = setting(None, "Limit on prompt + max_tokens (default: the model's context length).")
    max_concurrent: int = setting(32, "Requests answered at once; more get HTTP 429.", min=1)
    max_batch: int = setting(16, "Requests decoded together in one batch.", min=1)
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "Weight precision of the served model.")
    device: str = setting("cpu", "cpu or cuda.")
