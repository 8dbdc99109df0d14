"""The search space: dotted config keys, each with its choices or range.

By default it is centred on what `recommend` chooses for this run (the guide's tables): the learning rate on a log
range from a quarter to four times the table's rate for the method, the LoRA rank among 8-64 with alpha at twice the
rank (the guide's rule), the epochs up to the table's number for this many examples (each trial stops early on the
metric), and the warmup. A --space file replaces it; every key and every bound or choice in it is checked as the
run file's own `key=value` override would be (unknown key, value out of range: one line, exit 2). `method` choices
are kept only where the memory estimate says they fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.config import RunConfig, load_config
from tuneforge.errors import ConfigError, UserError

RANKS = (8, 16, 32, 64)
LR_SPAN = 4.0  # the default lr range: the table's rate / 4 .. x 4, searched on a log scale
WARMUP_RANGE = (0.0, 0.1)
LORA_METHODS = ("lora", "dora", "qlora")


@dataclass(frozen=True)
class Dimension:
    key: str  # a dotted config key
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    why: str = ""

    def suggest(self, trial):
        if self.choices:
            if all(_plain(c) for c in self.choices):
                return trial.suggest_categorical(self.key, list(self.choices))
            # Optuna's choices are plain values: a list (e.g. target_modules) is searched as its JSON text
            return json.loads(trial.suggest_categorical(self.key, [json.dumps(c) for c in self.choices]))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices:
            return f"{self.key} in {{{', '.join(map(str, self.choices))}}}"
        scale = " (log)" if self.log else ""
        return f"{self.key} in [{_short(self.low)}, {_short(self.high)}]{scale}"


@dataclass
class SearchSpace:
    dimensions: list[Dimension]
    source: str  # "recommend" or the --space file

    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    def overrides(self, params: dict) -> dict[str, object]:
        """A trial's values (as sampled, or as Optuna stored them) as config overrides, with what follows from them:
        lora.alpha = 2 x lora.r unless alpha is searched itself."""
        values = {key: _decoded(self, key, value) for key, value in params.items()}
        if "lora.r" in values and "lora.alpha" not in values:
            values["lora.alpha"] = 2.0 * values["lora.r"]
        return values

    def why(self, key: str) -> str:
        dim = next((d for d in self.dimensions if d.key == key), None)
        return "" if dim is None else f"{dim.describe()}{': ' + dim.why if dim.why else ''}"


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _decoded(space: "SearchSpace", key: str, value):
    """A stored categorical value back to what it stands for (lists were stored as JSON text)."""
    dim = next((d for d in space.dimensions if d.key == key), None)
    if dim is not None and dim.choices and not all(_plain(c) for c in dim.choices) and isinstance(value, str):
        return json.loads(value)
    return value


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_space(cfg: RunConfig, num_examples: int) -> SearchSpace:
    """Centred on recommend's choices for this method and this many training examples."""
    from tuneforge.method_registry import method_named
    from tuneforge.plan.recommend import EPOCHS_BY_SIZE, LR_BY_METHOD, _lookup

    planned = method_named(cfg.method).planner
    lr, lr_why = LR_BY_METHOD.get(planned, (cfg.train.lr, "the run file's rate"))
    dims = [Dimension("train.lr", low=lr / LR_SPAN, high=lr * LR_SPAN, log=True,
                      why=f"around recommend's {lr:g} ({lr_why})")]
    if cfg.method in LORA_METHODS:
        dims.append(Dimension("lora.r", choices=RANKS, why="recommend's ranks 8-64; lora.alpha follows at 2 x r"))
    epochs, epochs_why = _lookup(EPOCHS_BY_SIZE, num_examples)
    if epochs > 1:
        dims.append(Dimension("train.epochs", low=1, high=epochs, integer=True,
                              why=f"up to recommend's {epochs} ({epochs_why}); each trial stops early on the metric"))
    dims.append(Dimension("train.warmup_ratio", low=WARMUP_RANGE[0], high=WARMUP_RANGE[1],
                          why="no warmup to a tenth of the steps"))
    return SearchSpace(dims, "recommend")


def load_space(path: str, config_path: str | None, overrides: list[str], check_method_fits=None) -> SearchSpace:
    """A --space file: `key: [choice, ...]` or `key: {low: L, high: H, log: true}` per dotted config key. Every
    value is checked as an override of the run file; `check_method_fits(method) -> str | None` gives the reason a
    method does not fit (None: it fits)."""
    where = f"--space {path}"
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{where}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to choices or ranges")
    dims = []
    for key, spec in raw.items():
        check = lambda value: _checked(config_path, overrides, str(key), value, where)  # noqa: E731
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where}: {key}: an empty list of choices")
            choices = tuple(check(v) for v in spec)
            if key == "method" and check_method_fits is not None:
                kept = []
                for method in choices:
                    reason = check_method_fits(method)
                    if reason is None:
                        kept.append(method)
                    else:
                        print(f"tuneforge: tune: method {method} left out of the search: {reason}", flush=True)
                if not kept:
                    raise ConfigError(f"{where}: method: none of {', '.join(choices)} fits in memory")
                choices = tuple(kept)
            dims.append(Dimension(str(key), choices=choices, why=f"from {path}"))
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log"}
            if unknown or "low" not in spec or "high" not in spec:
                raise ConfigError(f"{where}: {key}: a range is {{low: L, high: H, log: true|false}}, got {spec}")
            low, high = check(spec["low"]), check(spec["high"])
            if not isinstance(low, (int, float)) or isinstance(low, bool) or not low < high:
                raise ConfigError(f"{where}: {key}: needs numbers with low < high, got low {low!r}, high {high!r}")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                raise ConfigError(f"{where}: {key}: a log range needs low > 0, got {low!r}")
            integer = isinstance(low, int) and isinstance(high, int)
            dims.append(Dimension(str(key), low=low, high=high, log=log, integer=integer, why=f"from {path}"))
        else:
            raise ConfigError(f"{where}: {key}: expected a list of choices or {{low, high, log}}, got {spec!r}")
    return SearchSpace(dims, path)


def _checked(config_path: str | None, overrides: list[str], key: str, value, where: str):
    """`value` as the run file's config would hold it for `key`; the config's own one-line error otherwise."""
    try:
        cfg = load_config(config_path, [*overrides, f"{key}={_override_text(value)}"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return _get(cfg, key)


def _override_text(value) -> str:
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
