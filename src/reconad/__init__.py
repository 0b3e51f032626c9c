"""reconad: unsupervised visual anomaly detection by reconstruction (RD4AD and its family).

Importing the package does nothing but define names; heavy modules load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_method": "reconad.registry",
    "list_methods": "reconad.registry",
    "register_method": "reconad.registry",
    "create_backbone": "reconad.backbones",
    "list_backbones": "reconad.backbones",
    "fit": "reconad.api",
    "fit_config": "reconad.api",
    "resume": "reconad.api",
    "evaluate": "reconad.api",
    "predict": "reconad.api",
    "calibrate": "reconad.api",
    "export": "reconad.api",
    "open_predictor": "reconad.deploy",
    "Detector": "reconad.deploy",
    "load": "reconad.api",
    "demo": "reconad.api",
    "make_config": "reconad.api",
    "load_official": "reconad.official",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reconad' has no attribute {name!r}")
