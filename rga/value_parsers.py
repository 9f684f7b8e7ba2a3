"""The value parsers of the run configuration (rga.config): each takes a string (a flag, a YAML or
JSON string) or an already-typed value and returns the typed value, or raises ValueError saying
what was expected. Flags of other commands (rga.search, rga.visualize, python -m rga.data) use them
too, so a value means the same everywhere."""
from __future__ import annotations

import argparse
import json
import math


_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


def _int(text, minimum):
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(f"expected an integer, got {text!r}")
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {text!r}") from None
    if v < minimum:
        raise ValueError(f"must be >= {minimum}, got {v}")
    return v


def positive_int(text) -> int:
    return _int(text, 1)


def nonneg_int(text) -> int:
    return _int(text, 0)


def any_int(text) -> int:
    return _int(text, -(2 ** 63))


def real(text) -> float:
    if isinstance(text, bool):
        raise ValueError(f"expected a number, got {text!r}")
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):  # NaN or infinity would only show up later, as a NaN loss
        raise ValueError(f"expected a finite number, got {text!r}")
    return v


def probability(text) -> float:
    v = real(text)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"must be in [0, 1], got {v}")
    return v


def boolean(text) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def string(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {text!r}")
    return text


def optional_path(text):
    """A path, or None for 'none' / '' / null."""
    if text is None or (isinstance(text, str) and text.lower() in ("", "none", "null")):
        return None
    return string(text)


def fused_arg(text):
    """on/off (or true/false, ...) -> bool; 'auto' -> True; anything else is a backend name."""
    if isinstance(text, bool):
        return text
    low = string(text).lower()
    if low in _TRUE + ("auto",):
        return True
    if low in _FALSE:
        return False
    return text


def stage_list(text) -> tuple:
    """'1,2,3,4' / '2,3' / [2, 3] -> a sorted tuple of distinct stages in 1..4."""
    items = text.replace(" ", "").split(",") if isinstance(text, str) else text
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected stages like 1,2,3,4 or 2,3, got {text!r}")
    try:
        stages = tuple(sorted({any_int(s) for s in items if s != ""}))
    except ValueError:
        raise ValueError(f"expected stages like 1,2,3,4 or 2,3, got {text!r}") from None
    if not stages or any(not 1 <= s <= 4 for s in stages):
        raise ValueError(f"expected a non-empty subset of 1,2,3,4 (for no attention use --model baseline), "
                         f"got {text!r}")
    return stages


def int_list(text) -> list:
    """[80, 120] / '80,120' / '80 120' -> a list of ints >= 0."""
    items = text.replace(",", " ").split() if isinstance(text, str) else text
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected a list of integers, got {text!r}")
    return [nonneg_int(v) for v in items]


def parse_kv(text: str):
    """'key=value' -> (key, value); the value is read as JSON when it can be (numbers, true, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key.strip(), value


def kv_dict(value) -> dict:
    """{'k': v} / ['k=v', ...] / [('k', v), ...] -> dict (extra keywords for build_dataset)."""
    if isinstance(value, dict):
        return {string(k): v for k, v in value.items()}
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected KEY=VALUE strings or an object, got {value!r}")
    out = {}
    for item in value:
        if isinstance(item, str):
            try:
                item = parse_kv(item)
            except argparse.ArgumentTypeError as e:
                raise ValueError(str(e)) from None
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[string(item[0])] = item[1]
    return out


def choice(*options):
    def parse(text):
        if text not in options:
            raise ValueError(f"expected one of {', '.join(map(str, options))}; got {text!r}")
        return text
    parse.choices = options
    return parse
