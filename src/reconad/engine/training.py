"""Building blocks of a training run: seeds, the resumable sampler, loaders, optimizer and schedule."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import RunConfig
from ..errors import ConfigError
from ..methods.base import Method


def set_seed(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


class EpochSampler(Sampler[int]):
    """Shuffled indices that depend only on (seed, epoch), sharded over ranks, optionally starting mid-epoch.

    This is what makes ``--resume`` exact: the order of epoch ``e`` can be rebuilt and the batches already
    trained on skipped without loading them.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler=None, drop_last: bool = False,
                pin_memory: bool = False, seed: int = 0) -> DataLoader:
    # The loader gets its own generator: without one, every new iterator draws its workers' base seed from the
    # global torch RNG, so a resumed run (one extra iterator for the interrupted epoch) or an evaluation during
    # training would shift the RNG stream of the training steps.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """The batch's tensors on ``device``; with ``channels_last`` its images and feature maps (4-D floats) in NHWC."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        moved = {k: _nhwc(v) for k, v in moved.items()}
    return moved


def _nhwc(value: Any) -> Any:
    if torch.is_tensor(value) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


def make_optimizer(method: Method, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = method.param_groups(o)
    # foreach: one multi-tensor kernel per update term instead of a Python loop over the parameters. PyTorch picks
    # it by itself only on CUDA; on the CPU it gives bit-identical updates ~30 % faster (tests/test_engine.py)
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay, "eps": o.eps,
              "amsgrad": o.amsgrad, "foreach": True}
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return cls(groups, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int):
    if not cfg.optim.milestones:
        return None
    milestones = sorted({max(1, round(f * total_steps)) for f in cfg.optim.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.optim.gamma)


def total_batches(cfg: RunConfig, batches_per_epoch: int) -> int:
    """Training length in batches: ``train.steps`` optimizer steps, else ``train.iterations`` batches, else epochs.

    ``train.iterations`` counts batches (with ``accumulate: 2`` that is half as many optimizer steps);
    ``train.steps`` counts optimizer steps, so studies can compare methods at equal steps.
    """
    t = cfg.train
    if batches_per_epoch == 0:
        raise ConfigError(f"the training set gives no batch (data.batch_size {cfg.data.batch_size}, data.drop_last "
                          f"{cfg.data.drop_last}); lower --data.batch_size or add training images")
    if t.steps is not None:
        return int(t.steps) * max(1, t.accumulate)
    if t.iterations is not None:
        return int(t.iterations)
    if not t.epochs:
        raise ConfigError("set --train.epochs, --train.iterations (batches) or --train.steps (optimizer steps)")
    return int(t.epochs) * batches_per_epoch
