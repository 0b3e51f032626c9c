"""``reconad serve``: an HTTP inference service with a results page, and a browser view of study results.

* :func:`create_app` — the FastAPI application for a predictor (``reconad.deploy.open_predictor``) and/or a
  study/run folder.
* :func:`app_for_path` — the application for what a path holds: a run or export folder (the service, plus
  ``/results`` for a run), or a study / folder of runs (the results page only).
* :func:`serve` — :func:`app_for_path` under uvicorn, on loopback unless ``allow_remote``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .images import ImageRejected, Limits

__all__ = ["ImageRejected", "Limits", "LOOPBACK_HOSTS", "app_for_path", "check_host", "create_app", "serve"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(*args: Any, **kwargs: Any):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def check_host(host: str, allow_remote: bool) -> None:
    if host not in LOOPBACK_HOSTS and not allow_remote:
        raise ConfigError(f"--host {host} would accept connections from other machines; the service has no "
                          "authentication, so pass --allow-remote to bind it anyway (default: 127.0.0.1)")


def app_for_path(path: str | Path, *, device: str = "cpu", limits: Limits | None = None, queue_size: int = 64,
                 max_batch: int = 8):
    """The application for a run folder, an export folder, a study folder or a folder of run folders."""
    from .results import is_results_folder

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give a run folder, an export folder or a study folder")
    if path.is_dir() and is_results_folder(path):
        return create_app(None, results_root=path, title=path.name)
    from ..deploy import open_predictor

    predictor = open_predictor(path, device=device, batch_size=max_batch)  # a queued batch is one model call
    if hasattr(predictor, "warm_up"):
        # a traced run records one trace per batch size: all of them now, not in the first requests' latency
        predictor.warm_up(range(1, max_batch + 1))
    is_run = (path / "config.yaml").is_file()
    return create_app(predictor, results_root=path if is_run else None, limits=limits, queue_size=queue_size,
                      max_batch=max_batch, title=path.name)


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          limits: Limits | None = None, queue_size: int = 64, max_batch: int = 8, allow_remote: bool = False) -> None:
    """Run the service for ``path`` until interrupted (blocking)."""
    import uvicorn

    check_host(host, allow_remote)
    app = app_for_path(path, device=device, limits=limits, queue_size=queue_size, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level="info", workers=1)
