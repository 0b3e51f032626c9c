"""Speed of every method, ours vs an official-style reference built from the same modules; prints a table and
writes JSON (benchmarks/results/speed_*.json). Never run by the tests.

    python benchmarks/speed.py --threads 1                # CPU, all methods, EfficientNet-Lite0 128 px
    python benchmarks/speed.py --cases rd4ad:wide_resnet50_2:256 --threads 1
    python benchmarks/speed.py --device cuda --workers 8 --switches fold_bn channels_last bf16-mixed compile \
        --train-switches channels_last bf16-mixed channels_last+bf16-mixed
    python benchmarks/speed.py --profile                                    # where the time goes (torch.profiler)
    python benchmarks/speed.py --hires 512 1024                             # rd4ad WRN50-2 inference memory
    python benchmarks/speed.py --cases rd4ad:wide_resnet50_2:256 --official official.json   # × the official code

Per case (``method:backbone:size``, random weights: speed does not depend on their values):

* train images/s end to end: PNG decoding, the method's per-image training views in a DataLoader (pinned memory and
  ``non_blocking`` copies on CUDA), the step; train step alone; eval images/s at batch 1 and 8;
* peak RSS of the process (VmHWM, reset per measurement) and peak CUDA memory on GPU;
* the same for the **reference**: the same modules computed the way the official code computes them
  (:func:`official_style`): out-of-place activations where the official networks have them (RD++'s projector,
  ULSAD's FRN and AE; the official RD decoder and torchvision encoders are in place, as ours), the encoder's unused
  last stage run and the frozen encoder's gradients computed (RD4AD, RD++, GNL), ReContrast's hard mining as the
  official gradient hook (:func:`official_mask_gradient`) with its per-pixel distances by torch's
  ``CosineSimilarity`` (ours: :func:`reconad.maps.channel_cosine`, the same values) and without our feature-diversity
  diagnostics (the official code logs none), views made image by image, and at
  evaluation the RD family's test loop: one image per forward, the map made on the CPU in float64 with
  ``scipy.ndimage.gaussian_filter``, and GNL's EFDM inverting its sort with a second sort (``argsort``) where ours
  scatters (ULSAD's official anomalib evaluation is batched, its map on the device). ULSAD's
  reference keeps the preset width ``feature_dim: 384`` whatever the backbone;
* max |Δ| of ours vs the reference's maps (the same weights), and each fast switch (``--switches``) with its speed
  and max |Δ| against our float32 maps; ``onnxruntime`` and ``openvino`` run the exported ONNX graph through
  ``reconad.deploy.Detector``'s engines;
* each training switch (``--train-switches``: ``train.channels_last``, ``train.precision``) with its step time and
  how far it moves training from the float32 path (losses and maps after ``--drift-steps`` steps on one batch);
* MACs per image (hook counter over Conv2d / ConvTranspose2d / Linear) and the achieved fraction of the device's
  MAC bound, the bound being a measured large matmul at the same threads and dtype;
* with ``--official FILE``: ours against the official code's own timings, measured by the user on the same machine
  (format and checks: ``benchmarks/official_numbers.py``).

Ours and the reference alternate in every repeat; figures are medians. Torch's thread count is set explicitly and
re-checked after imports (numba, cv2 and OpenMP runtimes can change it). Compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import official_numbers  # benchmarks/ is this script's sys.path[0]
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reconad import maps
from reconad.acceleration import apply_inference_speedups
from reconad.backbones import create_backbone
from reconad.config import OptimConfig, make_config
from reconad.engine.cache import IndexedSamples, build_feature_cache, cached_batches, with_cached_rows
from reconad.engine.training import to_device
from reconad.methods import gnl as gnl_method
from reconad.methods import recontrast as recontrast_method
from reconad.methods.base import Method
from reconad.nets import ulsad as ulsad_nets
from reconad.registry import create_method, get_method_class

DEFAULT_CASES = [f"{m}:efficientnet_lite0:128" for m in ("rd4ad", "recontrast", "rdpp", "gnl", "ulsad")] + [
    "ssl_ae:resnet18:128"]
WRN_CASES = [f"{m}:wide_resnet50_2:256" for m in ("rd4ad", "recontrast", "rdpp", "gnl", "ulsad")]
RD_FAMILY = ("rd4ad", "recontrast", "rdpp", "gnl")
ENCODER_WASTE = ("rd4ad", "rdpp", "gnl")
"""Official code runs the frozen encoder's last stage and computes its gradients (official_code.md §1.2)."""


# -- threads, timing, memory ----------------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    if torch.get_num_threads() != n:
        raise RuntimeError(f"torch runs {torch.get_num_threads()} threads, asked for {n}")


def usable_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    """``--device`` as a torch device that exists here, or the parser's error saying what is missing."""
    from reconad.errors import ConfigError
    from reconad.run import checked_device

    try:
        return checked_device(name)
    except ConfigError as err:
        parser.error(str(err))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of each function, run in alternating order (ABAB…, then BABA…) after a warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(seconds(fns[name], device))
    return {k: statistics.median(v) for k, v in times.items()}


def reset_peak_memory(device: torch.device) -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        rss = int(line.split()[1]) / 2**20  # kB → GiB
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_rss_gib": rss, "peak_cuda_gib": cuda}


