"""The run folder: its file names, atomic writes of config / log / metrics / checkpoints, reading them back, load().

Layout of a run folder::

    config.yaml            the resolved configuration
    log.jsonl              every loss term and evaluation (one JSON object per line)
    metrics.json           metrics of the final model (written after the final checkpoint)
    checkpoints/           model.safetensors + state.safetensors + state.json: one consistent pair
    overlays/ plots/ ...   figures

Guarantees (tested in ``tests/test_faults.py``): every file is written to a temporary name and renamed; a
checkpoint is a folder written beside the old one and swapped in, so weights and training state always belong
to the same step and the previous checkpoint survives until the new one is complete; nothing is ever read
with code execution (safetensors, JSON, ``yaml.safe_load``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from .config import RunConfig, config_from_dict, config_to_dict
from .errors import ConfigError, RunFolderError
from .fileio import atomic_write_text, load_weights, save_weights, write_json, write_yaml

if TYPE_CHECKING:
    from .methods.base import Method

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "LOG_FILE", "METRICS_FILE", "JsonlLog", "build_method", "check_run_dir",
           "checkpoint_step", "decode_state", "default_run_dir", "encode_state", "load", "load_checkpoint",
           "prepare_run_dir", "read_metrics", "read_run_config", "save_checkpoint", "write_config"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
_NEW, _OLD = ".checkpoints.new", ".checkpoints.old"


# -- the folder itself --------------------------------------------------------------------------------------
def default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    category = cfg.data.category or Path(cfg.data.root or "data").name
    return Path(cfg.output_dir) / (cfg.name or f"{cfg.method}-{category}-{stamp}")


def check_run_dir(run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check, without writing anything, that ``run_dir`` may be used: new or empty, a run to resume, or ``overwrite``.

    Raises:
        RunFolderError: ``run_dir`` is a file, or an existing run that would be replaced without ``overwrite``.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a run folder; choose another --run_dir / --name")
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunFolderError(f"cannot resume {run_dir}: it is not a reconad run folder (no {CONFIG_FILE})")
    elif run_dir.is_dir() and any(not _is_temporary(p) for p in run_dir.iterdir()) and not overwrite:
        raise RunFolderError(f"{run_dir} already holds files; continue it with `reconad fit --resume {run_dir}`, "
                             "pass --overwrite to replace it, or choose another --run_dir / --name")
    return run_dir


def _is_temporary(path: Path) -> bool:
    """A file an interrupted atomic write left behind (``.name.XXXX.tmp``): never a user's work."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def prepare_run_dir(run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """:func:`check_run_dir`, then create the folder (clearing it first with ``overwrite``)."""
    run_dir = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if not resume and overwrite and run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_config(run_dir: str | Path, cfg: RunConfig) -> Path:
    return write_yaml(Path(run_dir) / CONFIG_FILE, config_to_dict(cfg))


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved configuration saved in a run folder."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a reconad run folder (no {CONFIG_FILE})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunFolderError(f"{path} is not valid YAML ({err}); restore it or start a new run") from err
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} does not hold a configuration mapping; restore it or start a new run")
    return config_from_dict(data)


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir} holds no {METRICS_FILE}: the run is unfinished or its evaluation failed "
                             f"(re-run it with `reconad test {run_dir}`)")
    return json.loads(path.read_text())


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class JsonlLog:
    """Append-only JSON-lines log; on resume, entries written after the checkpoint are dropped.

    Non-finite numbers are written as ``null`` so that every line stays valid JSON.
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        """Called with every entry written (experiment trackers); the file stays the ground truth."""

    def truncate_after(self, batches_done: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.read_lines() if json.loads(line).get("batch", 0) <= batches_done]
        atomic_write_text(self.path, "\n".join(kept) + "\n" if kept else "")

    def write(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(_finite_or_none(entry), allow_nan=False) + "\n")
            for listener in self.listeners:
                listener(entry)

    def read_lines(self) -> list[str]:
        # a line cut by a kill (no newline at the end) is dropped: it was never complete
        text = self.path.read_text()
        lines = text.split("\n")
        return [line for line in lines[:-1] if line.strip()] + ([] if not lines[-1].strip() else [])

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.read_lines()]


# -- training state without pickle -------------------------------------------------------------------------
def encode_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (optimizer, scheduler, RNG) into tensors (for safetensors) and JSON-able data.

    Tuples, non-string dict keys, numpy arrays and tensors are tagged so :func:`decode_state` rebuilds the
    same Python objects; nothing needs unpickling.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if torch.is_tensor(x):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().to("cpu").contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k.startswith("__") for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"__items__": [[enc(k), enc(v)] for k, v in x.items()], "counter": isinstance(x, Counter)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"training state holds a {type(x).__name__}, which reconad cannot save without pickle")

    return tensors, enc(obj)


def decode_state(tensors: dict[str, torch.Tensor], data: Any) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__items__" in x:
            items = {dec(k): dec(v) for k, v in x["__items__"]}
            return Counter(items) if x.get("counter") else items
        return {k: dec(v) for k, v in x.items()}

    return dec(data)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints --------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any]) -> Path:
    """Weights and training state as one consistent folder ``run_dir/checkpoints``, swapped in atomically.

    The new checkpoint is written completely into ``.checkpoints.new``; then the old folder is renamed aside,
    the new one renamed into place and the old one removed. A kill at any moment leaves either the old or the
    new complete checkpoint (see :func:`_recover_checkpoint`).
    """
    run_dir = Path(run_dir)
    _recover_checkpoint(run_dir)
    new, old, final = run_dir / _NEW, run_dir / _OLD, run_dir / CHECKPOINT_DIR
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    step = str(train_state["batches_done"])
    save_weights(new / WEIGHTS_FILE, model_state, {"batches_done": step})
    tensors, data = encode_state(train_state)
    save_weights(new / STATE_TENSORS_FILE, tensors, {"batches_done": step})
    write_json(new / STATE_FILE, data)
    _fsync_dir(new)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_checkpoint(run_dir: Path) -> None:
    """Finish or undo a swap a kill interrupted; drop half-written temporary folders and files."""
    final, old, new = run_dir / CHECKPOINT_DIR, run_dir / _OLD, run_dir / _NEW
    if not final.exists() and old.is_dir():
        os.replace(old, final)  # killed between the two renames: the old checkpoint is complete
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    for stray in list(run_dir.glob(".*.tmp")) + (list(final.glob(".*.tmp")) if final.is_dir() else []):
        stray.unlink(missing_ok=True)


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The batch counter of the run's checkpoint, or ``None`` when it has none."""
    path = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    if not path.is_file():
        old = Path(run_dir) / _OLD / STATE_FILE
        path = old if old.is_file() and not (Path(run_dir) / CHECKPOINT_DIR).exists() else path
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["batches_done"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"{path} is damaged ({type(err).__name__}: {err}); restore the run folder or start the "
                             "run again with --overwrite") from err


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, training state) of the run's checkpoint; both belong to the same step by construction."""
    from safetensors import SafetensorError, safe_open

    run_dir = Path(run_dir)
    _recover_checkpoint(run_dir)
    folder = run_dir / CHECKPOINT_DIR
    files = [folder / WEIGHTS_FILE, folder / STATE_TENSORS_FILE, folder / STATE_FILE]
    if not all(f.is_file() for f in files):
        raise RunFolderError(f"cannot resume {run_dir}: it holds no complete checkpoint in {folder} "
                             f"({', '.join(f.name for f in files)}); start the run again")
    try:
        markers = []
        for path in files[:2]:
            with safe_open(str(path), framework="pt") as fh:
                markers.append((fh.metadata() or {}).get("batches_done"))
        data = json.loads(files[2].read_text())
        tensors = load_weights(files[1])
        weights = load_weights(files[0])
    except (SafetensorError, OSError, ValueError) as err:
        raise RunFolderError(f"the checkpoint in {folder} cannot be read ({err}); it is damaged: start the run "
                             "again, or restore the folder from a backup") from err
    state = decode_state(tensors, data)
    if not isinstance(state, dict) or any(m != str(state.get("batches_done")) for m in markers):
        raise RunFolderError(f"the checkpoint in {folder} is inconsistent (files of different steps: {markers} vs "
                             f"{state.get('batches_done') if isinstance(state, dict) else '?'}); it was not written "
                             "by reconad: start the run again")
    return weights, state


