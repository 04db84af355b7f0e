"""The `minillm` command (also `python -m minillm`).

minillm generate --prompt "def fib(n):"     stream a completion from the bundled model
minillm bench [--smoke]                      the engine benchmarks (JSON + plots)
minillm info                                 versions, device, and the model's shape
minillm corpus --out build/corpus            build the training corpus (Python stdlib)
minillm tokenizer --out build/tokenizer      train a BPE tokenizer on the corpus
minillm train --preset minillm-tiny --out DIR    train a model from scratch
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

import torch

from minillm.bundled import BUNDLED_MODELS, DEFAULT_MODEL, resolve_model_path
from minillm.config import PRESETS


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMALL_MODEL = 100_000_000  # parameters: below this, `generate` runs on one CPU thread


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cmd_generate(args: argparse.Namespace) -> int:
    from minillm.engine import LLM, SamplingParams
    from minillm.loading import load_model

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    model = load_model(args.model, dtype=dtype, device=device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        # A small model's ops take microseconds: a second thread only adds synchronization,
        # and on a busy machine each op waits for a descheduled thread (10-100x slower).
        torch.set_num_threads(1)
    context = model.config.max_position_embeddings
    from minillm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    if len(prompt_ids) >= context:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens, more than the model's context of {context} "
            "allows (it must leave room for one new token)"
        )
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = min(128, context - len(prompt_ids))
    params = SamplingParams(  # checks the flags: a clear error for each bad one
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        max_tokens=max_new,
    )  # fmt: skip
    spec = {}
    if args.draft_model:
        spec = dict(
            draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens
        )
    llm = LLM(model, tokenizer, device=device, dtype=dtype, max_num_seqs=1, **spec)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    n = 0
    t0 = time.perf_counter()
    for delta in llm.stream(prompt_ids, params):
        n += len(delta.token_ids)
        out.write(delta.text)
        out.flush()
    out.write("\n")
    out.flush()
    seconds = time.perf_counter() - t0
    how = "engine: paged KV" + (", CUDA graphs" if llm.engine.runner.graphs else "")
    n_threads = torch.get_num_threads()
    threads = f" ({n_threads} thread{'s' * (n_threads > 1)})" if device.type == "cpu" else ""
    if llm.engine.spec is not None:
        s = llm.engine.spec
        how += (
            f", speculative k={s.k}: {1 + s.num_accepted / max(1, s.num_rounds):.2f} tokens/round"
        )
    print(
        f"[{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s; prompt "
        f"{len(prompt_ids)} tokens; {args.model} on {device}{threads}, {how}]",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    from tqdm.auto import tqdm

    names = args.names or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark {unknown}; available: {', '.join(BENCHMARKS)}")
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:  # benchmarks/ lives beside the package, in a checkout
        sys.path.insert(0, str(root))
    for name in tqdm(names, desc="benchmarks", unit="bench"):
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ImportError as e:
            raise ValueError(f"benchmarks.{name} needs a source checkout of minillm: {e}") from None
        argv = ["--smoke"] if args.smoke else []
        if args.device and name in DEVICE_BENCHMARKS:
            argv += ["--device", args.device]
        if args.out:
            argv += ["--out", str(args.out)]
        path = module.main(argv)
        tqdm.write(f"{name}: {path}")
    return 0


# `minillm bench` runs these (`python -m benchmarks.<name>` runs one).
BENCHMARKS = {
    "engine_decode": "batch-1 decode tokens/s vs the bandwidth roofline; HF generate (GPU)",
    "engine_decode_profile": "batch-1 decode: each kernel's time per token (GPU)",
    "engine_throughput": "256 mixed requests: continuous vs static batching vs HF generate",
    "engine_chunked": "time between tokens with and without chunked prefill",
    "engine_speculative": "speculative decoding speed-up with the bundled pair (CPU or GPU)",
    "engine_host_cost": "the engine's host work per decode step and speculative round",
}
DEVICE_BENCHMARKS = ("engine_throughput", "engine_speculative", "engine_host_cost")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    from minillm import __version__
    from minillm.loading import load_config

    print(f"minillm {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "triton", "numpy"):
        print(f"{pkg} {_version(pkg)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print(f"device cpu ({torch.get_num_threads()} threads; no CUDA GPU)")
    config = load_config(args.model)
    print(f"model {args.model} ({resolve_model_path(args.model)})")
    print(f"  architecture {config.architecture}, {config.num_parameters():,} parameters")
    print(
        f"  {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads x {config.head_dim} "
        f"({config.num_key_value_heads} kv heads), MLP {config.intermediate_size}, "
        f"vocab {config.vocab_size}, context {config.max_position_embeddings}"
    )
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from minillm.data import build_corpus

    m = build_corpus(args.out)
    print(f"corpus in {args.out}: documents {m['documents']}, characters {m['chars']}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from minillm.data import read_documents
    from minillm.train import train_tokenizer

    tok = train_tokenizer(read_documents(Path(args.data) / "train.txt"), args.vocab_size, args.out)
    print(f"tokenizer in {args.out}: {tok.vocab_size} tokens")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from minillm.data import build_corpus
    from minillm.train import TrainConfig, train

    cfg = TrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
        teacher=args.teacher,
        distill=args.distill,
        init=args.init,
    )
    data = Path(args.data)
    if not data.exists():
        print(f"building the corpus in {data} from this Python's standard library")
        build_corpus(data)
    card = train(cfg, data, args.out, tokenizer_dir=args.tokenizer)
    print(
        f"saved {args.out}: held-out perplexity {card['heldout_perplexity']:.3f} "
        f"(unigram {card['unigram_perplexity']:.1f}), loss curve {Path(args.out) / 'loss.png'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"a bundled model ({', '.join(BUNDLED_MODELS)}) or a local Hugging Face folder"

    g = sub.add_parser("generate", help="stream a completion of a prompt")
    g.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the prompt (or --prompt)")
    g.add_argument("--prompt", default=None)
    g.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: 128")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    g.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1...")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    g.add_argument("--draft-model", default=None, help="speculative decoding with this draft")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens (4)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 below 100M parameters, else torch's)")  # fmt: skip
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="run the engine benchmarks (JSON + plots)")
    b.add_argument("names", nargs="*", help=f"default: all of {', '.join(BENCHMARKS)}")
    b.add_argument("--smoke", action="store_true", help="seconds-long runs on tiny models")
    b.add_argument("--device", default=None, choices=["cpu", "cuda"])
    b.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, device and model shape")
    i.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("corpus", help="build the training corpus from the Python stdlib")
    c.add_argument("--out", default="build/corpus")
    c.set_defaults(func=cmd_corpus)

    k = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the corpus")
    k.add_argument("--data", default="build/corpus")
    k.add_argument("--out", required=True)
    k.add_argument("--vocab-size", type=int, default=4096)
    k.set_defaults(func=cmd_tokenizer)

    t = sub.add_parser("train", help="train a model from scratch on the corpus")
    t.add_argument("--preset", default="minillm-tiny", choices=list(PRESETS))
    t.add_argument("--out", required=True, help="output model folder")
    t.add_argument("--data", default="build/corpus", help="corpus folder (built if missing)")
    t.add_argument("--tokenizer", default=None, help="reuse this tokenizer (default: train one)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--teacher", default=None, help="distill from this model (same tokenizer)")
    t.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of KL(teacher || student) in the loss, 0..1 (needs --teacher)",
    )
    t.add_argument("--init", default=None, help="start from this model's weights (same shape)")
    t.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.prompt is None:
            args.prompt = args.prompt_arg
        if args.prompt is None:
            parser.error("generate needs a prompt: minillm generate --prompt 'def fib(n):'")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Errors about the user's input: say what is wrong, no traceback
        # (set MINILLM_TRACEBACK=1 to see one).
        if os.environ.get("MINILLM_TRACEBACK"):
            raise
        print(f"minillm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