def measured(fn: Callable[[], Any], device: torch.device) -> dict[str, float | None]:
    reset_peak_memory(device)
    fn()
    sync(device)
    return peak_memory(device)


# -- MACs and the device's bound -----------------------------------------------------------------------------------
def count_macs(module: nn.Module, images: Tensor) -> int:
    """Multiply-accumulates of one forward, counted by hooks on Conv2d, ConvTranspose2d and Linear."""
    total = 0

    def hook(m: nn.Module, inputs: tuple, out: Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.ConvTranspose2d):
            x = inputs[0]
            total += x.numel() * m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.inference_mode():
            module(images)
    finally:
        for h in handles:
            h.remove()
    return total


def matmul_macs_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """The MAC bound: multiply-accumulates per second of a large square matmul at this thread count and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 2
    s = min(seconds(lambda: [a @ b for _ in range(reps)], device) for _ in range(3))
    return reps * n ** 3 / s


# -- data: decoded PNGs and per-image views, as the engine's loader --------------------------------------------------
class PngImages(torch.utils.data.Dataset):
    """Random RGB images stored as PNG bytes; each item is decoded, scaled to [0, 1] and given its views."""

    def __init__(self, n: int, size: int, method: Method, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.files = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            self.files.append(buf.getvalue())
        self.method = method

    @classmethod
    def from_files(cls, paths, method: Method) -> PngImages:
        """The PNG files at ``paths``, read into memory (decoded per item, as above)."""
        data = cls(0, 0, method)
        data.files = [Path(p).read_bytes() for p in paths]
        return data

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        from PIL import Image

        np.random.seed(i)  # the engine seeds numpy per sample the same way (views draw from it)
        array = np.asarray(Image.open(io.BytesIO(self.files[i])).convert("RGB"), dtype=np.float32) / 255.0
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return {"image": image, **self.method.train_views(image)}


def loader_for(data: torch.utils.data.Dataset, args, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=args.train_batch, num_workers=args.workers,
                                       pin_memory=device.type == "cuda", drop_last=True,
                                       persistent_workers=args.workers > 0)


# -- the official-style reference ------------------------------------------------------------------------------------
def _relu_out_of_place(x: Tensor, inplace: bool = False) -> Tensor:
    return torch.relu(x)


def official_efdm(x: Tensor, ref_sorted: Tensor, lam: float = 0.5, stable: bool = False) -> Tensor:
    """ADShift's EFDM_test: sort, interpolate, ``gather(argsort(index))`` (a second sort for the inverse)."""
    matched, index = gnl_method.matched_sorted_values(x, ref_sorted, lam, stable)
    return matched.gather(-1, index.argsort(-1)).reshape(x.shape)


def official_mask_gradient(recon: Tensor, keep: Tensor) -> Tensor:
    """ReContrast's ``global_cosine_hm``: a hook on the reconstruction whose ``modify_grad`` zeroes the gradient
    at the easy pixels in place (``x[inds.expand_as(x)] *= 0``); the same gradients as ours."""
    easy = ~keep

    def modify_grad(grad: Tensor) -> Tensor:
        grad[easy.expand_as(grad)] *= 0.0
        return grad

    recon.register_hook(modify_grad)
    return recon


def _no_diversity(features: Tensor) -> Tensor:
    return torch.zeros(())


@contextmanager
def official_style(method: Method) -> Iterator[None]:
    """Compute ``method`` as the official code does (same weights, same values): see the module docstring."""
    saved = [(ulsad_nets, "F", ulsad_nets.F), (gnl_method, "efdm", gnl_method.efdm),
             (recontrast_method, "mask_gradient", recontrast_method.mask_gradient),
             (recontrast_method, "feature_diversity", recontrast_method.feature_diversity)]
    # official RD decoders (de_resnet) and torchvision encoders are in place already; RD++'s projector and ULSAD's
    # networks are not
    inplace = [m for m in method.modules() if isinstance(m, nn.LeakyReLU) and m.inplace]
    cfg_maps = getattr(method.cfg, "maps", None)
    blur64 = cfg_maps.blur_float64 if cfg_maps is not None else None
    encoder = method.backbone
    try:
        ulsad_nets.F = SimpleNamespace(**{**vars(F), "relu": _relu_out_of_place})
        gnl_method.efdm = official_efdm
        recontrast_method.mask_gradient = official_mask_gradient
        recontrast_method.feature_diversity = _no_diversity  # official: no such diagnostics
        for m in inplace:
            m.inplace = False
        if cfg_maps is not None:
            cfg_maps.blur_float64 = True
        if method.name in ENCODER_WASTE:
            method.backbone = full_encoder(encoder)
        with maps.torch_channel_ops():  # official: torch's CosineSimilarity
            yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)
        for m in inplace:
            m.inplace = True
        if cfg_maps is not None:
            cfg_maps.blur_float64 = blur64
        method.backbone = encoder


_FULL_ENCODERS: dict[int, nn.Module] = {}


def full_encoder(encoder: nn.Module) -> nn.Module:
    """The encoder with every stage run and gradients computed for its (unused) parameters, as the official
    RD4AD/RD++/GNL code: the same weights, returning the same taps (built once per encoder)."""
    if id(encoder) not in _FULL_ENCODERS:
        _FULL_ENCODERS[id(encoder)] = _build_full_encoder(encoder)
    return _FULL_ENCODERS[id(encoder)]


