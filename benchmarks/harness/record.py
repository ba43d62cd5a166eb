"""Where a run's JSON goes, what machine and versions made it, and writing it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"  # the recorded figures (committed)
SCRATCH = RESULTS / "scratch"  # every run that is not recorded (git-ignored)


# --------------------------------------------------------------------------- output paths
def add_output_args(ap: argparse.ArgumentParser, name: str, *, device_out: bool = False) -> None:
    """`--out PATH` or `--record`; without either a run writes to the scratch folder.

    `name` is the file's name in either folder (for the help text; `output_path` takes the name
    again, since it can depend on other flags). `device_out`: `$OUT/<name>` when OUT is set and
    neither flag is given (the GPU machine's folder that comes back)."""
    where = f"{SCRATCH.relative_to(REPO)}/{name}"
    if device_out:
        where = f"$OUT/{name} when OUT is set, else {where}"
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--out", type=Path, default=None, help=f"JSON output file (default: {where})")
    group.add_argument(
        "--record",
        action="store_true",
        help=f"write the recorded result, {RESULTS.relative_to(REPO)}/{name}, instead of the scratch folder",
    )


def output_path(args: argparse.Namespace, name: str, *, device_out: bool = False) -> Path:
    """--out as given; else benchmarks/results/<name> with --record; else $OUT/<name> (with
    `device_out` and OUT set); else benchmarks/results/scratch/<name>."""
    if args.out is not None:
        return Path(args.out)
    if args.record:
        return RESULTS / name
    if device_out and os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return SCRATCH / name


def write_json(path: Path, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as JSON (one trailing newline), creating folders; replaced in one step, so a run
    cut off while writing leaves the previous complete file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- the machine
def set_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads) when given; the number of threads torch now uses."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(dist: str) -> str | None:
    try:
        import importlib.metadata as md

        return md.version(dist)
    except Exception:  # noqa: BLE001 - informational only
        return None


def versions() -> dict[str, Any]:
    import transformers

    import torus_plugins as tp

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": package_version("accelerate"),
        "torus_sparse": tp.__version__,
        "torus_sparse_from": str(Path(tp.__file__).parent),
    }


def environment(**host: Any) -> dict[str, Any]:
    """`date` (UTC), `host` (CPU, CPU count, torch threads, platform, python, plus `host`'s
    items) and `versions`: the head of every report, read when the run ends."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            **host,
        },
        "versions": versions(),
    }


class Run:
    """One run of a script: its output file, its wall clock and the load average at its start.

    `save(report)` stamps the report with `wall_s`, `loadavg_before` and `loadavg_after` and
    (re)writes it: the GPU checks call it after every phase, so a run cut off by a time limit still
    leaves what it measured. On a shared machine the load average says whether it was quiet."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.t0 = time.perf_counter()
        self.loadavg_before = list(os.getloadavg())

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stamp(self) -> dict[str, Any]:
        return {
            "wall_s": self.elapsed(),
            "loadavg_before": self.loadavg_before,
            "loadavg_after": list(os.getloadavg()),
        }

    def save(self, report: dict[str, Any], indent: int = 2) -> Path:
        report.update(self.stamp())
        return write_json(self.out, report, indent)


def begin(args: argparse.Namespace, name: str, *, threads: int | None = None, device_out: bool = False) -> Run:
    """The first step of every main(): torch's threads set (`set_threads`), the clock started, the
    output file chosen (`output_path`)."""
    set_threads(threads)
    return Run(output_path(args, name, device_out=device_out))
