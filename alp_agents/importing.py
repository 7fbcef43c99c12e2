"""Importing the user's own code that a config names: `module:attribute` strings and environment modules."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any


def import_module(module: str) -> ModuleType:
    """`module`, imported; ImportError saying what to do when it is not on the import path or lacks a dependency.

    Errors inside the module other than a missing import propagate as they are: their traceback is what the user needs.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and (module == error.name or module.startswith(error.name + ".")):
            top = module.partition(".")[0]
            raise ImportError(f"no module named {module!r} on the import path (the working directory is {os.getcwd()}): run from "
                              f"the directory that holds {top}.py (or {top}/), add that directory to PYTHONPATH, or pip install "
                              "your package") from None
        raise ImportError(f"importing {module!r} failed: it imports {error.name!r}, which is not installed") from None


def import_target(target: str) -> Any:
    """The object a `module:attribute` string names; ImportError saying what is wrong when it cannot be had."""
    module, _, attribute = target.partition(":")
    imported = import_module(module)
    try:
        return getattr(imported, attribute)
    except AttributeError:
        raise ImportError(f"module {module!r} ({imported.__file__}) has no attribute {attribute!r}") from None
