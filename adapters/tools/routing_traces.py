"""Record MoE routing traces from a transformers model, and the `train-predictor` command.

    torus-sparse train-predictor --model ./Mixtral-8x7B --out mixtral.predictor.safetensors

In transformers 5 MoE models (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, GPT-OSS, ...)
each MoE decoder layer's `mlp` holds a router (`mlp.gate`, GPT-OSS: `mlp.router`) called with
the flattened hidden states the experts get and returning (router_logits, top_k_weights,
top_k_index). Forward hooks on those routers record their input and the routed expert ids.
Layers whose `mlp` has no router (DeepSeek-V3's first dense layers, Qwen-MoE `mlp_only_layers`)
are skipped: MoE layer index j counts only layers with a router.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from torus_plugins.errors import ConfigError, ModelNotFoundError, TorusError
from torus_plugins.moe.predictor_net import PredictorFingerprint, save_predictor
from torus_plugins.moe.training import RoutingTraces, train_predictor

from .progress_report import progress_bar

Progress = Callable[[int, int], None]

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def moe_routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, router module) for each MoE layer, in order; position in the list = MoE index j.

    Found through the registered MoE architectures (`expert_sites`), so the layers a predictor is
    trained on are exactly the ones the engine streams, third-party MoE plugins included.
    """
    from torus_plugins.plugins import resolve

    arch = next((a for a in resolve().architectures if hasattr(a, "expert_sites") and a.matches(model)), None)
    sites = arch.expert_sites(model) if arch is not None else []
    if not sites:
        model_type = getattr(_text_config(model), "model_type", type(model).__name__)
        raise ConfigError(
            f"{model_type!r} is not a mixture-of-experts model that a torus-sparse MoE architecture plugin knows; "
            f"the expert predictor is only for MoE models"
        )
    return [(site.layer, site.router) for site in sites]


def fingerprint_of(model: nn.Module) -> PredictorFingerprint:
    """The `PredictorFingerprint` of a transformers MoE model (ConfigError if it is not one)."""
    routers = moe_routers(model)
    cfg = _text_config(model)
    counts, top_ks = set(), set()
    for _, router in routers:
        weight = getattr(router, "weight", None)
        num = getattr(router, "num_experts", None) or (weight.shape[0] if weight is not None else None)
        counts.add(int(num) if num is not None else None)
        top_ks.add(int(router.top_k))
    if None in counts:
        num = next((getattr(cfg, k) for k in _EXPERT_COUNT_KEYS if getattr(cfg, k, None)), None)
        counts = {c for c in counts if c is not None} | ({int(num)} if num else set())
    if len(counts) != 1 or len(top_ks) != 1:
        raise ConfigError(f"MoE layers disagree on expert count {sorted(counts)} or top_k {sorted(top_ks)}")
    return PredictorFingerprint(
        model_type=str(getattr(cfg, "model_type", type(model).__name__)),
        num_moe_layers=len(routers),
        num_experts=counts.pop(),
        hidden_size=int(cfg.hidden_size),
        top_k=top_ks.pop(),
    )


def _windows(tokenizer: Any, texts: Sequence[str] | torch.Tensor, max_tokens: int, window: int) -> list[torch.Tensor]:
    """Token id windows (1-D each), at most `window` long, `max_tokens` in all."""
    streams: list[torch.Tensor] = []
    bos = None
    if isinstance(texts, torch.Tensor):
        ids = texts.long()
        streams = [ids] if ids.dim() == 1 else list(ids.reshape(-1, ids.shape[-1]))
    else:
        if isinstance(texts, str):
            texts = [texts]
        if tokenizer is None:
            raise ConfigError("record_traces needs a tokenizer for text input (or pass a tensor of token ids)")
        bos = getattr(tokenizer, "bos_token_id", None)
        budget = max_tokens
        for text in texts:
            if budget <= 0:
                break
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            streams.append(torch.tensor(ids, dtype=torch.long))
            budget -= len(ids)
    step = window - 1 if bos is not None else window
    out: list[torch.Tensor] = []
    left = max_tokens
    for ids in streams:
        for start in range(0, len(ids), step):
            if left <= 0:
                return out
            piece = ids[start : start + step]
            if bos is not None:
                piece = torch.cat([torch.tensor([bos]), piece])
            piece = piece[:left]
            out.append(piece)
            left -= len(piece)
    return out