def _build_full_encoder(encoder: nn.Module) -> nn.Module:
    full = create_backbone(encoder.name, taps=(*encoder.taps, encoder_last_stage(encoder)), weights=None)
    full.load_state_dict(encoder.state_dict(), strict=False)
    full.unfreeze(bn_train=False)  # official: encoder.eval(), but no torch.no_grad() around it
    full.taps = tuple(encoder.taps)
    full.feature_info = encoder.feature_info
    return full.to(next(encoder.parameters()).device)


def encoder_last_stage(encoder: nn.Module) -> str:
    from reconad.backbones import _all_stages

    return _all_stages(encoder.name)[-1]


def official_rd_maps(pairs: list[tuple[Tensor, Tensor]], size: tuple[int, int]) -> np.ndarray:
    """RD4AD's ``cal_anomaly_map`` + ``gaussian_filter(σ 4)``, image by image on the CPU in float64."""
    from scipy.ndimage import gaussian_filter

    out = []
    for i in range(pairs[0][0].shape[0]):
        anomaly_map = np.zeros(size)
        for fs, ft in pairs:
            a_map = 1 - F.cosine_similarity(fs[i:i + 1], ft[i:i + 1])
            a_map = F.interpolate(a_map.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
            anomaly_map += a_map[0, 0].cpu().numpy()
        out.append(gaussian_filter(anomaly_map, sigma=4))
    return np.stack(out)[:, None]


def reference_eval(method: Method, images: Tensor) -> np.ndarray:
    """Official-style maps: the RD family's test loops take one image per batch (``cal_anomaly_map`` reads sample 0
    only), so images go through one at a time; ULSAD's anomalib evaluation is batched on the device."""
    with torch.no_grad(), official_style(method):
        if method.name in RD_FAMILY:
            size = tuple(images.shape[-2:])
            return np.concatenate([official_rd_maps(method.pairs(images[i:i + 1]), size) for i in range(len(images))])
        return method(images).anomaly_map.cpu().numpy()


def ours_eval(method: Method, images: Tensor) -> np.ndarray:
    with torch.inference_mode():
        return method(images).anomaly_map.float().cpu().numpy()


# -- one case --------------------------------------------------------------------------------------------------------
def build(method_name: str, backbone_name: str, device: torch.device, **model: Any) -> Method:
    cls = get_method_class(method_name)
    torch.manual_seed(0)
    backbone = create_backbone(backbone_name, weights=None, trainable=cls.trainable_backbone)
    return create_method(method_name, backbone=backbone, **model).to(device)


def fit_statistics(method: Method, images: Tensor) -> None:
    batch = {"image": images, "path": [f"bench{i}" for i in range(len(images))]}
    method.prepare([batch])
    method.calibrate([batch])


def ours_optimizer(method: Method) -> torch.optim.Optimizer:
    """Adam with multi-tensor updates, as ``engine.training.make_optimizer`` builds it (lr fixed for the drift)."""
    return torch.optim.Adam(method.param_groups(OptimConfig()), lr=1e-4, foreach=True)


def train_step_fn(method: Method, optimizer, batch_fn: Callable[[], dict], device: torch.device,
                  precision: str) -> Callable[[], float]:
    def step() -> float:
        method.train()
        batch = batch_fn()
        with autocast(device, precision):
            loss = method.loss(batch, 0.5)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def _train_on(method: Method, optimizer, batches, device: torch.device, precision: str) -> None:
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, precision):
            loss = method.loss(batch, 0.5)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def e2e_fn(method: Method, optimizer, data, args, device: torch.device) -> Callable[[], None]:
    """``args.e2e_epochs`` epochs over ``data``, recomputing everything every epoch (the official way)."""
    loader = loader_for(data, args, device)

    def run() -> None:
        method.train()
        for _ in range(args.e2e_epochs):
            _train_on(method, optimizer, loader, device, args.precision)

    return run


def e2e_cached_fn(method: Method, optimizer, data, args, device: torch.device) -> Callable[[], None]:
    """The same epochs through the engine's feature cache (``train.feature_cache: on``): one pass over ``data``
    through the frozen networks, then every epoch from the cache (RD4AD: no image decoded), the pass timed too."""
    cfg = make_config(method.name, data={"num_workers": args.workers},
                      train={"feature_cache": "on", "feature_cache_gib": 64})
    loader = loader_for(IndexedSamples(data), args, device)

    def run() -> None:
        method.train()
        cache = build_feature_cache(method, data, cfg, device, args.train_batch)
        for _ in range(args.e2e_epochs):
            if cache.replaces_images:
                batches = cached_batches(cache, range(len(data)), args.train_batch, drop_last=True)
            else:
                batches = with_cached_rows(cache, loader)
            _train_on(method, optimizer, batches, device, args.precision)

    return run


def cached_rows(method: Method, batch: dict) -> dict:
    with torch.no_grad():
        return method.frozen_features(batch)


