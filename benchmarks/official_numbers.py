"""The official code's own timings, measured by a user, set beside a ``benchmarks/speed.py`` run.

``speed.py`` compares reconad with a reference built from reconad's modules and computed the official way. The
stronger comparison is against the official repositories themselves, timed on the same machine; they are not
vendored here (and cannot be downloaded on every machine), so their numbers come from a JSON file the user writes:

    {
      "source": "hq-deng/RD4AD @ <commit>: main.py's loop timed with time.perf_counter, 20 iterations after 3",
      "env": {"device": "cpu", "threads": 1, "cpu": "<model name from /proc/cpuinfo>", "torch": "2.1.0"},
      "cases": {
        "rd4ad:wide_resnet50_2:256": {
          "train_batch": 2,
          "train_step_s": 4.1,
          "train_images_per_s": 0.45,
          "eval_images_per_s": {"1": 1.9}
        }
      }
    }

Per case (``method:backbone:size``, as ``speed.py --cases`` names it) every number is optional:

* ``train_step_s``: seconds of one training iteration (forward, backward, optimizer step) at ``train_batch``,
  without data loading — compared with ``speed.py``'s "train step" (``--train-batch`` must equal ``train_batch``);
* ``train_images_per_s``: training images per second of whole epochs, data loading included — compared with
  "train e2e";
* ``eval_images_per_s``: images per second of the official test loop (model, map, blur) by batch size — compared
  with the eval figure at the same batch, and the best of ours with the best of theirs ("throughput").

``python benchmarks/speed.py --cases ... --official official.json`` checks the file before timing anything (a run
on another device type or thread count is refused: such ratios say nothing), then prints and stores the ratios;
``--print earlier.json --official official.json`` compares an earlier run without timing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEASURES = ("train_step_s", "train_images_per_s", "eval_images_per_s")


class OfficialNumbersError(ValueError):
    """The official-numbers file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class OfficialCase:
    train_batch: int | None = None
    train_step_s: float | None = None
    train_images_per_s: float | None = None
    eval_images_per_s: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OfficialNumbers:
    path: str
    source: str
    device: str
    threads: int | None
    machine: str | None
    cases: dict[str, OfficialCase]


def load(path: str | Path) -> OfficialNumbers:
    """Read and check an official-numbers file (module docstring); every problem is an error naming the entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise OfficialNumbersError(f"{path}: no such file (the official code's timings, see "
                                   f"benchmarks/official_numbers.py for its format)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OfficialNumbersError(f"{path}: not a readable JSON file ({err})") from None
    where = str(path)
    _expect(isinstance(raw, dict), where, "the file must hold a JSON object with 'source', 'env' and 'cases'")
    _only(raw, {"source", "env", "cases"}, where)
    source = raw.get("source")
    _expect(isinstance(source, str) and source.strip() != "", where,
            "'source' must say which official code (repository, commit) was timed and how")
    env = raw.get("env")
    _expect(isinstance(env, dict), where, "'env' must be an object with 'device' and, on a CPU, 'threads'")
    device = env.get("device")
    _expect(device in ("cpu", "cuda"), f"{where}: env.device", f"must be 'cpu' or 'cuda', not {device!r}")
    threads = env.get("threads")
    if device == "cpu" or threads is not None:
        _expect(_is_int(threads) and threads >= 1, f"{where}: env.threads",
                f"must be the torch thread count the official code ran with (an integer ≥ 1), not {threads!r}")
    machine = env.get("gpu" if device == "cuda" else "cpu")
    cases = raw.get("cases")
    _expect(isinstance(cases, dict) and cases, where, "'cases' must map 'method:backbone:size' to its numbers")
    parsed = {}
    for name, value in cases.items():
        parts = name.split(":")
        _expect(len(parts) == 3 and all(parts) and parts[2].isdigit(), f"{where}: cases",
                f"{name!r} is not 'method:backbone:size' (e.g. 'rd4ad:wide_resnet50_2:256')")
        parsed[name] = _case(value, f"{where}: cases[{name!r}]")
    return OfficialNumbers(str(path), source.strip(), device, threads, machine if isinstance(machine, str) else None,
                           parsed)


def _case(value: Any, where: str) -> OfficialCase:
    _expect(isinstance(value, dict), where, f"must be an object with some of {', '.join(MEASURES)}")
    _only(value, {"train_batch", *MEASURES}, where)
    _expect(any(value.get(m) is not None for m in MEASURES), where, f"has none of {', '.join(MEASURES)}")
    step = _positive(value.get("train_step_s"), f"{where}.train_step_s")
    batch = value.get("train_batch")
    if step is not None or batch is not None:
        _expect(_is_int(batch) and batch >= 1, f"{where}.train_batch",
                f"must be the batch size of the timed training iterations (an integer ≥ 1), not {batch!r}")
    evals = value.get("eval_images_per_s") or {}
    _expect(isinstance(evals, dict), f"{where}.eval_images_per_s", "must map a batch size to images per second")
    parsed: dict[int, float] = {}
    for key, rate in evals.items():
        _expect(str(key).isdigit() and int(key) >= 1, f"{where}.eval_images_per_s",
                f"key {key!r} is not a batch size")
        parsed[int(key)] = _positive(rate, f"{where}.eval_images_per_s[{key!r}]")
    return OfficialCase(batch, step, _positive(value.get("train_images_per_s"), f"{where}.train_images_per_s"),
                        parsed)


def _positive(value: Any, where: str) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    _expect(ok, where, f"must be a positive number, not {value!r}")
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _only(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    _expect(not unknown, where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _expect(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise OfficialNumbersError(f"{where}: {message}")


# -- against a run ---------------------------------------------------------------------------------------------------
def check_setup(official: OfficialNumbers, device: str, threads: int, train_batch: int | None,
                cases: list[str] | None = None) -> list[str]:
    """Refuse a run whose setup differs where a ratio would mean nothing; return warnings for what may differ."""
    run_device = device.split(":")[0]
    if official.device != run_device:
        raise OfficialNumbersError(f"{official.path}: the official numbers were measured on {official.device}, this "
                                   f"run is on {run_device}; time both on the same device (--device)")
    if run_device == "cpu" and official.threads != threads:
        raise OfficialNumbersError(f"{official.path}: the official numbers ran {official.threads} thread(s), this run "
                                   f"{threads}; pass --threads {official.threads}")
    for name, case in official.cases.items():
        if cases is not None and name not in cases:
            continue
        if case.train_step_s is not None and train_batch is not None and case.train_batch != train_batch:
            raise OfficialNumbersError(f"{official.path}: cases[{name!r}] timed training at batch {case.train_batch}, "
                                       f"this run at {train_batch}; pass --train-batch {case.train_batch}")
    warnings = []
    if cases is not None:
        missing = sorted(set(official.cases) - set(cases))
        if missing:
            warnings.append(f"no run for the official case(s) {', '.join(missing)} (add them to --cases)")
    return warnings


def machine_warning(official: OfficialNumbers, machine: str | None) -> str | None:
    if official.machine and machine and official.machine.strip() != machine.strip():
        return (f"the official numbers come from {official.machine!r}, this run from {machine!r}: ratios across "
                f"machines compare the machines as much as the code")
    return None


def case_name(row: dict) -> str:
    """A speed.py result row's case, as ``--cases`` and the official file name it."""
    return f"{row['method']}:{row['backbone']}:{row['size']}"