@torch.no_grad()
def record_traces(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | torch.Tensor,
    max_tokens: int,
    progress: Progress | None = None,
    *,
    window: int = 256,
) -> RoutingTraces:
    """Run `model` teacher-forced over `texts` and record each MoE router's input and routed experts.

    texts: strings (tokenized with `tokenizer`; each window of `window` tokens starts with BOS when the
    tokenizer has one), or a tensor of token ids ([S] or [B, S]; `tokenizer` may then be None; each
    row is split into windows). At most `max_tokens` tokens are recorded. `progress(tokens, max_tokens)`.
    """
    if max_tokens < 1 or window < 2:
        raise ConfigError(f"max_tokens must be at least 1 and window at least 2, got {max_tokens} and {window}")
    fp = fingerprint_of(model)
    routers = moe_routers(model)
    wins = _windows(tokenizer, texts, max_tokens, window)
    if not wins:
        raise ConfigError("no tokens to record: the texts are empty")
    total = sum(len(w) for w in wins)
    H, k = fp.hidden_size, fp.top_k
    hidden_parts: list[list[torch.Tensor]] = [[] for _ in routers]
    expert_parts: list[list[torch.Tensor]] = [[] for _ in routers]

    def make_hook(j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(output, (tuple, list)) or len(output) < 3:
                raise ConfigError(
                    f"the router of MoE layer {j} returned {type(output).__name__}, not (logits, weights, indices)"
                )
            hidden_parts[j].append(h.detach().reshape(-1, H).float().cpu())
            expert_parts[j].append(output[2].detach().reshape(-1, k).long().cpu())

        return hook

    handles = [router.register_forward_hook(make_hook(j), with_kwargs=True) for j, (_, router) in enumerate(routers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    done = 0
    try:
        for win in wins:
            model(input_ids=win[None].to(device), use_cache=False)
            done += len(win)
            for j, parts in enumerate(hidden_parts):
                got = sum(p.shape[0] for p in parts)
                if got != done:
                    raise ConfigError(
                        f"the router of MoE layer {j} saw {got} tokens where {done} went through the model "
                        f"(is the MoE block replaced by a fused kernel that bypasses its router?)"
                    )
            if progress is not None:
                progress(done, total)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    hidden = torch.stack([torch.cat(p) for p in hidden_parts], dim=1)
    experts = torch.stack([torch.cat(p) for p in expert_parts], dim=1)
    return RoutingTraces(hidden, experts, fp)


# --------------------------------------------------------------------------------------------
# default texts

_BUILTIN_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water "
    "and, using sunlight absorbed by chlorophyll, produce glucose and release oxygen.",
    "Q: What is the derivative of x^3 + 2x? A: Using the power rule, d/dx x^3 = 3x^2 and d/dx 2x = 2, "
    "so the derivative is 3x^2 + 2. Integrating back gives x^3 + 2x + C.",
    "User: Can you recommend a good book for a long train journey?\nAssistant: Sure! If you like "
    "mysteries, try 'The Moonstone' by Wilkie Collins; for something lighter, 'Three Men in a Boat'.",
    "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui racontait des "
    "histoires aux enfants chaque soir, pendant que le soleil se couchait sur l'océan.",
    "Die Hauptstadt von Deutschland ist Berlin. Die Stadt hat etwa 3,7 Millionen Einwohner und ist "
    "bekannt für ihre Geschichte, Kultur und das lebendige Nachtleben.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习，而无需进行明确的编程。",
    '{"name": "Ada Lovelace", "born": 1815, "known_for": ["Analytical Engine", "first algorithm"], '
    '"nationality": "British"}',
    "SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2024-01-01' "
    "GROUP BY customer_id HAVING SUM(amount) > 100 ORDER BY total DESC;",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin spent about two and a "
    "quarter hours outside the lunar module, while Michael Collins orbited above in Columbia.",
    "To make a simple tomato sauce, soften chopped onion and garlic in olive oil, add crushed tomatoes, "
    "a pinch of salt and sugar, and simmer for twenty minutes before stirring in fresh basil.",
    "Theorem. There are infinitely many primes. Proof. Suppose p1, ..., pn were all of them; then "
    "p1 p2 ... pn + 1 is divisible by none of them, a contradiction.",
    '#include <stdio.h>\nint main(void) {\n    for (int i = 0; i < 5; i++) printf("%d\\n", i * i);\n    return 0;\n}\n',
    "The stock market closed higher on Friday as technology shares rallied, while bond yields fell "
    "after the central bank signalled it would keep interest rates unchanged.",
)


def _find_license() -> str | None:
    candidates = [Path(__file__).resolve().parents[2] / "LICENSE"]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("torus-sparse")
        for f in dist.files or ():
            if f.name.upper().startswith(("LICENSE", "COPYING")):
                candidates.append(Path(str(dist.locate_file(f))))
    except (ImportError, PackageNotFoundError):
        pass
    for p in candidates:
        try:
            if p.is_file():
                return p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
    return None


def default_trace_texts() -> list[str]:
    """Offline text to record routing on: a short varied built-in list, then the repository's LICENSE if found."""
    texts = list(_BUILTIN_TEXTS)
    license_text = _find_license()
    if license_text:
        texts.append(license_text)
    return texts


# --------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `train-predictor` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train-predictor",
        help="record a MoE model's routing and train an expert predictor for prefetching",
        description="Runs the model teacher-forced over offline text (built-in samples + the LICENSE, or "
        "--text-file), records which experts each MoE layer routes to, trains a small sparse-autoencoder + MLP "
        "predictor of the next layers' experts, saves it as safetensors and prints held-out recall/precision.",
    )
    p.add_argument("--model", required=True, help="MoE model directory, .gguf file or Hub id")
    p.add_argument("--out", required=True, help="where to write the predictor (a .safetensors file)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens to record routing on (default 4096)")
    p.add_argument("--horizon", type=int, default=2, help="MoE layers ahead to predict (default 2)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--dict-size", type=int, help="sparse autoencoder width (default min(4*hidden, 2048))")
    p.add_argument("--text-file", nargs="+", help="text files to record on (default: built-in samples + LICENSE)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    p.add_argument("--device", default="cpu", help="where to run the model and training (default cpu)")
    p.add_argument("--dtype", help="load the weights in this dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the predictor's initial weights and its training order (default 0)"
    )
    p.add_argument("--save-traces", help="also write the recorded traces to this .safetensors file")
    p.set_defaults(func=run_train_predictor)
    return p


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--out", args.out), ("--save-traces", args.save_traces)):
        if value is None:
            continue
        if not value.endswith(".safetensors"):
            raise ConfigError(f"{flag} must name a .safetensors file, got {value!r}")
        parent = Path(value).expanduser().parent
        if not parent.is_dir():
            raise ConfigError(f"{flag}: folder {str(parent)!r} does not exist")
    if args.horizon < 1:
        raise ConfigError(f"--horizon must be at least 1, got {args.horizon}")
    if args.tokens < 20:
        raise ConfigError(f"--tokens must be at least 20, got {args.tokens}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    if args.dict_size is not None and args.dict_size < 1:
        raise ConfigError(f"--dict-size must be at least 1, got {args.dict_size}")
    if args.window < 2:
        raise ConfigError(f"--window must be at least 2, got {args.window}")
    for f in args.text_file or ():
        if not Path(f).is_file():
            raise ConfigError(f"--text-file {f!r} does not exist")


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def report_table(report: dict) -> Any:
    """A rich Table of a `train_predictor` report's held-out figures."""
    from rich.table import Table

    ks = [key.split("@")[1] for key in next(iter(report["heldout"]["predictor"].values())) if key.startswith("recall")]
    table = Table(title=f"held-out expert prediction ({report['tokens']['heldout']} tokens)")
    table.add_column("method")
    table.add_column("layer")
    for k in ks:
        table.add_column(f"recall@{k}", justify="right")
        table.add_column(f"precision@{k}", justify="right")
    names = {"predictor": "predictor", "frequency_prior": "frequency prior", "uniform_random": "uniform random"}
    for key, label in names.items():
        for step, row in report["heldout"][key].items():
            cells = []
            for k in ks:
                cells += [f"{row[f'recall@{k}']:.3f}", f"{row[f'precision@{k}']:.3f}"]
            table.add_row(label, f"j+{step}", *cells)
    return table


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..transformers_adapter import resolve_model_source

    source, extra = resolve_model_source(args.model)
    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load the config of {args.model!r}: {exc}") from None
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not any(getattr(text_cfg, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ConfigError(
            f"{args.model!r} ({getattr(text_cfg, 'model_type', '?')}) is not a mixture-of-experts model: its config "
            f"names no experts; the expert predictor is only for MoE models"
        )
    dtype: Any = "auto"
    if args.dtype:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"--dtype {args.dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load model {args.model!r}: {exc}. Local paths and models already in the Hugging Face "
            f"cache work offline; other Hub ids need network access."
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"could not load the tokenizer of {args.model!r}: {first}") from None
    return model.to(args.device).eval(), tokenizer


def run_train_predictor(args: argparse.Namespace) -> int:
    """The `train-predictor` command; returns the exit code (2 with a one-line message on bad input)."""
    try:
        return _train_predictor_cmd(args)
    except TorusError as exc:
        print(f"torus-sparse: error: {exc}", file=sys.stderr)
        return 2


def _train_predictor_cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    _check_args(args)
    err = _stderr_console()
    hf_logging.disable_progress_bar()
    with err.status(f"loading {args.model}…"):
        model, tokenizer = _load(args)
    fp = fingerprint_of(model)
    if args.horizon > fp.num_moe_layers - 1:
        raise ConfigError(
            f"--horizon {args.horizon} reaches past the last MoE layer: the model has {fp.num_moe_layers} MoE "
            f"layers, so use at most {fp.num_moe_layers - 1}"
        )
    err.print(
        f"{fp.model_type}: {fp.num_moe_layers} MoE layers, {fp.num_experts} experts, top-{fp.top_k}, "
        f"hidden {fp.hidden_size}"
    )
    if args.text_file:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in args.text_file]
    else:
        texts = default_trace_texts()
    update, stop = progress_bar("recording routing")
    try:
        traces = record_traces(model, tokenizer, texts, args.tokens, update, window=args.window)
    finally:
        stop()
    del model
    if traces.num_tokens < 20:
        raise ConfigError(f"only {traces.num_tokens} tokens were recorded: give more text (--text-file)")
    if traces.num_tokens < args.tokens:
        err.print(f"[yellow]note:[/yellow] the texts gave only {traces.num_tokens} of the {args.tokens} tokens asked")
    if args.save_traces:
        traces.save(args.save_traces)
    update, stop = progress_bar("training")
    try:
        net, report = train_predictor(
            traces,
            fp,
            horizon=args.horizon,
            dict_size=args.dict_size,
            epochs=args.epochs,
            seed=args.seed,
            device=args.device,
            progress=update,
        )
    finally:
        stop()
    save_predictor(
        args.out,
        net,
        fp,
        args.horizon,
        {"trained_on_tokens": str(traces.num_tokens), "source_model": str(args.model)},
    )
    out = Console()
    out.print(report_table(report))
    out.print(
        f"saved {args.out} ({report['tokens']['train']} training tokens, dict {report['dict_size']}, "
        f"horizon {report['horizon']})",
        highlight=False,
    )
    return 0