def with_rows(method: Method, images: Tensor, rows: dict) -> dict:
    """A training batch as the feature cache hands it to ``loss``: fresh views (if the method needs images) plus
    the cached frozen features."""
    return rows if method.cache_replaces_images else {**method.training_batch(images), **rows}


def bench_case(case: str, args, device: torch.device) -> dict:
    method_name, backbone_name, size = case.split(":")
    size = int(size)
    args.size_of_case = size
    ours = build(method_name, backbone_name, device)
    # ULSAD's reference keeps the preset width; where the derived width is that width, the models are the same
    wide = method_name == "ulsad" and ours.feature_dim != 384
    reference_model: dict[str, Any] = {"feature_dim": 384} if wide else {}
    ref = build(method_name, backbone_name, device, **reference_model) if reference_model else copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    train_images = torch.rand(args.train_batch, 3, size, size, generator=g).to(device)
    fit_statistics(ours, train_images)
    fit_statistics(ref, train_images)
    start = copy.deepcopy(ours) if args.train_switches else None  # the training switches all start here
    # ours as the engine builds it (multi-tensor updates, bit-identical); the reference as PyTorch defaults (on the
    # CPU a loop over the parameters, on CUDA also multi-tensor)
    opt = {"ours": ours_optimizer(ours), "ref": torch.optim.Adam(ref.param_groups(OptimConfig()), lr=1e-4)}
    row: dict[str, Any] = {"method": method_name, "backbone": backbone_name, "size": size, "device": str(device),
                           "precision": args.precision, "train_batch": args.train_batch,
                           "reference_feature_dim": reference_model.get("feature_dim")}
    if method_name == "ulsad":
        row["feature_dim"] = ours.feature_dim

    def ref_batch() -> dict:
        return Method.training_batch(ref, train_images)  # views image by image, on the CPU

    steps = {
        "ours": train_step_fn(ours, opt["ours"], lambda: ours.training_batch(train_images), device, args.precision),
        "ref": wrap_official(ref, train_step_fn(ref, opt["ref"], ref_batch, device, args.precision)),
    }
    rows = cached_rows(ours, ours.training_batch(train_images))  # computed once, as the feature cache does
    if rows:
        steps["cached"] = train_step_fn(ours, opt["ours"], lambda: with_rows(ours, train_images, rows), device,
                                        args.precision)
    t = alternate(steps, device, args.warmup, args.repeats)
    row.update(train_step_s=t["ours"], ref_train_step_s=t["ref"], cached_train_step_s=t.get("cached"))
    row["train_memory"] = measured(steps["ours"], device)
    row["ref_train_memory"] = measured(steps["ref"], device)
    if start is not None:
        row["train_switches"] = bench_train_switches(start, train_images, args, device)
        del start

    if args.e2e_batches:
        data = {k: PngImages(args.train_batch * args.e2e_batches, size, m) for k, m in (("ours", ours), ("ref", ref))}
        e2e = {"nocache": e2e_fn(ours, opt["ours"], data["ours"], args, device),
               "ref": wrap_official(ref, e2e_fn(ref, opt["ref"], data["ref"], args, device))}
        if "cached" in steps:
            e2e["ours"] = e2e_cached_fn(ours, opt["ours"], data["ours"], args, device)
        t = alternate(e2e, device, 0, 2)  # one pass in each order
        t.setdefault("ours", t["nocache"])
        n = args.train_batch * args.e2e_batches * args.e2e_epochs
        row.update(train_e2e_images_per_s=n / t["ours"], ref_train_e2e_images_per_s=n / t["ref"],
                   nocache_train_e2e_images_per_s=n / t["nocache"], e2e_epochs=args.e2e_epochs,
                   e2e_images=args.train_batch * args.e2e_batches)

    ours.eval()
    ref.eval()
    if not reference_model:  # training diverged (different batches and step counts): compare maps at equal weights
        ref.load_state_dict(ours.state_dict())
    for batch in args.eval_batches:
        images = torch.rand(batch, 3, size, size, generator=g).to(device)
        fns = {"ours": lambda x=images: ours_eval(ours, x), "ref": lambda x=images: reference_eval(ref, x)}
        t = alternate(fns, device, args.warmup, args.repeats)
        row[f"eval_b{batch}_images_per_s"] = batch / t["ours"]
        row[f"ref_eval_b{batch}_images_per_s"] = batch / t["ref"]
        row[f"eval_b{batch}_memory"] = measured(fns["ours"], device)
        row[f"ref_eval_b{batch}_memory"] = measured(fns["ref"], device)
        if not reference_model:  # same weights: the maps must agree
            row[f"eval_b{batch}_max_abs_delta_vs_ref"] = float(np.abs(fns["ours"]() - fns["ref"]()).max())

    one = torch.rand(1, 3, size, size, generator=g).to(device)
    macs = count_macs(ours, one)
    bound = matmul_macs_per_s(device, torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32)
    best = max(args.eval_batches)
    row.update(gmac_per_image=macs / 1e9, device_gmac_per_s=bound / 1e9,
               eval_mac_bound_fraction=macs * row[f"eval_b{best}_images_per_s"] / bound,
               eval_mac_bound_batch=best)
    row["switches"] = bench_switches(ours, method_name, backbone_name, size, args, device, g)
    return row


