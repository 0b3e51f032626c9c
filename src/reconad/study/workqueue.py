"""The shared work queue: any number of workers take the next unclaimed cell through an atomic claim file."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import write_json
from .cells import Cell, cell_status
from .console import CellReporter, _run_reported
from .definition import CLAIMS_DIR

log = logging.getLogger(__name__)


# -- the shared work queue -----------------------------------------------------------------------------------
@dataclass
class Claim:
    """A worker's claim of one cell: ``<study>/.claims/<run>__<category>__seed<k>.json`` created with
    ``O_CREAT | O_EXCL`` (only one worker can create it), holding host, pid and a heartbeat that a thread renews;
    a claim whose heartbeat is older than ``stale_seconds`` belongs to a dead worker and is taken over."""

    path: Path
    token: str
    heartbeat_seconds: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def body(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "heartbeat": time.time()}

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_seconds):
                if read_claim(self.path).get("token") != self.token:
                    log.warning("claim %s was taken over by another worker", self.path)
                    return
                write_json(self.path, self.body())

        self._thread = threading.Thread(target=beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if read_claim(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def claim_path(output: Path, cell: Cell) -> Path:
    safe_run = cell.run.replace("/", "-")
    return output / CLAIMS_DIR / f"{safe_run}__{cell.category}__seed{cell.seed}.json"


def read_claim(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or caught between two atomic renames: no claim to honour
        return {}


def _create_claim(path: Path, claim: Claim) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(claim.body(), fh)
    return True


def try_claim(output: Path, cell: Cell, heartbeat_seconds: float, stale_seconds: float) -> Claim | None:
    """Claim ``cell`` for this process, taking over a stale claim; ``None`` when another live worker holds it."""
    path = claim_path(output, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = Claim(path, uuid.uuid4().hex, heartbeat_seconds)
    if _create_claim(path, claim):
        return claim
    held = read_claim(path)
    if not held or time.time() - float(held.get("heartbeat", 0)) < stale_seconds:
        return None
    # Stale: move it aside atomically (one worker wins the rename), check that what was moved is the stale claim
    # judged above (not a fresh claim another worker made meanwhile; that one is put back), then claim anew
    aside = path.with_name(f"{path.name}.stale-{claim.token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    moved = read_claim(aside)
    if moved.get("token") != held.get("token"):
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return None
    aside.unlink(missing_ok=True)
    log.warning("taking over %s/%s/seed%d from %s pid %s (no heartbeat for %.0f s)", cell.run, cell.category,
                cell.seed, held.get("host"), held.get("pid"), time.time() - float(held.get("heartbeat", 0)))
    return claim if _create_claim(path, claim) else None


def run_worker(cells: list[Cell], output: Path, reporter: CellReporter, fit: Callable | None = None,
               heartbeat_seconds: float = 30.0, stale_seconds: float | None = None,
               poll_seconds: float | None = None) -> None:
    """Take the next unclaimed cell until every cell is done or failed (waiting while live workers hold some).

    Failed cells are not retried by workers (``failed.json``); a plain ``reconad study`` call retries them.
    """
    stale_seconds = stale_seconds or 4 * heartbeat_seconds
    poll_seconds = poll_seconds or heartbeat_seconds
    while True:
        open_cells = [c for c in cells if cell_status(c.run_dir) not in ("done", "failed")]
        if not open_cells:
            return
        ran = False
        for cell in open_cells:
            claim = try_claim(output, cell, heartbeat_seconds, stale_seconds)
            if claim is None:
                continue
            try:
                if cell_status(cell.run_dir) not in ("done", "failed"):  # finished while we looked: skip it
                    claim.start_heartbeat()
                    _run_reported(cell, reporter, fit)
                    ran = True
            finally:
                claim.release()
            break
        if not ran:
            time.sleep(poll_seconds)  # the open cells are held by live workers: wait for them or their heartbeat
