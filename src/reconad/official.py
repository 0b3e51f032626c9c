"""Import checkpoints saved by the official implementations (``reconad.load_official``).

Each method's mapping (its class attribute ``official_layout``) is a table of key-prefix renames (module
structure is kept close to the official code on purpose), plus the official keys we deliberately do not build
(e.g. the encoder's unused ``layer4``).
Key names and shapes of each official model are listed in ``spec/official_keys/<method>.json``.
Checkpoint files are read without executing code (:func:`reconad.backbones.read_tensor_file`): a pickle that needs
code execution is refused with a one-line :class:`~reconad.backbones.WeightsUnavailableError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .backbones import WeightsUnavailableError, file_weights_source, read_tensor_file
from .errors import ConfigError
from .methods.base import OfficialLayout  # noqa: F401  (re-exported: reconad.official.OfficialLayout)

if TYPE_CHECKING:
    from .methods.base import Method

CHECKPOINT_SETTING = "load_official checkpoint"
"""How error messages name the file argument of :func:`load_official`."""


class OfficialLayoutError(WeightsUnavailableError, KeyError):
    """A checkpoint whose keys are not the official layout of the method (also a ``KeyError``, as before)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


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
    state = read_tensor_file(path_or_state, setting=CHECKPOINT_SETTING)  # never executes code from the file
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(f"official checkpoint {path_or_state} holds a {type(state).__name__}, not a "
                                      "state dict; pass the file the official training script saved")
    return _flatten(state)


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
        raise OfficialLayoutError(f"{len(unknown)} keys are not part of the official {method} layout, e.g. "
                                  f"{unknown[:5]}; is this a checkpoint of another method or code base?")
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
        raise ConfigError(f"no official checkpoint layout for {method!r}; supported: {', '.join(supported)}")
    return layout


def load_official(method: str, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                  backbone: str = "wide_resnet50_2", backbone_weights: str | None = "imagenet",
                  **config: Any) -> Method:
    """Build ``method`` and fill it with an official checkpoint.

    Args:
        method: a method whose class declares ``official_layout`` (``"rd4ad"``, …).
        path_or_state_dict: a ``.pth`` file (read with ``weights_only=True``: a pickle that needs code execution
            is refused), a ``.safetensors`` file (flat keys), or a state dict in the official layout (flat, or
            nested by module as the official scripts save it).
        backbone: the encoder architecture the checkpoint was trained with.
        backbone_weights: where encoder weights come from when the checkpoint does not hold them (the official
            RD4AD script saves only ``bn`` and ``decoder``): ``"imagenet"`` or a file path.
        **config: fields of the method's Config.
    Returns:
        The method in eval mode, on the CPU; ``model.backbone.weights_source`` says where the encoder came from.

    Raises:
        WeightsFileNotFoundError: No such file (also a ``FileNotFoundError``).
        WeightsUnavailableError: The file cannot be read safely, or does not fit the model (one line).
        OfficialLayoutError: Keys that are not the method's official layout (also a ``KeyError``).
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
        raise WeightsUnavailableError(
            f"official {method} checkpoint does not fit a {backbone} model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}, shape mismatches {wrong[:5]} ({len(missing)}/{len(extra)}/{len(wrong)} in total); "
            "pass the backbone it was trained with (backbone=...)")
    model.load_state_dict(state, strict=False)
    if has_encoder:
        model.backbone.weights_source = (file_weights_source(path_or_state_dict)
                                         if not isinstance(path_or_state_dict, Mapping) else "official state dict")
    return model.eval()
