"""Atomic files and checkpoints: an interrupted write never leaves a half-written file under the final name."""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write through ``write(fh)`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """safetensors file of a state dict (tensors made contiguous and detached to CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda fh: fh.write(save(tensors, metadata=metadata)))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}; is this a reconad run folder with a finished checkpoint?")
    return load_file(str(path))


def save_torch(path: str | Path, obj: Any) -> Path:
    def write(fh):
        torch.save(obj, fh)

    return atomic_write(path, write)


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


def save_checkpoint(folder: str | Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any]) -> None:
    """Weights (safetensors) and training state (optimizer, RNG, counters), each written atomically.

    Both files carry the batch counter, so a crash between the two renames is detected on resume.
    """
    folder = Path(folder)
    marker = str(train_state["batches_done"])
    save_weights(folder / WEIGHTS_FILE, model_state, {"batches_done": marker})
    save_torch(folder / STATE_FILE, train_state)


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    folder = Path(folder)
    weights, state_file = folder / WEIGHTS_FILE, folder / STATE_FILE
    if not (weights.is_file() and state_file.is_file()):
        raise FileNotFoundError(f"cannot resume: {folder} holds no checkpoint ({WEIGHTS_FILE} + {STATE_FILE})")
    with safe_open(str(weights), framework="pt") as fh:
        marker = (fh.metadata() or {}).get("batches_done")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if marker != str(state["batches_done"]):
        raise RuntimeError(f"checkpoint in {folder} is inconsistent (weights at batch {marker}, state at batch "
                           f"{state['batches_done']}); the run was interrupted while saving. Delete the folder's "
                           "checkpoint files to restart from scratch.")
    return load_file(str(weights)), state