# -- building and loading models ----------------------------------------------------------------------------
def build_method(cfg: RunConfig, *, weights_from_checkpoint: bool = False) -> Method:
    """Backbone + method from a run config. With ``weights_from_checkpoint`` the backbone is built without
    downloading weights, because a checkpoint is about to overwrite every tensor (strictly checked)."""
    from .backbones import create_backbone
    from .registry import get_method_class

    cls = get_method_class(cfg.method)
    weights = None if weights_from_checkpoint else cfg.backbone.weights
    backbone = create_backbone(cfg.backbone.name, taps=cfg.backbone.taps, weights=weights,
                               trainable=cls.trainable_backbone)
    return cls(cfg.model, backbone)


def checked_device(device: str | torch.device, setting: str = "--device", instead: str = "--device cpu",
                   ) -> torch.device:
    """``device`` as a torch device that exists here, or a :class:`ConfigError` naming ``setting`` and what to use
    ``instead`` (rather than CUDA's traceback from inside the first ``.to``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{setting} {device}: not a device name ({err}); use cpu or cuda[:N]") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} {device}: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) finds "
                          f"no usable NVIDIA GPU on this machine; run where one and its driver are installed, or use "
                          f"{instead}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{setting} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          "numbered from 0")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting} {device}: this machine has no usable Apple GPU (MPS); use {instead}")
    return parsed


def load(run_dir: str | Path, map_location: str | torch.device = "cpu") -> Method:
    """The trained model of a run folder, in eval mode."""
    map_location = checked_device(map_location)
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    _recover_checkpoint(run_dir)
    path = run_dir / CHECKPOINT_DIR / WEIGHTS_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir} holds no trained weights ({path}); finish the run with "
                             f"`reconad fit --resume {run_dir}`")
    from safetensors import SafetensorError

    method = build_method(cfg, weights_from_checkpoint=True)
    try:
        weights = load_weights(path)
    except (SafetensorError, OSError) as err:
        raise RunFolderError(f"{path} is not a readable safetensors file ({err}); the run folder is damaged: "
                             "restore it or train again") from err
    try:
        method.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise RunFolderError(f"the weights in {path} do not fit the run's configuration ({str(err)[:300]}); "
                             "the folder was changed by hand or by another version") from err
    return method.to(map_location).eval()

