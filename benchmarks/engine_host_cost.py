"""The engine's own cost per decode step, without the model: what a GPU step pays on the host.

A decode step of the bundled 5.8M-parameter target is short on a GPU (its CUDA graph runs
~70 small kernels), so the host work around it weighs as much: scheduling, building and
uploading the graph's inputs, the replay call, waiting for the argmax, appending tokens.
Speculative decoding multiplies that work: a round replays the draft's graph k times and
the target's once, verifies, and commits the accepted K/V. If a round's host work costs
r plain steps, a round must yield more than r tokens before speculation can pay at all.

This benchmark isolates that work. Every decode step goes through the decode graphs' code
path (`CUDAGraphs`, run without capture), with the model's forward replaced by a stub
that returns fixed logits: the draft always guesses the token the target then picks, so
every round accepts all k drafts. What is timed is everything else, per engine step:

    plain       one greedy decode step of the target alone
    round       a speculative round (k draft replays + one verification), as the engine
                runs it: drafts and verification on the device, one wait for both
    two waits   the same round waiting for the drafts, then for the verification

Reported: microseconds per step (median over interleaved repetitions), per emitted token,
and per step relative to a plain step. On a CPU the "device" is the CPU itself, so the waits
cost nothing and the difference between the two rounds is their other work (the second
round also runs a separate step for the token the draft catches up on after a fully accepted
round); on a GPU the first round also overlaps building the verification with the drafts.

    python -m benchmarks.engine_host_cost                  # CPU (default)
    python -m benchmarks.engine_host_cost --device cuda    # the same on a GPU's host
    python -m benchmarks.engine_host_cost --smoke          # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from minillm.bench import save_result
from minillm.engine import LLM, SamplingParams
from minillm.engine.cuda_graphs import MAX_STEPS

SETTINGS = {
    "full": dict(new=400, repeats=7, ks=[2, 3, 5]),
    "smoke": dict(new=24, repeats=2, ks=[2]),
}
TOKEN = 5  # the token every stubbed forward picks


def stub_forward(graphs) -> None:
    """Replace `graphs`' forward with fixed logits (argmax TOKEN) and the same bookkeeping
    of the greedy tokens `run_steps` returns; the rest of the decode path is unchanged."""
    n, V = graphs.sizes[-1], graphs.model.config.vocab_size
    dev = graphs.meta.device
    logits = torch.zeros(n, V, device=dev, dtype=graphs.model.dtype)
    logits[:, TOKEN] = 1
    best = torch.full((1, n), TOKEN, device=dev, dtype=torch.int64)

    def forward(size: int) -> torch.Tensor:
        graphs.steps[:, :size].index_copy_(0, graphs.step, best[:, :size])
        graphs.step.add_(1).remainder_(MAX_STEPS)
        return logits[:size]

    graphs._forward = forward  # the instance's, not the class's


def build(k: int, device: str, device_rounds: bool = True) -> LLM:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kw = dict(device=device, dtype=dtype, fuse=True, max_num_seqs=1, max_model_len=1024,
              enable_prefix_caching=False, cuda_graphs=False)  # fmt: skip
    if k:
        kw.update(draft_model="minillm-tiny-draft", num_speculative_tokens=k)
    llm = LLM("minillm-tiny", **kw)
    llm.engine.enable_decode_graphs(capture=False)
    for runner in llm.engine.runners:
        stub_forward(runner.graphs)
    if k:
        llm.engine.spec.device_rounds = device_rounds
    return llm


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(llm: LLM, new: int, device: str) -> tuple[list[float], int]:
    """Seconds of each decode step of one request (the prefill step excluded), and the
    tokens those steps emitted."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    rid = engine.add_request(list(range(10, 26)), params)
    times, emitted = [], 0
    while engine.has_unfinished_requests():
        sync(device)
        t0 = time.perf_counter()
        outs = engine.step()
        sync(device)
        dt = time.perf_counter() - t0
        if engine.last_batch.prefills:
            emitted -= 1  # the prompt's step samples the first token
        else:
            times.append(dt)
        for o in outs:
            if o.finished and o.request_id == rid:
                emitted += len(o.outputs[0].token_ids)
    return times, emitted


def run(device: str, smoke: bool, out_dir: Path | None, progress=print) -> Path:
    s = SETTINGS["smoke" if smoke else "full"]
    variants = [("plain", 0, True)]
    for k in s["ks"]:
        variants += [(f"round k={k}", k, True), (f"two waits k={k}", k, False)]
    llms = {name: build(k, device, dr) for name, k, dr in variants}
    per_step: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    per_token: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(s["repeats"]):  # interleaved, so that a noisy machine hurts all alike
        for name, _, _ in variants:
            times, emitted = time_steps(llms[name], s["new"], device)
            per_step[name].append(statistics.median(times))
            per_token[name].append(sum(times) / emitted)
    base = statistics.median(per_step["plain"])
    rows = []
    for name, k, _ in variants:
        spec = llms[name].engine.spec
        us = statistics.median(per_step[name]) * 1e6
        row = dict(variant=name, k=k, us_per_step=us,
                   us_per_token=statistics.median(per_token[name]) * 1e6,
                   steps_vs_plain=us / (base * 1e6),
                   device_rounds=spec.num_device_rounds if spec else 0)  # fmt: skip
        rows.append(row)
        progress(f"{name:14s} {us:8.1f} us/step  {row['us_per_token']:7.1f} us/token  "
                 f"x{row['steps_vs_plain']:.2f} a plain step")  # fmt: skip
    best = min(rows[1:], key=lambda r: r["us_per_token"])
    us = {r["variant"]: r["us_per_step"] for r in rows}
    headline = dict(plain_us_per_step=base * 1e6, best=best["variant"],
                    best_us_per_token=best["us_per_token"],
                    round_vs_two_waits={f"k={k}": us[f"round k={k}"] / us[f"two waits k={k}"]
                                        for k in s["ks"]})  # fmt: skip
    data = dict(device_kind=device, target="minillm-tiny", draft="minillm-tiny-draft",
                settings=s, headline=headline, rows=rows)  # fmt: skip
    name = f"engine_host_cost_{device}" + ("_smoke" if smoke else "")
    return save_result(name, data, plot(rows, device), out_dir)


def plot(rows: list[dict], device: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["variant"] for r in rows]
    colors = ["C7" if r["k"] == 0 else ("C0" if "round" in r["variant"] else "C1") for r in rows]
    ax.bar(names, [r["us_per_step"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(i, r["us_per_step"], f"x{r['steps_vs_plain']:.1f}", ha="center", va="bottom",
                fontsize=8)  # fmt: skip
    ax.set(ylabel="host time per step (us)",
           title=f"engine host work per decode step, model stubbed out ({device})")  # fmt: skip
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    torch.set_num_threads(1)
    return run(args.device, args.smoke, args.out)


if __name__ == "__main__":
    main()
