"""Speculative decoding with the bundled pair: speed-up at temperature 0, identical tokens.

minillm-tiny (5.8M parameters, 6 layers) is the target and minillm-tiny-draft (1.1M, 3
layers) the draft. Eight held-out code prompts (64 tokens) are completed one after the
other (batch 1) with 128 greedy tokens, first by the target alone, then with k draft
tokens per round for several k. A round costs k draft steps and one target step over k + 1
positions and yields 1 + (accepted) tokens, so the speed-up is about

    tokens per round / (1 + k * c),   c = cost of a draft step / cost of a target step.

Where c is small, speculation pays: the draft must be cheap relative to the target.
On a GPU both tiny models are launch-bound and a step costs about the engine's own
per-step host work (`benchmarks.engine_host_cost` measures it): the draft's k steps replay
its CUDA graph back to back, the target's verification reads the guesses on the device,
and the round waits once; a second run of the best k with the round that waits twice (for
the drafts, then for the verification) shows what that is worth. On a CPU a step costs
about its number of layers' worth of small ops, so c is about 3/6 and the gain is small.
Reported: tokens/s, speed-up, mean tokens per round and acceptance rate for each k, and
whether every token equals the target's.

    python -m benchmarks.engine_speculative                 # GPU if present, else CPU
    python -m benchmarks.engine_speculative --device cpu
    python -m benchmarks.engine_speculative --smoke         # seconds
    python -m benchmarks.engine_speculative --draft DIR --tag _kd   # another draft
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.engine_common import free_memory, sync
from minillm.bench import save_result
from minillm.data import shipped_heldout_documents
from minillm.engine import LLM, SamplingParams
from minillm.tokenizer import load_tokenizer

SETTINGS = {
    "cuda": dict(prompts=8, prompt_len=64, new=128, ks=[2, 3, 4, 5, 6]),
    "cpu": dict(prompts=6, prompt_len=64, new=96, ks=[2, 3, 4, 5]),
    "smoke": dict(prompts=2, prompt_len=16, new=12, ks=[2]),
}


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8))  # warm-up
    sync()
    t0 = time.perf_counter()
    outs = [llm.generate([p], params)[0] for p in prompts]  # one request at a time
    sync()
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - t0


def run(
    device: str,
    smoke: bool,
    out_dir: Path | None,
    progress=print,
    draft: str = "minillm-tiny-draft",
    tag: str = "",
) -> Path:
    s = SETTINGS["smoke" if smoke else device]
    tok = load_tokenizer("minillm-tiny")
    prompts = [
        tok.encode(d)[: s["prompt_len"]] for d in shipped_heldout_documents()[: s["prompts"]]
    ]
    params = SamplingParams(temperature=0, max_tokens=s["new"], ignore_eos=True)
    common = dict(device=device, dtype=torch.float32, fuse=True, max_num_seqs=1, max_model_len=512,
                  enable_prefix_caching=False)  # fmt: skip
    base = LLM("minillm-tiny", **common)
    ref, seconds = timed(base, prompts, params)
    tokens = sum(len(t) for t in ref)
    rows = [dict(k=0, seconds=seconds, tokens_per_s=tokens / seconds, speedup=1.0)]
    progress(f"target alone     {tokens / seconds:8.1f} tok/s")
    base = None
    free_memory()

    def measure(k: int, device_rounds: bool = True) -> dict:
        llm = LLM("minillm-tiny", draft_model=draft, num_speculative_tokens=k,
                  **common)  # fmt: skip
        llm.engine.spec.device_rounds = device_rounds
        got, t = timed(llm, prompts, params)
        sp = llm.engine.spec
        row = dict(k=k, seconds=t, tokens_per_s=tokens / t, speedup=seconds / t,
                   tokens_per_round=1 + sp.num_accepted / max(1, sp.num_rounds),
                   acceptance_rate=sp.num_accepted / max(1, sp.num_drafted),
                   identical_tokens=got == ref,
                   device_rounds=sp.num_device_rounds / max(1, sp.num_rounds))  # fmt: skip
        progress(
            f"k={k}{'' if device_rounds else ' two waits'}  {row['tokens_per_s']:8.1f} tok/s  "
            f"x{row['speedup']:.2f}  {row['tokens_per_round']:.2f} tokens/round  "
            f"identical {row['identical_tokens']}"
        )
        free_memory()
        return row

    rows += [measure(k) for k in s["ks"]]
    best = max(rows[1:], key=lambda r: r["speedup"])
    # On a GPU, the greedy rounds wait once (`SpeculativeDecoder._round_on_device`); the
    # same best k with the round that waits twice shows what that is worth.
    two_waits = measure(best["k"], device_rounds=False) if device == "cuda" else None
    headline = dict(best_k=best["k"], speedup=best["speedup"],
                    tokens_per_round=best["tokens_per_round"],
                    identical_tokens=all(r["identical_tokens"] for r in rows[1:]),
                    target_speedup=1.8, met=best["speedup"] >= 1.8,
                    two_waits_speedup=two_waits and two_waits["speedup"])  # fmt: skip
    data = dict(device_kind=device, target="minillm-tiny", draft=str(draft),
                settings=s, headline=headline, rows=rows, two_waits=two_waits)  # fmt: skip
    name = f"engine_speculative_{device}{tag}" + ("_smoke" if smoke else "")
    return save_result(name, data, plot(rows, device), out_dir)


def plot(rows: list[dict], device: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = rows[1:]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.bar([str(r["k"]) for r in rows], [r["speedup"] for r in rows], color="C0")
    ax1.axhline(1.8, color="C3", ls="--", label="target 1.8x")
    ax1.set(xlabel="draft tokens k (0: target alone)", ylabel="speed-up",
            title=f"speculative decoding, T=0 ({device})")  # fmt: skip
    ax1.legend(fontsize=8)
    ax2.plot([r["k"] for r in spec], [r["tokens_per_round"] for r in spec], "o-",
             label="tokens per round")  # fmt: skip
    ax2.plot([r["k"] for r in spec], [1 + r["k"] for r in spec], "--", color="gray",
             label="k + 1 (all accepted)")  # fmt: skip
    ax2.set(xlabel="k", ylabel="tokens per target step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU run")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--draft",
        default="minillm-tiny-draft",
        help="the draft model: a name or a folder (default: the bundled one)",
    )
    parser.add_argument("--tag", default="", help="appended to the result's name")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    return run(device, args.smoke, args.out, draft=args.draft, tag=args.tag)


if __name__ == "__main__":
    main()
