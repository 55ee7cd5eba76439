"""Module-level ``__getattr__`` for names whose modules are imported on first use."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_getattr(package: str, names: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """``__getattr__`` resolving ``names[name] = (module, attribute)``; other names raise AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in names:
            module, attr = names[name]
            return getattr(import_module(module), attr)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
