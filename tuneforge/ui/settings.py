"""The dashboard's answer settings (playground and blind review): the one home of their defaults and ranges.

The routes (app.py) take a request's missing values from here and check given ones against the ranges, and the
pages' inputs show the same numbers: app.py fills `{{name}}`, `{{name.min}}` and `{{name.max}}` in the HTML it
serves (`fill_page`), so no page repeats a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tuneforge.config import setting
from tuneforge.errors import UserError


@dataclass
class AnswerSettings:
    max_new_tokens: int = setting(128, "Longest answer, in tokens (playground and review).", min=1, max=1024)
    temperature: float = setting(0.0, "Playground sampling temperature; 0: greedy.", min=0, max=2)
    top_p: float = setting(1.0, "Playground nucleus sampling: the likeliest tokens up to this total probability.",
                           min=0.01, max=1)
    limit: int = setting(20, "Prompts in a new review: the first rows of its evaluation file (people read them all).",
                         min=1, max=1000)
    review_batch_size: int = setting(8, "Prompts answered together while a review's answers are generated.", min=1)


ANSWER = AnswerSettings()
FIELDS = {f.name: f for f in dataclasses.fields(AnswerSettings)}


def checked(name: str, value):
    """`value` as setting `name`'s type, within its range; a one-line error otherwise."""
    fld = FIELDS[name]
    low, high = fld.metadata["min"], fld.metadata["max"]
    try:
        number = type(fld.default)(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or not low <= number <= (high if high is not None else number):
        raise UserError(f"{name}: expected a number from {low} to {high}, got {value!r}")
    return number


def from_body(body: dict, name: str):
    """body[name] checked, or the default when the request leaves it out."""
    return checked(name, body.get(name, FIELDS[name].default))


def fill_page(html: str) -> str:
    """A page's `{{name}}`, `{{name.min}}` and `{{name.max}}` replaced by the settings' defaults and bounds."""
    for name, fld in FIELDS.items():
        for suffix, value in (("", fld.default), (".min", fld.metadata["min"]), (".max", fld.metadata["max"])):
            if value is not None:
                html = html.replace("{{" + name + suffix + "}}", f"{value:g}")
    return html
