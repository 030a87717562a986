"""The one rule every raysky package ``__init__`` follows.

A package's ``__init__`` is a docstring, ``__all__`` (its public names) and, when it has public
names, the ``__getattr__``/``__dir__`` pair built here: each name loads from the module that
defines it on first use. Importing a package therefore costs nothing (``raysky --help`` and
code that needs one low module never pay for torch, Ray, pandas or jinja2 through an
``__init__``), and each name has one definition. Code inside raysky imports from the defining
module; the package name is the public path for users (``raysky.results.read``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, modules: Mapping[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public names live in its submodules.

    ``modules`` maps each public name to the submodule (relative to ``package``) that defines
    it. A name that is also a submodule's name would be shadowed once that submodule is
    imported, so it is refused here rather than failing later.
    """
    for name, module in modules.items():
        if name in modules.values() or name == module:
            raise ValueError(f"{package}: public name {name!r} is also a submodule's name")

    def __getattr__(name: str) -> object:
        if name in modules:
            return getattr(importlib.import_module(f"{package}.{modules[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*importlib.import_module(package).__dict__, *modules})

    return __getattr__, __dir__