def comparisons(rows: list[dict], official: OfficialNumbers) -> list[dict]:
    """One entry per (case, measure) both sides have: ours, official and ours ÷ official in speed (above 1 = reconad
    faster; for step seconds the official time ÷ ours)."""
    out = []
    for row in rows:
        name = case_name(row)
        case = official.cases.get(name)
        if case is None:
            continue
        pairs = [("train step s", row.get("train_step_s"), case.train_step_s, True),
                 ("train e2e img/s", row.get("train_e2e_images_per_s"), case.train_images_per_s, False)]
        ours_eval = {int(k[len("eval_b"):-len("_images_per_s")]): v for k, v in row.items()
                     if k.startswith("eval_b") and k.endswith("_images_per_s")}
        pairs += [(f"eval b{b} img/s", ours_eval.get(b), rate, False)
                  for b, rate in sorted(case.eval_images_per_s.items())]
        if ours_eval and case.eval_images_per_s:
            best = max(ours_eval, key=ours_eval.get)
            theirs = max(case.eval_images_per_s, key=case.eval_images_per_s.get)
            pairs.append((f"eval throughput img/s (ours b{best}, official b{theirs})", ours_eval[best],
                          case.eval_images_per_s[theirs], False))
        for measure, ours, theirs, is_time in pairs:
            if ours is None or theirs is None:
                continue
            out.append({"case": name, "measure": measure, "ours": ours, "official": theirs,
                        "speedup": theirs / ours if is_time else ours / theirs})
    return out


def table(entries: list[dict]) -> str:
    lines = ["| case | measure | ours | official | ×official |", "|---|---|---|---|---|"]
    lines += [f"| {e['case']} | {e['measure']} | {e['ours']:.3f} | {e['official']:.3f} | {e['speedup']:.2f} |"
              for e in entries]
    return "\n".join(lines)


def summary(official: OfficialNumbers, entries: list[dict], warnings: list[str]) -> dict[str, Any]:
    """What the run's JSON keeps: the file, its source and setup, the warnings and the ratios."""
    return {"file": official.path, "source": official.source, "device": official.device, "threads": official.threads,
            "machine": official.machine, "warnings": warnings, "comparisons": entries}
