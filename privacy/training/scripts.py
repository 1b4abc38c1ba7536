"""Loading the build scripts in ``tools/`` by path: ``tools`` is not a package, yet
``build_models.py`` and ``train_dp.py`` use each other, and tests and attack worlds use them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(name: str, path: Path) -> ModuleType:
    """The script at ``path`` as module ``name``, loaded once per process.

    Registered in :data:`sys.modules` before it runs: dataclasses resolve their
    annotations through it, and a second caller gets the same module (the same classes).
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
