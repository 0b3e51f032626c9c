"""Fast inference switches: conv–BN folding, channels_last, bf16/fp16 autocast and torch.compile change numbers
slightly; the TorchScript trace (``eval.trace``) does not. Each is off by default (``EvalConfig``);
``benchmarks/speed.py`` reports the speed of each next to its measured max |Δ| of the maps against the float32 path
(docs/performance.md).

The engine calls :func:`apply_inference_speedups` once on a model that is only used for inference (evaluation,
prediction, serving) after it is loaded and moved to its device; nothing here chooses a device.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
log = logging.getLogger(__name__)


def fold_conv_bn(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the conv before it, in place: ``bn(conv(x)) == conv'(x)`` up to rounding.

    ``W' = W·γ/√(σ²+ε)`` per output channel, ``b' = (b − μ)·γ/√(σ²+ε) + β`` (``torch.nn.utils.fusion``); a
    transposed conv keeps its output channels on the weight's second axis.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight if bn.affine else None, bn.bias if bn.affine else None,
                                        transpose=isinstance(conv, nn.ConvTranspose2d))
    conv.weight, conv.bias = weight, bias


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` (normalising ``conv``'s output) folds into ``conv``: channels agree, running statistics."""
    if not (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None):
        return False
    if isinstance(conv, nn.ConvTranspose2d):
        # one scale per output channel only when the output channels are not split into groups on the weight
        return type(conv) is nn.ConvTranspose2d and conv.groups == 1 and bn.num_features == conv.out_channels
    return isinstance(conv, nn.Conv2d) and bn.num_features == conv.out_channels


def _without_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a folded BN: nothing, or timm's activation (+ drop) of a ``BatchNormAct2d``."""
    rest = [m for name in ("drop", "act") if isinstance(m := getattr(bn, name, None), nn.Module)]
    rest = [m for m in rest if not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def fold_batchnorm(module: nn.Module, keep: Sequence[nn.Module] = ()) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that normalises a ``Conv2d`` / ``ConvTranspose2d`` output, in place: a
    BN registered right after a conv in the same parent, or a pair the parent declares.

    Registration order is the call order in torchvision ResNets (``convK``/``bnK``, ``downsample``), timm
    EfficientNets (``conv_dw``/``bn1``, ``conv_pw``/``bn2``, ``BatchNormAct2d`` keeping its activation) and
    reconad's own networks (OCBE, RD decoders, ULSAD's FRN, the SDC autoencoder); a module whose convs and BNs
    are registered in another order names its pairs in a ``conv_bn_pairs`` attribute (ULSAD's global autoencoder).
    That every method's folded maps equal its plain maps is tested (tests/test_acceleration.py). Only valid for a
    module that stays in eval mode (running statistics are baked in). Nothing inside a module of ``keep`` is
    folded. Returns the number folded.
    """
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (it bakes in the running statistics)")
    kept = {id(m) for k in keep for m in k.modules()}
    folded = 0
    for parent in list(module.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if id(conv) not in kept and id(bn) not in kept and _foldable(conv, bn):
                with torch.no_grad():
                    fold_conv_bn(conv, bn)
                setattr(parent, bn_name, _without_norm(bn))
                folded += 1
    return folded


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv, BN) child names of ``parent`` where the BN normalises that conv's output: consecutive children, plus
    what the module declares in ``conv_bn_pairs`` where its call order is not its registration order."""
    children = list(parent.named_children())
    pairs = [(a, b) for (a, _), (b, _) in zip(children, children[1:])]
    return pairs + list(getattr(parent, "conv_bn_pairs", ()))


def _wrap_forward(method: nn.Module, context: Callable[[], AbstractContextManager]) -> None:
    original = method.forward

    @functools.wraps(original)
    def forward(images: Tensor, *args: Any, **kwargs: Any):
        with context():
            out = original(images, *args, **kwargs)
        # maps and scores leave in float32 whatever the compute dtype
        return type(out)(*(t.float() for t in out)) if isinstance(out, tuple) else out

    method.forward = forward


def _channels_last_inputs(_module: nn.Module, args: tuple) -> tuple:
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest)


