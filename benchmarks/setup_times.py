"""What set-up costs a new user: a fresh install from constraints.txt (pip, and uv for comparison)
and the test command's time, with the machine's load beside every figure.

Each install goes into a new virtual environment in a temp folder, with the package caches off
(`--no-cache-dir`, `--no-cache`), so it downloads what a fresh machine would (wheels this
machine keeps on local disk excepted: pip reads its configured find-links, uv does not, which is
why torch goes in with pip in both rows — uv would fetch a multi-GB CUDA build). The test row
runs `make test`'s pytest command in this checkout's `.venv` (`make install-test` first).

Run:  python benchmarks/setup_times.py [--skip-uv] [--skip-tests] [--record | --out PATH]
Writes benchmarks/results/scratch/setup_times.json; with --record benchmarks/results/setup_times.json.
Minutes: two installs (~2-4 each here) plus the suite (~7 on 2 quiet cores, far more when loaded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # sets the offline defaults before anything loads
from harness.record import REPO, add_output_args, begin, environment
from harness.report import log, show, table

TORCH = "torch==2.13.0"


def timed(cmd: list[str], **kw) -> tuple[float, list[float]]:
    """Seconds `cmd` took (it must succeed) and the 1-minute load average when it ended."""
    log(" ".join(cmd)[:160])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, **kw)
    return time.perf_counter() - t0, list(os.getloadavg())


def install_row(tool: str, workdir: Path) -> dict:
    """A new venv, torch with pip, then the project with its test extras under constraints.txt."""
    venv = workdir / f"venv-{tool}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    torch_s, _ = timed([py, "-m", "pip", "install", "--quiet", "--no-cache-dir", TORCH])
    if tool == "pip":
        cmd = [py, "-m", "pip", "install", "--quiet", "--no-cache-dir", "-c", "constraints.txt", "-e", ".[test]"]
    else:
        uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
        cmd = [uv, "pip", "install", "--quiet", "--no-cache", "--python", py, "-c", "constraints.txt", "-e", ".[test]"]
    deps_s, load = timed(cmd)
    return {"tool": tool, "torch_s": torch_s, "project_s": deps_s, "total_s": torch_s + deps_s, "loadavg_end": load}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-uv", action="store_true", help="time only the pip install")
    ap.add_argument("--skip-tests", action="store_true", help="time only the installs")
    add_output_args(ap, "setup_times.json")
    args = ap.parse_args()
    run = begin(args, "setup_times.json")
    report: dict = {"installs": [], "tests": None}
    with tempfile.TemporaryDirectory(prefix="torus-setup-") as tmp:
        for tool in ["pip"] + ([] if args.skip_uv else ["uv"]):
            report["installs"].append(install_row(tool, Path(tmp)))
            run.save({**environment(), **report})
    if not args.skip_tests:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        pytest = [str(REPO / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile"]
        seconds, load = timed(pytest, env=env)
        report["tests"] = {"command": " ".join(pytest[2:]), "seconds": seconds, "loadavg_end": load}
    out = run.save({**environment(), **report})

    t = table("set-up times (fresh venv, no package cache)", ["step", "seconds", "load (1 min) at end"])
    for row in report["installs"]:
        t.add_row(f"install with {row['tool']}: torch", f"{row['torch_s']:.0f}", "")
        t.add_row(
            f"install with {row['tool']}: -c constraints.txt -e .[test]",
            f"{row['project_s']:.0f}",
            f"{row['loadavg_end'][0]:.1f}",
        )
    if report["tests"]:
        t.add_row(
            "pytest (make test's command)",
            f"{report['tests']['seconds']:.0f}",
            f"{report['tests']['loadavg_end'][0]:.1f}",
        )
    show(t, f"load average before: {run.loadavg_before[0]:.1f}; {os.cpu_count()} CPUs; written to {out}")
    return 0


if __name__ == "__main__":
    assert harness
    sys.exit(main())
