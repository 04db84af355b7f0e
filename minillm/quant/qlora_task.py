"""A small fine-tuning task for a Python-code model: write `__repr__` in a house style.

Every example is a class with 1-3 fields set in `__init__`, and the model must complete

    def __repr__(self):
        return f"Point(x={self.x!r}, y={self.y!r})"

a style the standard library (the bundled model's training data) rarely uses. It needs
copying (the class and field names from the prompt) and a fixed format. The metric is
exact match of the greedy completion's line on held-out examples whose class names and
field names never appear in training: a model that only memorized the training
examples scores 0. The loss is computed on the completion tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minillm.generate import generate
from minillm.model import CausalLM

TRAIN_CLASSES = ["Point", "Node", "Config", "Record", "Item", "Entry", "Vector", "Task",
                 "Event", "Job", "Token", "Frame", "Layer", "Batch", "Span", "Cell", "Edge",
                 "Rule", "Step", "Order", "Account", "Message", "Packet", "Query", "Book",
                 "Album", "Window", "Button", "Client", "Server", "Request", "Response",
                 "Worker", "Stream", "Buffer", "Matrix", "Graph", "Tree", "Queue", "Cache",
                 "Profile", "Report", "Sample", "Signal", "Shape", "Tile", "Unit",
                 "Wallet"]  # fmt: skip
TRAIN_FIELDS = ["name", "size", "value", "path", "count", "items", "key", "data", "mode",
                "parent", "index", "label", "color", "width", "height", "owner", "level",
                "kind", "title", "user", "start", "end", "text", "score", "age", "email",
                "rows", "cols", "depth", "limit", "offset", "total", "status", "code",
                "source", "target", "origin", "length", "format", "version", "tags", "url",
                "left", "right", "top", "bottom", "timeout", "retries", "channel",
                "message"]  # fmt: skip
HELDOUT_CLASSES = ["Circle", "Invoice", "Sensor", "Ticket", "Module", "Route", "Image", "Player"]
HELDOUT_FIELDS = ["radius", "amount", "price", "port", "host", "weight", "speed", "state"]


@dataclass
class ReprExample:
    prompt: str
    target: str  # the completion, ending with a newline


def make_example(rng: np.random.Generator, classes: list[str], fields: list[str]) -> ReprExample:
    cls = str(rng.choice(classes))
    names = [str(f) for f in rng.choice(fields, size=int(rng.integers(1, 4)), replace=False)]
    if rng.random() < 0.3:  # compound identifiers too: copying, not memorizing, is the task
        i = int(rng.integers(len(names)))
        names[i] = f"{names[i]}_{rng.choice([f for f in fields if f not in names])}"
    if rng.random() < 0.3:
        cls += str(rng.choice(classes))
    init = "".join(f"        self.{f} = {f}\n" for f in names)
    prompt = (
        f"class {cls}:\n    def __init__(self, {', '.join(names)}):\n{init}\n"
        "    def __repr__(self):\n        return"
    )
    body = ", ".join(f"{f}={{self.{f}!r}}" for f in names)
    return ReprExample(prompt, f' f"{cls}({body})"\n')


def make_split(split: str, n: int, seed: int = 0) -> list[ReprExample]:
    """'train' draws from the training names; 'heldout' from names never trained on."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, split == "heldout"])
    names = (TRAIN_CLASSES, TRAIN_FIELDS) if split == "train" else (HELDOUT_CLASSES, HELDOUT_FIELDS)
    return [make_example(rng, *names) for _ in range(n)]


def encode_batch(tokenizer, examples: list[ReprExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), loss mask (B, T)): prompt + target, right-padded; the mask marks the
    target tokens (the positions whose prediction is trained)."""
    rows, masks = [], []
    for ex in examples:
        p = tokenizer.encode(ex.prompt)
        t = tokenizer.encode(ex.target, add_special_tokens=False)
        rows.append(p + t)
        masks.append([0] * len(p) + [1] * len(t))
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # pad with token 0 (never trained on)
    mask = torch.zeros(len(rows), T)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)], mask[i, : len(m)] = torch.tensor(r), torch.tensor(m, dtype=torch.float)
    return ids, mask


def completion_loss(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the target tokens given everything before them."""
    logits = model(ids[:, :-1])  # (B, T-1, V)
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    weights = mask[:, 1:]
    return (nll * weights).sum() / weights.sum()


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text holds a newline: generation stops at the end of the line."""
    return [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])]


@torch.no_grad()
def repr_accuracy(model: CausalLM, tokenizer, examples: list[ReprExample], max_new: int = 64):
    """Fraction of examples whose greedy completion, up to its first newline, is exact."""
    hits, stops = 0, newline_token_ids(tokenizer)
    for ex in examples:
        ids = tokenizer.encode(ex.prompt)
        out = tokenizer.decode(generate(model, ids, max_new, stop_token_ids=stops))
        hits += out.split("\n")[0] == ex.target.rstrip("\n")
    return hits / len(examples)


def train_adapters(
    model: CausalLM,
    tokenizer,
    params: list[torch.nn.Parameter],
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW on the adapters with a cosine schedule; returns the loss of every step."""
    train = make_split("train", steps * batch_size, seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    model.train()
    losses = []
    for step in tqdm(range(steps), disable=not progress, desc="QLoRA"):
        ids, mask = encode_batch(tokenizer, train[step * batch_size : (step + 1) * batch_size])
        loss = completion_loss(model, ids.to(model.device), mask.to(model.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    return losses
