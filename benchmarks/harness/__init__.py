"""What every benchmark script shares: where results go, the machine record, timing, the report.

Scripts run as `python benchmarks/<script>.py`, so this folder's parent is on `sys.path` and
`import harness` finds this package with no path set-up. Its modules:

- `record`: output paths (scratch by default, `benchmarks/results/` with `--record`), the
  environment record (date, host, threads, versions), JSON writing, the `Run` clock;
- `timing`: the step clock, one timed greedy `generate()`, medians, rotated rounds, the time guard;
- `workload`: the embedded model loaded into ordinary memory, the chat prompt;
- `report`: rich tables, PASS/FAIL, byte sizes, timestamped log lines;
- `serve`: a real uvicorn server on a free 127.0.0.1 port, in a thread (the serving benchmarks');
- `device`: CUDA sync and memory helpers, the pinned host->device bandwidth probe (and one store
  buffer's), random bf16 models drawn on the device without a float32 pass, the SIGTERM guard
  that still writes a check's summary (the GPU checks').

Importing it costs torch only: transformers, rich and the project are imported where used, and
nothing here needs more than the GPU machine's image (torch 2.11, transformers 5.17).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .device import (  # noqa: E402
    DeviceCheck,
    Terminated,
    buffer_link,
    device_record,
    free_device_memory,
    host_pinned_stats,
    link_bandwidth,
    peak_allocated,
    peak_reserved,
    pick_device,
    random_bf16,
    sync,
    terminable,
)
from .record import (  # noqa: E402
    REPO,
    RESULTS,
    SCRATCH,
    Run,
    add_output_args,
    begin,
    environment,
    output_path,
    package_version,
    set_threads,
    write_json,
)
from .report import fmt_bytes, log, pass_fail, show, table  # noqa: E402
from .serve import Server  # noqa: E402
from .timing import Generation, StepClock, TimeGuard, generate_once, median, rotated, timed_generate  # noqa: E402
from .workload import SKY_MESSAGES, chat_prompt, load_in_memory  # noqa: E402

__all__ = [
    "DeviceCheck",
    "Terminated",
    "buffer_link",
    "REPO",
    "RESULTS",
    "SCRATCH",
    "SKY_MESSAGES",
    "Server",
    "Generation",
    "Run",
    "StepClock",
    "TimeGuard",
    "add_output_args",
    "begin",
    "chat_prompt",
    "device_record",
    "environment",
    "fmt_bytes",
    "free_device_memory",
    "generate_once",
    "host_pinned_stats",
    "link_bandwidth",
    "load_in_memory",
    "log",
    "median",
    "output_path",
    "package_version",
    "pass_fail",
    "peak_allocated",
    "peak_reserved",
    "pick_device",
    "random_bf16",
    "rotated",
    "set_threads",
    "show",
    "sync",
    "terminable",
    "table",
    "timed_generate",
    "write_json",
]
