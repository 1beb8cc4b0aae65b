"""Flag types shared by the commands: a bad flag value is a one-line usage error naming the flag and what
it takes (exit status 2), before any model loads. A flag that sets a recipe-section field is checked
against that field's own type and range (`field_value`), so the range is declared once, next to the
default. (A leading underscore: cli.py does not register this module as a command.)"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Annotated, Any


def at_least(low: int) -> Callable[[str], int]:
    """An integer flag >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def between(low: int, high: int) -> Callable[[str], int]:
    """An integer flag in [low, high] (a port, a count with a hard ceiling)."""
    def parse(text: str) -> int:
        value = at_least(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {value}")
        return value
    parse.__name__ = f"integer in {low}..{high}"
    return parse


def positive_number(text: str) -> float:
    """A finite float flag > 0 (seconds, a scale)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def field_value(where: str) -> Callable[[str], Any]:
    """A flag that sets a section field, `where` = "module:Section.field" (e.g.
    "lmlab.schema.sections:SamplingConfig.temperature"): the value must pass the field's type and range.
    The schema is imported when the flag is used, not when the parser is built (`lmlab --help` stays fast)."""
    module, _, path = where.partition(":")
    section_name, _, name = path.partition(".")

    def parse(text: str) -> Any:
        from pydantic import ConfigDict, TypeAdapter, ValidationError

        from lmlab.schema.load import describe

        section = getattr(importlib.import_module(module), section_name)
        info = section.model_fields[name]
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        adapter = TypeAdapter(kind, config=ConfigDict(strict=True, allow_inf_nan=False))
        number = float if "float" in str(info.annotation) else int
        try:
            value = number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if number is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return adapter.validate_python(value)
        except ValidationError as err:
            expected = describe(err, section, "").split(": expected ", 1)[-1].split(", got ")[0]
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}") from None
    parse.__name__ = name
    return parse

