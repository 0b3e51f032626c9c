"""The feature cache (``train.feature_cache``): what a method's frozen networks compute on each training image, once.

RD4AD's teacher, ReContrast's frozen twin, GNL's clean and gray views through the teacher, RD++'s clean view and
ULSAD's standardised extractor features depend only on the image and on weights that never train, and the training
images are not augmented before them. The official code recomputes them every epoch; here one pass over the
training set before the first batch computes them (:meth:`Method.frozen_features`) and every batch takes its rows
by sample index. The convolutions of these networks act per sample (eval-mode BatchNorm), so a row is the number the
batch would have computed (tests check the trained weights are the same). Both a fresh and a resumed run build the
cache in the same pass, so resuming stays exact.

When the method needs nothing else of a batch (``Method.cache_replaces_images``: RD4AD), training reads no image
after that pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..config import RunConfig
from ..errors import ConfigError
from ..methods.base import Method
from ..progress import progress
from .training import make_loader, to_device

log = logging.getLogger(__name__)

GIB = 2**30


def cache_mode(setting: str | bool) -> str:
    """``train.feature_cache`` as ``auto`` / ``on`` / ``off`` (YAML's booleans are ``on`` / ``off``)."""
    if isinstance(setting, bool):
        return "on" if setting else "off"
    return setting


@dataclass
class FeatureCache:
    """Per training sample, the method's frozen features: ``store[key][level]`` is (N, C, h, w) on the device."""

    store: dict[str, list[Tensor]]
    replaces_images: bool

    @property
    def nbytes(self) -> int:
        return _nbytes(self.store)

    def rows(self, indices: Tensor) -> dict[str, list[Tensor]]:
        """The cached entries of the samples ``indices``, in that order."""
        index = indices.to(next(iter(self.store.values()))[0].device)
        return {key: [t.index_select(0, index) for t in levels] for key, levels in self.store.items()}

    def summary(self) -> dict[str, Any]:
        return {"keys": sorted(self.store), "bytes": self.nbytes, "gib": round(self.nbytes / GIB, 4),
                "replaces_images": self.replaces_images}


class IndexedSamples(Dataset):
    """A dataset whose samples also carry their ``index`` (to find their cached rows); forwards ``set_epoch``."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.base[index], "index": index}

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)


def cached_batches(cache: FeatureCache, order: Sequence[int], batch_size: int,
                   drop_last: bool) -> Iterator[dict[str, Any]]:
    """The batches a DataLoader would make of ``order``, built from the cache alone (no image is read)."""
    for start in range(0, len(order), batch_size):
        chunk = list(order[start:start + batch_size])
        if drop_last and len(chunk) < batch_size:
            return
        indices = torch.tensor(chunk, dtype=torch.long)
        yield {"index": indices, **cache.rows(indices)}


def with_cached_rows(cache: FeatureCache, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Data-loader batches of :class:`IndexedSamples` with their cached rows added."""
    for batch in batches:
        yield {**batch, **cache.rows(batch["index"])}


def _nbytes(features: dict[str, list[Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for levels in features.values() for t in levels)


@torch.no_grad()
def build_feature_cache(method: Method, train_set: Dataset, cfg: RunConfig, device: torch.device,
                        batch_size: int) -> FeatureCache | None:
    """One pass over ``train_set`` in index order through :meth:`Method.frozen_features`, or ``None`` when the
    method has nothing to cache, ``train.feature_cache`` is ``off``, or (``auto``) it would exceed
    ``train.feature_cache_gib``.

    Raises:
        ConfigError: ``train.feature_cache: on`` and the cache would exceed ``train.feature_cache_gib``.
    """
    mode = cache_mode(cfg.train.feature_cache)
    if mode == "off" or len(train_set) == 0:
        return None
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(0)
    loader = make_loader(train_set, batch_size, cfg.data.num_workers, seed=cfg.train.seed)
    batches = iter(loader)
    first = to_device(next(batches), device)
    features = method.frozen_features(first)
    if not features:
        return None
    need = _nbytes(features) / len(first["image"]) * len(train_set)
    budget = cfg.train.feature_cache_gib * GIB
    if need > budget:
        what = (f"caching the frozen features of {len(train_set)} training images needs {need / GIB:.2f} GiB, over "
                f"--train.feature_cache_gib {cfg.train.feature_cache_gib:g}")
        if mode == "on":
            raise ConfigError(f"{what}: raise --train.feature_cache_gib or set --train.feature_cache auto or off")
        log.info("%s: the frozen features are recomputed every batch (as the official code does)", what)
        return None
    store = {key: [torch.empty((len(train_set), *t.shape[1:]), dtype=t.dtype, device=t.device) for t in levels]
             for key, levels in features.items()}
    bar = progress(total=len(loader), desc="cache frozen features")
    start = 0
    while features is not None:
        n = len(next(iter(features.values()))[0])
        for key, levels in features.items():
            for slot, value in zip(store[key], levels):
                slot[start:start + n] = value
        start += n
        bar.update(1)
        batch = next(batches, None)
        features = method.frozen_features(to_device(batch, device)) if batch is not None else None
    bar.close()
    cache = FeatureCache(store, method.cache_replaces_images)
    log.info("cached the frozen features of %d training images (%.3f GiB)", len(train_set), cache.nbytes / GIB)
    return cache
