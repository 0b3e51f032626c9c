"""One run trained by several processes (Lightning Fabric DDP): what changes against one device, in one place.

* The GLOBAL batch is the preset's ``data.batch_size``: each of the N ranks trains on ``batch_size / N`` images
  (:func:`per_rank_batch`), and DDP averages the gradients, so a step sees the same images and (for a loss that is
  a mean over images) the same gradient as one device.
* :class:`RankSampler` gives each rank a disjoint stride of the epoch's permutation; the k-th batches of all ranks
  together are exactly the k-th batch of one device.
* BatchNorm layers that train use the global batch's statistics (``train.sync_bn``, default on): torch's
  ``SyncBatchNorm`` on GPUs; on CPU (gloo) torch refuses it, so :class:`GlooSyncBatchNorm` does the same sum /
  sum-of-squares all-reduce with autograd.
* The process group has a timeout (``train.ddp_timeout_minutes``): a rank that waits on a crashed peer stops with
  an error instead of hanging (Fabric's launcher and torchrun also end every rank when one exits with an error).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError
from .services import stack_terms
from .training import EpochSampler

__all__ = ["GlooSyncBatchNorm", "RankSampler", "convert_sync_batchnorm", "launch_rank", "make_fabric",
           "mean_over_ranks", "per_rank_batch", "wants_ddp"]


def launch_rank() -> int:
    """This process's global rank as set by the launcher (torchrun: RANK; Fabric's own launcher: LOCAL_RANK on one
    machine), 0 before anything was launched — known before Fabric starts, so only rank 0 checks the run folder."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def wants_ddp(cfg: RunConfig) -> bool:
    devices = cfg.train.devices
    many = (isinstance(devices, int) and devices > 1) or (isinstance(devices, str) and devices.isdigit()
                                                           and int(devices) > 1)
    return cfg.train.strategy == "ddp" or many or (isinstance(devices, list | tuple) and len(devices) > 1)


def make_fabric(cfg: RunConfig):
    """A launched Fabric: one device, or DDP (gloo on CPU, nccl on GPUs) with a process-group timeout."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    strategy = "auto"
    if wants_ddp(cfg):
        strategy = DDPStrategy(timeout=timedelta(minutes=cfg.train.ddp_timeout_minutes))
    check_accelerator(cfg.train.accelerator, cfg.train.precision)
    fabric = Fabric(accelerator=cfg.train.accelerator, devices=cfg.train.devices, precision=cfg.train.precision,
                    strategy=strategy)
    fabric.launch()
    return fabric


def check_accelerator(accelerator: str, precision: str = "32-true") -> None:
    """Refuse, by its setting, an accelerator this machine lacks, and fp16 training on the CPU, which Lightning would
    quietly turn into bf16 (checked where the run starts, not when a config is validated: a study may be planned on
    one machine and trained on another)."""
    from ..run import checked_device

    if accelerator in ("cuda", "mps"):
        checked_device(accelerator, "--train.accelerator", "--train.accelerator cpu (or auto)")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    if on_cpu and precision.startswith("16"):
        raise ConfigError(f"--train.precision {precision}: float16 training needs a GPU, and this run trains on the "
                          "CPU (Lightning would train in bf16-mixed instead); pass --train.precision bf16-mixed for "
                          "that, or 32-true")


def per_rank_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ConfigError(f"data.batch_size {global_batch} is the global batch and must split evenly over "
                          f"train.devices {world_size}; choose a multiple of {world_size}")
    return global_batch // world_size


class RankSampler(EpochSampler):
    """:class:`EpochSampler` for N ranks: the permutation is padded (wrapping, like ``DistributedSampler``) to a
    multiple of N so every rank runs the same number of batches; without padding (N divides the training set)
    the ranks' images are disjoint and together exactly one device's epoch."""

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        pad = -len(order) % self.world_size
        order += (order * (pad // max(1, len(order)) + 1))[:pad]
        return order[self.rank::self.world_size]


class _AllReduceStats(torch.autograd.Function):
    """Sum a tensor over ranks; the gradient of a sum is the sum of the ranks' gradients (as torch's SyncBN)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on CPU processes (torch's ``SyncBatchNorm`` accepts only GPU tensors).

    In training mode the per-channel count, sum and sum of squares are all-reduced, so the normalisation and
    the running statistics are those of one device seeing the whole batch; in eval mode it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype)
        stats = _AllReduceStats.apply(torch.cat([input.sum(dims), (input * input).sum(dims), count]))
        channels = input.shape[1]
        n = stats[-1]
        mean = stats[:channels] / n
        var = stats[channels:2 * channels] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * n / (n - 1)
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        shape = [1, channels, *[1] * (input.dim() - 2)]
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised over ranks (same parameters and buffers, same state-dict keys)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_gloo(module)


def _convert_gloo(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        converted = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_gloo(child))
    return module


def mean_over_ranks(fabric, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss terms averaged over ranks (what one device would log for the global batch); every rank gets the
    same values, so a non-finite loss on any rank is seen — and skipped or raised — by all of them together."""
    if fabric.world_size == 1 or not terms:
        return terms
    stacked = stack_terms(terms)  # one all-reduce for all terms, host-made ones (ReContrast's alpha) included
    reduced = fabric.all_reduce(stacked, reduce_op="mean")
    return dict(zip(terms, reduced.unbind(0), strict=True))
