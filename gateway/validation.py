"""Turning pydantic's validation errors into the words users read (config and sidecar share it)."""

from __future__ import annotations

from typing import Any

import yaml


def key_path(loc: tuple) -> str:
    """``('routes', 'results', 0)`` -> ``routes.results[0]``, without pydantic's validator names."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and ("[" in item or "(" in item):
            continue  # pydantic's internal validator names, e.g. function-after[...]
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def show(value: Any, limit: int = 240) -> str:
    """A value as the user wrote it (YAML flow style for collections), cut to ``limit``: long
    enough that a file's path shows whole, short enough that a pasted key does not fill the screen."""
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True).strip()
    else:
        text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
