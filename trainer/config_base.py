"""What every config module shares: the error type and small checks. No torch, no other
UpCLIP import (trainer/config.py, trainer/eval/config.py and an export's generated modeling
file build on it)."""
from __future__ import annotations

import json
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key and the value."""


def check_positive(obj: Any, key: str, name: str) -> None:
    value = getattr(obj, name)
    if value <= 0:
        raise ConfigError(f"{key}.{name}={value} must be > 0")


def quoted_list_example(value: Any) -> str:
    """The JSON-quoted list a user most likely meant by ``value`` (the raw text YAML refused,
    e.g. ``[a photo of a {}, a {}]``, or what YAML made of it)."""
    if isinstance(value, str):
        inner = value.strip()
        if inner.startswith("[") and inner.endswith("]"):
            inner = inner[1:-1]
        items = [t.strip() for t in inner.split(",") if t.strip()] or ["..."]
    else:
        items = ["..."]
    return json.dumps(items)