class _Forward(nn.Module):
    """A module whose forward is ``method``'s own (before :class:`TracedForward` replaced it), for the tracer: the
    method is a submodule, so the trace reads its parameters and buffers as attributes, not as copied constants."""

    def __init__(self, method: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.method = method
        self._forward = forward

    def forward(self, images: Tensor):
        return self._forward(images)


class TracedForward:
    """``method.forward`` run as a TorchScript trace, one trace per input shape, dtype, device and memory format.

    A trace records the ATen calls the eager forward makes and replays them without Python, so its outputs are the
    eager outputs bit for bit (the first call of every shape checks this with ``torch.equal`` and, should they ever
    differ, logs a warning and keeps that shape eager). What the forward decides in Python from shapes or from the
    method's state (ULSAD's calibrated flag, GNL's matching switch) is fixed in each trace: trace a model whose
    state is final, as :func:`apply_inference_speedups` is used. Weights and buffers stay live attributes.
    """

    def __init__(self, method: nn.Module) -> None:
        self.module = _Forward(method, method.forward)
        self.traces: dict[tuple, tuple[Callable[..., Any], type] | None] = {}

    def __call__(self, images: Tensor):
        key = (tuple(images.shape), images.dtype, images.device,
               images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last))
        if key not in self.traces:
            return self._first_call(key, images)
        entry = self.traces[key]
        if entry is None:
            return self.module(images)
        traced, output_type = entry
        return output_type(*traced(images))  # a trace returns a plain tuple: the method's Prediction again

    def _first_call(self, key: tuple, images: Tensor):
        eager = self.module(images)
        with warnings.catch_warnings():
            # shape-based Python decisions (named in the docstring) and TorchScript's deprecation notice
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
            traced = torch.jit.trace(self.module, images, check_trace=False, strict=False)
        same = all(torch.equal(a, b) for a, b in zip(eager, traced(images), strict=True))
        if not same:
            log.warning("eval.trace: the trace of input %s does not reproduce the eager outputs bit for bit; inputs "
                        "of this shape run eagerly", tuple(images.shape))
        self.traces[key] = (traced, type(eager)) if same else None
        return eager


def trace_forward(method: nn.Module) -> TracedForward:
    """Replace ``method.forward`` by a :class:`TracedForward` (float32 only: see :func:`apply_inference_speedups`)."""
    if not callable(getattr(torch.jit, "trace", None)):
        raise RuntimeError(f"eval.trace needs torch.jit.trace (TorchScript), which torch {torch.__version__} does not "
                           "have; use eval.compile or `reconad export` instead")
    traced = TracedForward(method)
    method.forward = traced
    return traced


def _rank_sensitive(method: nn.Module, cfg: Any) -> list[nn.Module]:
    """The modules ``fold_bn`` / ``channels_last`` leave alone: those in front of a rank-based step
    (``Method.rank_sensitive_modules``) while ``cfg.rank_safe`` is on, when a switch that rounds differently is."""
    rounding_switch = getattr(cfg, "fold_bn", False) or getattr(cfg, "channels_last", False)
    if not (rounding_switch and getattr(cfg, "rank_safe", True)):
        return []
    return list(getattr(method, "rank_sensitive_modules", list)())


def apply_inference_speedups(method: nn.Module, cfg: Any) -> dict[str, Any]:
    """Apply the fast switches of an ``EvalConfig``-like ``cfg`` to ``method`` (in place, inference only).

    ``cfg.fold_bn``: fold every BatchNorm that follows a conv into it (encoders, bottleneck, decoder: at inference
    all of them are fixed affine maps). ``cfg.channels_last``: NHWC weights and inputs. Both leave the modules in
    front of a rank-based step as they are while ``cfg.rank_safe`` is on (default; ``Method.rank_sensitive_modules``:
    GNL's encoder up to its last EFDM-matched stage), so that their rounding cannot reorder the sorted values.
    ``cfg.precision`` ``"bf16-mixed"`` / ``"16-mixed"``: autocast around ``forward`` (maps returned in float32).
    ``cfg.compile``: ``torch.compile`` of ``forward``. ``cfg.trace``: ``forward`` as a TorchScript trace
    per input shape (:class:`TracedForward`; identical outputs without Python's overhead; float32 only, and not with
    ``compile``). The method is put in eval mode; train it no further. Returns what was applied (for the run log /
    metrics).
    """
    applied: dict[str, Any] = {}
    trace = getattr(cfg, "trace", False)
    if trace and (getattr(cfg, "precision", "32-true") != "32-true" or getattr(cfg, "compile", False)):
        raise ValueError("eval.trace replays the float32 eager forward: it cannot be combined with eval.precision "
                         "other than '32-true' or with eval.compile; choose one of them")
    method.eval()
    exact = _rank_sensitive(method, cfg)
    if exact:
        applied["rank_safe_modules"] = len(exact)
    if getattr(cfg, "fold_bn", False):
        applied["fold_bn"] = fold_batchnorm(method, keep=exact)
    if getattr(cfg, "channels_last", False):
        method.to(memory_format=torch.channels_last)
        for module in exact:
            module.to(memory_format=torch.contiguous_format)
        if not exact:
            # with NCHW modules in front the images stay NCHW; the first NHWC weight after them makes its conv's
            # output NHWC, and so on
            method.register_forward_pre_hook(_channels_last_inputs)
        applied["channels_last"] = True
    precision = getattr(cfg, "precision", "32-true")
    if precision in AUTOCAST_DTYPES:
        device = next(method.parameters()).device.type

        def context() -> AbstractContextManager:
            return torch.autocast(device, dtype=AUTOCAST_DTYPES[precision])

        _wrap_forward(method, context)
        applied["precision"] = precision
    elif precision != "32-true":
        raise ValueError(f"eval.precision must be '32-true', 'bf16-mixed' or '16-mixed', got {precision!r}")
    if getattr(cfg, "compile", False):
        method.forward = torch.compile(method.forward)
        applied["compile"] = True
    if trace:
        trace_forward(method)
        applied["trace"] = True
    return applied

