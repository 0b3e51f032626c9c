"""Import checkpoints saved by the official implementations (``reconad.load_official``).

Each method's mapping (its class attribute ``official_layout``) is a table of key-prefix renames (module
structure is kept close to the official code on purpose), plus the official keys we deliberately do not build
(e.g. the encoder's unused ``layer4``).
Key names and shapes of each official model are listed in ``spec/official_keys/<method>.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .methods.base import OfficialLayout  # noqa: F401  (re-exported: reconad.official.OfficialLayout)

if TYPE_CHECKING:
    from .methods.base import Method





def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """Nested dicts (the RD4AD repo saves ``{"bn": ..., "decoder": ...}``) → one flat ``a.b.c`` dict."""
    flat: dict[str, Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            flat[f"{prefix}{key}"] = value
    return flat


def _read_state(path_or_state: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    if isinstance(path_or_state, Mapping):
        return _flatten(path_or_state)
    if not os.path.isfile(path_or_state):
        raise FileNotFoundError(f"official checkpoint not found: {path_or_state}")
    return _flatten(torch.load(path_or_state, map_location="cpu", weights_only=True))


def rename_official(method: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official key names → reconad key names; unknown keys are an error that lists them."""
    layout = _layout(method)
    renamed, unknown = {}, []
    for key, value in state.items():
        if key.startswith(layout.unused):
            continue
        target = next((new + key[len(old):] for old, new in layout.renames if key.startswith(old)), None)
        if target is None:
            unknown.append(key)
        else:
            renamed[target] = value
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not part of the official {method} layout, e.g. {unknown[:5]}")
    return renamed


def to_official(method: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse rename (reconad → official), for exporting or for building test fixtures."""
    layout = _layout(method)
    out = {}
    for key, value in state.items():
        old_new = next(((old, new) for old, new in layout.renames if key.startswith(new)), None)
        if old_new is None:
            raise KeyError(f"no official name for {key!r}")
        out[old_new[0] + key[len(old_new[1]):]] = value
    return out


def _layout(method: str) -> OfficialLayout:
    """Each method class declares its ``official_layout`` next to its code."""
    from .registry import get_method_class, list_methods

    layout = getattr(get_method_class(method), "official_layout", None)
    if layout is None:
        supported = [m for m in list_methods() if getattr(get_method_class(m), "official_layout", None)]
        raise ValueError(f"no official checkpoint layout for {method!r}; supported: {', '.join(supported)}")
    return layout


def load_official(method: str, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                  backbone: str = "wide_resnet50_2", backbone_weights: str | None = "imagenet",
                  **config: Any) -> Method:
    """Build ``method`` and fill it with an official checkpoint.

    Args:
        method: a method whose class declares ``official_layout`` (``"rd4ad"``, …).
        path_or_state_dict: a ``.pth`` file or a state dict in the official layout (flat, or nested by module
            as the official scripts save it).
        backbone: the encoder architecture the checkpoint was trained with.
        backbone_weights: where encoder weights come from when the checkpoint does not hold them (the official
            RD4AD script saves only ``bn`` and ``decoder``): ``"imagenet"`` or a file path.
        **config: fields of the method's Config.
    Returns:
        The method in eval mode, on the CPU.
    """
    from .backbones import create_backbone
    from .registry import create_method, get_method_class

    state = rename_official(method, _read_state(path_or_state_dict))
    has_encoder = any(k.startswith("backbone.") for k in state)
    cls = get_method_class(method)
    encoder = create_backbone(backbone, weights=None if has_encoder else backbone_weights,
                              trainable=cls.trainable_backbone)
    model = create_method(method, backbone=encoder, **config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (k.startswith("backbone.") and not has_encoder)]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise ValueError(f"official {method} checkpoint does not fit a {backbone} model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, shape mismatches {wrong[:5]} "
                         f"({len(missing)}/{len(extra)}/{len(wrong)} in total)")
    model.load_state_dict(state, strict=False)
    return model.eval()