def wrap_official(method: Method, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with official_style(method):
            return fn()

    return run


def bench_switches(ours: Method, method_name: str, backbone_name: str, size: int, args, device: torch.device,
                   g: torch.Generator) -> list[dict]:
    """Each fast switch alone on a copy of ``ours``: eval images/s at the largest batch and max |Δ| of the maps."""
    batch = max(args.eval_batches)
    images = torch.rand(batch, 3, size, size, generator=g).to(device)
    baseline = ours_eval(ours, images)
    rows = []
    for switch in args.switches:
        if switch in RUNTIME_SWITCHES:
            rows.append(bench_runtime(switch, ours, size, images, baseline, args, device))
            continue
        fast = copy.deepcopy(ours)
        parts = switch.split("+")
        cfg = SimpleNamespace(fold_bn="fold_bn" in parts, channels_last="channels_last" in parts,
                              precision=switch if switch in ("bf16-mixed", "16-mixed") else "32-true",
                              compile=switch == "compile", trace="trace" in parts,
                              rank_safe="no_rank_safe" not in parts)
        apply_inference_speedups(fast, cfg)
        fns = {"fp32": lambda: ours_eval(ours, images), switch: lambda f=fast: ours_eval(f, images)}
        # compile's first batches compile; a trace is recorded on the first and TorchScript profiles the next two
        extra_warmup = 2 if switch == "compile" else (3 if cfg.trace else 0)
        t = alternate(fns, device, args.warmup + extra_warmup, args.repeats)
        delta = float(np.abs(ours_eval(fast, images) - baseline).max())
        rows.append({"switch": switch, "eval_batch": batch, "images_per_s": batch / t[switch],
                     "fp32_images_per_s": batch / t["fp32"], "speedup": t["fp32"] / t[switch],
                     "max_abs_delta_vs_fp32": delta, "map_max": float(np.abs(baseline).max())})
    return rows


TRAIN_SWITCHES = ("channels_last", "bf16-mixed", "16-mixed", "channels_last+bf16-mixed", "no-ssot")
"""``no-ssot``: RD++'s ``model.ssot: false`` (drops the Sinkhorn term, ~0 by construction; other methods skip it)."""


@dataclass(frozen=True)
class TrainSwitch:
    nhwc: bool = False
    precision: str = "32-true"
    ssot_off: bool = False

    @classmethod
    def parse(cls, switch: str) -> TrainSwitch:
        parts = switch.split("+")
        return cls(nhwc="channels_last" in parts, ssot_off="no-ssot" in parts,
                   precision=next((p for p in parts if p in ("bf16-mixed", "16-mixed")), "32-true"))


FP32 = TrainSwitch()


def bench_train_switches(start: Method, images: Tensor, args, device: torch.device) -> list[dict]:
    """Each training switch (``train.channels_last``, ``train.precision``, RD++'s ``model.ssot``) against our float32
    step, both from copies of ``start``: the step's seconds (alternated, medians) and how far the switch moves the
    training — the first loss, the loss after ``args.drift_steps`` steps on one fixed batch, and the maps those
    weights then give."""
    probe = torch.rand(max(args.eval_batches), *images.shape[1:], generator=torch.Generator().manual_seed(2))
    probe = probe.to(device)
    rows = []
    for switch in args.train_switches:
        fast = TrainSwitch.parse(switch)
        if fast.ssot_off and not hasattr(start.cfg, "ssot"):
            continue  # a switch of RD++ only
        timed = {"fp32": _switch_step(start, images, device, FP32), switch: _switch_step(start, images, device, fast)}
        t = alternate(timed, device, args.warmup, args.repeats)
        del timed
        fixed = start.training_batch(images)  # one batch of views for both: only the switch differs
        drift = {k: _drift(start, fixed, probe, device, cfg, args.drift_steps)
                 for k, cfg in (("fp32", FP32), (switch, fast))}
        (losses, maps), (fast_losses, fast_maps) = drift["fp32"], drift[switch]
        rows.append({"switch": switch, "train_step_s": t[switch], "fp32_train_step_s": t["fp32"],
                     "speedup": t["fp32"] / t[switch], "drift_steps": args.drift_steps,
                     "first_loss_rel_delta": abs(fast_losses[0] - losses[0]) / abs(losses[0]),
                     "last_loss_rel_delta": abs(fast_losses[-1] - losses[-1]) / abs(losses[-1]),
                     "max_abs_delta_maps": float(np.abs(fast_maps - maps).max()),
                     "map_max": float(np.abs(maps).max())})
    return rows


def _switched_copy(start: Method, switch: TrainSwitch) -> tuple[Method, torch.optim.Optimizer]:
    method = copy.deepcopy(start)
    if switch.nhwc:
        method.to(memory_format=torch.channels_last)  # what ``train.channels_last`` does before training
    if switch.ssot_off:
        method.cfg = replace(method.cfg, ssot=False)
    return method, ours_optimizer(method)


def _switch_step(start: Method, images: Tensor, device: torch.device, switch: TrainSwitch) -> Callable[[], float]:
    method, optimizer = _switched_copy(start, switch)
    return train_step_fn(method, optimizer, lambda: to_device(method.training_batch(images), device, switch.nhwc),
                         device, switch.precision)


def _drift(start: Method, batch: dict, probe: Tensor, device: torch.device, switch: TrainSwitch,
           steps: int) -> tuple[list[float], np.ndarray]:
    method, optimizer = _switched_copy(start, switch)
    step = train_step_fn(method, optimizer, lambda: to_device(batch, device, switch.nhwc), device, switch.precision)
    losses = [step() for _ in range(steps)]
    method.eval()
    return losses, ours_eval(method, probe)


RUNTIME_SWITCHES = ("onnxruntime", "openvino")
"""The exported graph run by ``reconad.deploy.Detector``'s engines (OpenVINO pinned to float32, as Detector does)."""


def bench_runtime(engine: str, ours: Method, size: int, images: Tensor, baseline: np.ndarray, args,
                  device: torch.device) -> dict:
    """The whole pipeline exported to ONNX (``reconad export``'s graph) and run by ``engine`` on the CPU at the same
    threads, vs our float32 eager path on the same images."""
    import tempfile

    from reconad.deploy.export import write_model
    from reconad.deploy.runtime import make_runner
    from reconad.errors import ReconadError

    row: dict[str, Any] = {"switch": engine, "eval_batch": len(images)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        model = copy.deepcopy(ours).cpu().eval()
        if getattr(model.cfg, "match_stable_sort", True) is False:
            # GNL's official unstable sort has no ONNX equivalent: export the stable one (`reconad export
            # --override match_stable_sort=true`); the deviation below is measured against the unstable eager maps
            model.cfg.match_stable_sort = True
            row["switch"] = f"{engine} (match_stable_sort)"
        try:
            write_model(model, path, "onnx", size)
            run = make_runner(path, engine, threads=args.threads)
        except ReconadError as err:
            return {**row, "unavailable": str(err)[:300]}
        set_threads(args.threads)
        feed = images.cpu().numpy()
        fns = {"fp32": lambda: ours_eval(ours, images), engine: lambda: run(feed)[0]}
        t = alternate(fns, device, args.warmup, args.repeats)
        maps = run(feed)[0]
    return {**row, "images_per_s": len(images) / t[engine], "fp32_images_per_s": len(images) / t["fp32"],
            "speedup": t["fp32"] / t[engine], "max_abs_delta_vs_fp32": float(np.abs(maps - baseline).max()),
            "map_max": float(np.abs(baseline).max())}


# -- profile ---------------------------------------------------------------------------------------------------------
def profile_case(case: str, args, device: torch.device) -> dict:
    """torch.profiler over one train step (with its views) and one eval batch: the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    method_name, backbone_name, size = case.split(":")
    size = int(size)
    method = build(method_name, backbone_name, device)
    images = torch.rand(args.train_batch, 3, size, size).to(device)
    fit_statistics(method, images)
    step = train_step_fn(method, ours_optimizer(method), lambda: method.training_batch(images), device, args.precision)
    eval_images = torch.rand(max(args.eval_batches), 3, size, size).to(device)
    out: dict[str, Any] = {"case": case}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for phase, fn in (("train_step", step), ("eval", lambda: ours_eval(method, eval_images))):
        fn()
        wall = seconds(fn, device)
        with profile(activities=activities) as prof:
            fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        out[phase] = {"wall_s": wall, "top": [{"op": e.key, "self_share": e.self_cpu_time_total / total,
                                               "calls": e.count} for e in events[:args.profile_top]]}
    return out


def hires_memory(sizes: list[int], device: torch.device, chunk: int) -> list[dict]:
    """rd4ad WRN50-2 inference at high resolution: peak RSS per image size, batch chunked to ``chunk`` images."""
    method = build("rd4ad", "wide_resnet50_2", device).eval()
    rows = []
    for size in sizes:
        images = torch.rand(chunk, 3, size, size)

        def run(images: Tensor = images) -> None:
            with torch.inference_mode():
                for i in range(0, len(images), chunk):
                    method(images[i:i + chunk].to(device))

        before = peak_memory(device)["peak_rss_gib"]
        mem = measured(run, device)
        t = seconds(run, device)
        rows.append({"size": size, "chunk": chunk, "seconds_per_image": t / chunk, "rss_before_gib": before,
                     "peak_rss_gib": mem["peak_rss_gib"], "peak_cuda_gib": mem["peak_cuda_gib"]})
    return rows


# -- output ----------------------------------------------------------------------------------------------------------
NO_OFFICIAL_CODE = ("ssl_ae",)
"""Methods without official code: their "reference" is ours again, so no ratio is printed."""


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def table(rows: list[dict], eval_batches: list[int]) -> str:
    head = ["method", "backbone", "px", "train e2e img/s (×ref)", "e2e no cache (×ref)", "train step s (ref/ours)",
            "cached step s (ref/ours)"]
    head += [f"eval b{b} img/s (×ref)" for b in eval_batches]
    head += ["max |Δ| vs ref", "peak RSS GiB train/eval (ref)", "GMAC/img", "MAC-bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["method"] in NO_OFFICIAL_CODE:
            r = {k: v for k, v in r.items() if not k.startswith("ref_") or k.endswith("_memory")}
        e2e, plain, cached = (r.get(k) for k in ("train_e2e_images_per_s", "nocache_train_e2e_images_per_s",
                                                   "cached_train_step_s"))
        ref_e2e, ref_step = r.get("ref_train_e2e_images_per_s"), r.get("ref_train_step_s")
        cells = [r["method"], r["backbone"], str(r["size"]),
                 f"{e2e:.2f} ({ratio(e2e, ref_e2e)})" if e2e else "–",
                 f"{plain:.2f} ({ratio(plain, ref_e2e)})" if plain else "–",
                 f"{r['train_step_s']:.3f} ({ratio(ref_step, r['train_step_s'])})",
                 f"{cached:.3f} ({ratio(ref_step, cached)})" if cached else "–"]
        for b in eval_batches:
            v = r[f"eval_b{b}_images_per_s"]
            cells.append(f"{v:.2f} ({ratio(v, r.get(f'ref_eval_b{b}_images_per_s'))})")
        deltas = [r[k] for k in r if k.endswith("_max_abs_delta_vs_ref")]
        if r["method"] in NO_OFFICIAL_CODE:
            cells.append("no official code")
        else:
            cells.append(f"{max(deltas):.1e}" if deltas else f"n/a (width {r.get('feature_dim')} vs 384)")
        b = max(eval_batches)
        cells.append(f"{r['train_memory']['peak_rss_gib']:.2f}/{r[f'eval_b{b}_memory']['peak_rss_gib']:.2f} "
                     f"({r['ref_train_memory']['peak_rss_gib']:.2f}/{r[f'ref_eval_b{b}_memory']['peak_rss_gib']:.2f})")
        cells += [f"{r['gmac_per_image']:.2f}", f"{r['eval_mac_bound_fraction']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def switch_table(rows: list[dict]) -> str:
    """Each switch: its images/s, ×our float32 (alternated with it), ×the reference at the same batch (measured
    earlier in the same run), the same chained through our float32 path (our float32 ×ref, alternated with the
    reference, times the switch's ×fp32: two alternated ratios, so a noisy box's drift between the two phases of
    the run cancels), and the deviation of its maps."""
    lines = ["| method | backbone | switch | eval img/s | ×fp32 | ×ref | ×ref via fp32 | max abs Δ maps (map max) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r["switches"]:
            if "unavailable" in s:
                lines.append(f"| {r['method']} | {r['backbone']} | {s['switch']} | – | – | – | – "
                             f"| {s['unavailable']} |")
                continue
            batch = s["eval_batch"]
            ref = None if r["method"] in NO_OFFICIAL_CODE else r.get(f"ref_eval_b{batch}_images_per_s")
            ours = r.get(f"eval_b{batch}_images_per_s")
            chained = f"{ours / ref * s['speedup']:.2f}" if ours and ref else "–"
            lines.append(f"| {r['method']} | {r['backbone']} | {s['switch']} | {s['images_per_s']:.2f} "
                         f"| {s['speedup']:.2f} | {ratio(s['images_per_s'], ref)} | {chained} "
                         f"| {s['max_abs_delta_vs_fp32']:.1e} ({s['map_max']:.2f}) |")
    return "\n".join(lines)


def train_switch_table(rows: list[dict]) -> str:
    """Each training switch: its step seconds, ×our float32 step (alternated with it), ×the reference's step, and how
    far it moves training from the float32 path after a few steps on one batch."""
    lines = ["| method | backbone | train switch | step s | ×fp32 | ×ref | rel Δ first loss | rel Δ loss after n "
             "steps (n) | max abs Δ maps after n (map max) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = None if r["method"] in NO_OFFICIAL_CODE else r.get("ref_train_step_s")
        for s in r.get("train_switches", []):
            lines.append(f"| {r['method']} | {r['backbone']} | {s['switch']} | {s['train_step_s']:.3f} "
                         f"| {s['speedup']:.2f} | {ratio(ref, s['train_step_s'])} | {s['first_loss_rel_delta']:.1e} "
                         f"| {s['last_loss_rel_delta']:.1e} ({s['drift_steps']}) "
                         f"| {s['max_abs_delta_maps']:.1e} ({s['map_max']:.2f}) |")
    return "\n".join(lines)


def print_tables(result: dict) -> None:
    rows = result["results"]
    batches = sorted({int(k[len("eval_b"):-len("_images_per_s")]) for r in rows for k in r
                      if k.startswith("eval_b") and k.endswith("_images_per_s")})
    print(table(rows, batches))
    print()
    print(switch_table(rows))
    print()
    print(train_switch_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="method:backbone:size; 'wrn' = WRN50-2 set")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--e2e-batches", type=int, default=2, help="batches per end-to-end epoch (0: skip)")
    parser.add_argument("--e2e-epochs", type=int, default=3, help="epochs per end-to-end pass")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the end-to-end pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switches", nargs="*", default=["fold_bn", "channels_last", "bf16-mixed"],
                        choices=["fold_bn", "channels_last", "fold_bn+channels_last", "bf16-mixed", "16-mixed",
                                 "compile", "trace", "fold_bn+channels_last+trace",
                                 "fold_bn+channels_last+trace+no_rank_safe", *RUNTIME_SWITCHES],
                        help="no_rank_safe: also fold/convert what a rank-based step sorts (eval.rank_safe false)")
    parser.add_argument("--train-switches", nargs="*", default=["channels_last", "bf16-mixed"],
                        choices=list(TRAIN_SWITCHES))
    parser.add_argument("--drift-steps", type=int, default=3, help="steps of the training switches' deviation")
    parser.add_argument("--profile", action="store_true", help="print where the time goes instead of timing")
    parser.add_argument("--profile-top", type=int, default=8)
    parser.add_argument("--hires", type=int, nargs="*", default=[], help="rd4ad WRN50-2 inference memory sizes")
    parser.add_argument("--hires-chunk", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed_<kind>_<device>.json)")
    parser.add_argument("--print", dest="print_json", default=None, metavar="JSON",
                        help="print the tables of an earlier run's JSON (no timing)")
    parser.add_argument("--official", default=None, metavar="JSON",
                        help="the official code's own timings on this machine (format: benchmarks/official_numbers.py)"
                             "; adds ×official ratios")
    args = parser.parse_args()
    try:
        official = official_numbers.load(args.official) if args.official else None
    except official_numbers.OfficialNumbersError as err:
        parser.error(str(err))
    if args.print_json:
        earlier = json.loads(Path(args.print_json).read_text())
        print_tables(earlier)
        if official is not None:
            print_official(compare_earlier(parser, official, earlier))
        return

    set_threads(args.threads)
    device = usable_device(args.device, parser)
    cases = [c for case in args.cases for c in (WRN_CASES if case == "wrn" else [case])]
    env = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(), "cpu": cpu_name(),
           "python": sys.version.split()[0], "cuda": torch.cuda.get_device_name(device) if device.type == "cuda"
           else None, "argv": sys.argv[1:]}
    warnings: list[str] = []
    if official is not None:  # checked before anything is timed
        warnings = official_setup_warnings(parser, official, str(device), args.threads, args.train_batch, cases,
                                           env["cuda"] or env["cpu"])
    kind = "profile" if args.profile else ("hires" if args.hires else "methods")
    out = Path(args.out or f"benchmarks/results/speed_{kind}_{device.type}.json")
    result: dict[str, Any] = {"env": env}
    if args.hires:
        result["hires"] = hires_memory(args.hires, device, args.hires_chunk)
        for r in result["hires"]:
            print(f"rd4ad WRN50-2 {r['size']} px: peak RSS {r['peak_rss_gib']:.2f} GiB, {r['seconds_per_image']:.1f} "
                  f"s/image (chunk {r['chunk']})", flush=True)
    elif args.profile:
        result["profiles"] = []
        for case in cases:
            set_threads(args.threads)  # imports made on the way (numba, cv2) can reset it
            p = profile_case(case, args, device)
            result["profiles"].append(p)
            for phase in ("train_step", "eval"):
                top = ", ".join(f"{e['op']} {e['self_share']:.0%}" for e in p[phase]["top"][:6])
                print(f"{case} {phase} {p[phase]['wall_s']:.3f} s: {top}", flush=True)
    else:
        rows = result["results"] = []
        for case in cases:
            set_threads(args.threads)
            rows.append(bench_case(case, args, device))
            print(table(rows[-1:], args.eval_batches).splitlines()[-1], flush=True)
            write_json(out, result)  # after every case: an interrupted run keeps what it measured
        print()
        print_tables(result)
        if official is not None:
            result["official"] = official_numbers.summary(official, official_numbers.comparisons(rows, official),
                                                          warnings)
            print_official(result["official"])
    write_json(out, result)
    print(f"\nwritten {out}")


def official_setup_warnings(parser: argparse.ArgumentParser, official: official_numbers.OfficialNumbers, device: str,
                            threads: int, train_batch: int | None, cases: list[str], machine: str | None) -> list[str]:
    """The official numbers' setup against this run's: a mismatch that voids the ratios stops here."""
    try:
        warnings = official_numbers.check_setup(official, device, threads, train_batch, cases)
    except official_numbers.OfficialNumbersError as err:
        parser.error(str(err))
    other_machine = official_numbers.machine_warning(official, machine)
    return warnings + ([other_machine] if other_machine else [])


def compare_earlier(parser: argparse.ArgumentParser, official: official_numbers.OfficialNumbers,
                    earlier: dict) -> dict:
    """The official numbers against an earlier run's JSON, its setup checked as before a new run."""
    env, rows = earlier["env"], earlier.get("results", [])
    if not rows:
        parser.error("--print: that JSON holds no timing results (a --profile or --hires run?)")
    warnings = official_setup_warnings(parser, official, rows[0]["device"], env["threads"], rows[0]["train_batch"],
                                       [official_numbers.case_name(r) for r in rows], env.get("cuda") or env.get("cpu"))
    return official_numbers.summary(official, official_numbers.comparisons(rows, official), warnings)


def print_official(summary: dict) -> None:
    print(f"\nagainst the official code's own numbers ({summary['file']}: {summary['source']})")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    print(official_numbers.table(summary["comparisons"]) if summary["comparisons"] else
          "no measure in common with this run")


def cpu_name() -> str | None:
    """The CPU model (timings of one CPU say little about another: bf16 is fast only where the CPU has it)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.processor() or None)


def run_json_child(cmd: list[str]) -> dict:
    """Run a benchmark's child process from the repository root; its last line of output is its JSON result."""
    import subprocess

    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    main()
