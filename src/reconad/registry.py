"""Method registry: names → classes. Registering a name twice is an error."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` creatable by its ``name``."""
    name = cls.name
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_METHODS[name].__qualname__}")
    _METHODS[name] = cls
    return cls


# The built-in methods, imported by name on first use (a plugin table, like entry points): the registry sits below
# the methods, which import it to register themselves, so it must not import them statically.
BUILTIN_METHOD_MODULES = ("reconad.methods.rd4ad", "reconad.methods.recontrast", "reconad.methods.rdpp",
                          "reconad.methods.gnl", "reconad.methods.ulsad", "reconad.methods.ssl_ae")


def _ensure_builtin_methods() -> None:
    from importlib import import_module

    for module in BUILTIN_METHOD_MODULES:
        import_module(module)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _ensure_builtin_methods()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[Method]:
    _ensure_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def create_method(name: str, cfg: Any = None, backbone: Any = None, **overrides: Any) -> Method:
    """Build a method by name.

    Args:
        name: a registered method name (see :func:`list_methods`).
        cfg: the method's ``Config`` instance; defaults reproduce the official code.
        backbone: a :class:`reconad.backbones.Backbone`, or ``None`` for the method's default backbone
            built with ImageNet weights.
        **overrides: fields of the method's ``Config`` to change.
    """
    from dataclasses import replace

    from .backbones import create_backbone

    cls = get_method_class(name)
    cfg = cfg if cfg is not None else cls.Config()
    if overrides:
        cfg = replace(cfg, **overrides)
    if backbone is None:
        backbone = create_backbone(cls.default_backbone, trainable=cls.trainable_backbone)
    return cls(cfg, backbone)
