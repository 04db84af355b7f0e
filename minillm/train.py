"""Training a small model from scratch: tokenizer, next-token loss, AdamW, cosine schedule.

    loss = mean over positions of -log softmax(model(x))[next token]

This is how the bundled models were made (`make models` reruns it): a byte-level BPE
tokenizer is trained on the corpus (`minillm.data`), then the model is trained on random
windows of the tokenized training split, with linear warm-up then cosine decay of the
learning rate, gradient clipping, and bf16 autocast on CUDA. The checkpoint with the
lowest validation loss is kept (the validation split is separate from the held-out
split that the model card reports). Everything is seeded.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minillm.config import ModelConfig
from minillm.data import EOT, load_tokens, read_documents
from minillm.evaluate import perplexity, unigram_perplexity
from minillm.loading import load_model, save_model
from minillm.model import CausalLM
from minillm.tokenizer import Tokenizer


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with EOT as its only special token.

    EOT has id 0 and is prepended to every encoded text (it marks a document start)."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = FastTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, 0)]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": None,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Tokenizer(out)


@dataclass
class TrainConfig:
    preset: str = "minillm-tiny"
    steps: int = 2000
    batch_size: int = 64
    seq_len: int = 1024
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536
    vocab_size: int = 4096
    seed: int = 0
    device: str = "auto"
    # Distillation (a draft for speculative decoding): the loss is
    # (1 - distill) * cross-entropy + distill * KL(teacher || student) per token, so the
    # student learns the teacher's whole next-token distribution, not only the data's token.
    teacher: str | None = None  # a model name or folder, sharing the tokenizer
    distill: float = 0.0
    init: str | None = None  # start from this model's weights (same shape), not at random

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_tokens", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must lie in [0, 1], got {self.distill}")
        if self.distill > 0 and self.teacher is None:
            raise ValueError("distill > 0 needs a teacher model")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def lr_at(self, step: int) -> float:
        """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def random_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T): random windows of the stream, targets shifted by one."""
    starts = torch.randint(
        0, len(tokens) - seq_len - 1, (batch_size,), generator=generator, device=tokens.device
    )
    idx = starts[:, None] + torch.arange(seq_len + 1, device=tokens.device)  # (B, T+1)
    windows = tokens[idx]
    return windows[:, :-1], windows[:, 1:]


def distill_loss(logits: torch.Tensor, teacher: CausalLM, x: torch.Tensor, autocast):
    """Mean over tokens of KL(teacher || student) between next-token distributions."""
    with torch.no_grad(), autocast():
        target = teacher(x, check_inputs=False)
    V = logits.shape[-1]
    return F.kl_div(
        F.log_softmax(logits.float().reshape(-1, V), dim=-1),
        F.log_softmax(target.float().reshape(-1, V), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


@torch.no_grad()
def greedy_agreement(
    model: CausalLM, teacher: CausalLM, tokens: np.ndarray, seq_len: int, max_tokens: int
) -> float:
    """How often the two models' greedy next tokens agree over windows of `tokens` (the
    first `max_tokens`): a speculative draft's acceptance rate at temperature 0, per token."""
    device = next(model.parameters()).device
    t = torch.as_tensor(tokens[:max_tokens].astype(np.int64), device=device)
    n = len(t) // seq_len
    same = total = 0
    for batch in t[: n * seq_len].view(n, seq_len).split(8):
        a = model(batch, check_inputs=False).argmax(-1)
        b = teacher(batch, check_inputs=False).argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    return same / max(1, total)


@torch.no_grad()
def eval_loss(model: CausalLM, tokens: torch.Tensor, seq_len: int, autocast) -> float:
    """Mean loss over the non-overlapping windows of `tokens`."""
    model.eval()
    n = len(tokens) // (seq_len + 1)
    windows = tokens[: n * (seq_len + 1)].view(n, seq_len + 1)
    losses = []
    for batch in windows.split(16):
        with autocast():
            logits = model(batch[:, :-1], check_inputs=False)
        losses.append(F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:]).item())
    model.train()
    return float(np.mean(losses))


def plot_losses(log: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(log["train_loss"]) + 1)
    ema = np.copy(log["train_loss"])
    for i in range(1, len(ema)):  # smooth the noisy per-step loss for the eye
        ema[i] = 0.95 * ema[i - 1] + 0.05 * ema[i]
    ax.plot(steps, log["train_loss"], alpha=0.25, color="C0")
    ax.plot(steps, ema, color="C0", label="train (smoothed)")
    ax.plot(log["eval_steps"], log["val_loss"], "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    progress: bool = True,
    model_config: ModelConfig | None = None,
) -> dict:
    """Train `cfg.preset` on the corpus in `data_dir`; save the best model to `out_dir`.

    tokenizer_dir: an existing tokenizer to use (the draft shares the target's); when None a
    new one is trained on the training split and saved with the model.
    model_config: train this shape instead of the preset's (vocab and special tokens are
    still taken from the tokenizer).
    Returns the model card's data (also written to out_dir/card.json and README.md).
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    if tokenizer_dir is None:
        tokenizer = train_tokenizer(read_documents(data_dir / "train.txt"), cfg.vocab_size, out)
    else:
        tokenizer = Tokenizer(tokenizer_dir)
    model_config = (model_config or ModelConfig.from_name(cfg.preset)).replace(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"seq_len {cfg.seq_len} exceeds the context of {cfg.preset} "
            f"({model_config.max_position_embeddings})"
        )
    device = torch.device(cfg.device)
    splits = {s: load_tokens(data_dir, s, tokenizer) for s in ("train", "val", "heldout")}
    train_tokens = torch.as_tensor(splits["train"].astype(np.int64), device=device)
    val_tokens = torch.as_tensor(splits["val"][: cfg.eval_tokens].astype(np.int64), device=device)

    model = CausalLM(model_config).to(device).train()
    if cfg.init is not None:
        start = load_model(cfg.init, dtype=torch.float32, device=device)
        if start.config.to_hf_dict() != model_config.to_hf_dict():
            raise ValueError(f"init model {cfg.init!r} has another shape than {cfg.preset}")
        model.load_state_dict(start.state_dict())
        del start
    teacher = None
    if cfg.teacher is not None:
        teacher = load_model(cfg.teacher, dtype=torch.float32, device=device).eval()
        teacher.requires_grad_(False)
        if teacher.config.vocab_size != model_config.vocab_size:
            raise ValueError(
                f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the "
                f"student's ({model_config.vocab_size}): they must share a tokenizer"
            )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    log: dict = {"train_loss": [], "eval_steps": [], "val_loss": []}
    best = (float("inf"), -1, None)
    bar = tqdm(range(cfg.steps), disable=not progress, desc=f"train {cfg.preset}", mininterval=5)
    t_loop = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        x, y = random_batch(train_tokens, cfg.batch_size, cfg.seq_len, generator)
        with autocast():
            logits = model(x, check_inputs=False)  # (B, T, V)
        loss = F.cross_entropy(logits.float().transpose(1, 2), y)
        if teacher is not None and cfg.distill > 0:
            kl = distill_loss(logits, teacher, x, autocast)
            loss = (1 - cfg.distill) * loss + cfg.distill * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        log["train_loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = eval_loss(model, val_tokens, cfg.seq_len, autocast)
            log["eval_steps"].append(step + 1)
            log["val_loss"].append(val)
            if val < best[0]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (val, step + 1, state)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}")
    loop_seconds = time.time() - t_loop
    train_seconds = time.time() - t0

    model.load_state_dict(best[2])
    save_model(model, out, dtype=torch.float16, tokenizer=tokenizer)
    plot_losses(log, out / "loss.png", f"{cfg.preset}: {model.num_parameters() / 1e6:.2f}M params")
    (out / "train_log.json").write_text(json.dumps(log) + "\n")
    # The card describes the weights as shipped: reload them (fp16 -> fp32) and evaluate.
    card = {
        "name": cfg.preset,
        "parameters": model.num_parameters(),
        "config": model_config.to_hf_dict(),
        "train": asdict(cfg),
        "best_step": best[1],
        "best_val_loss": best[0],
        "tokens_seen": best[1] * cfg.batch_size * cfg.seq_len,
        "train_tokens": len(splits["train"]),
        "train_seconds": round(train_seconds, 1),
        "train_tokens_per_second": round(cfg.steps * cfg.batch_size * cfg.seq_len / loop_seconds),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    card.update(evaluate_card(out, data_dir, splits, device))
    if teacher is not None:
        shipped = load_model(out, dtype=torch.float32, device=device).eval()
        T = model_config.max_position_embeddings
        card["teacher_agreement"] = greedy_agreement(
            shipped, teacher, splits["heldout"], T, AGREEMENT_TOKENS
        )
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(render_card(card))
    return card


# Perplexity on the first CI_EVAL_TOKENS held-out tokens is cheap enough for every CI run.
CI_EVAL_TOKENS = 32768
AGREEMENT_TOKENS = 65536  # held-out tokens over which a distilled model's agreement is measured


def evaluate_card(
    model_dir: Path, data_dir: Path, splits: dict[str, np.ndarray], device: torch.device
) -> dict:
    model = load_model(model_dir, dtype=torch.float32, device=device)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    T = model.config.max_position_embeddings
    V = model.config.vocab_size
    held = splits["heldout"]
    return {
        "heldout_sha256": manifest["sha256"]["heldout"],
        "corpus_python": manifest["python"],
        "heldout_tokens": len(held),
        "eval_seq_len": T,
        "heldout_perplexity": perplexity(model, held, T),
        "unigram_perplexity": unigram_perplexity(splits["train"], held, V, T),
        "ci_eval_tokens": CI_EVAL_TOKENS,
        "ci_heldout_perplexity": perplexity(model, held, T, max_tokens=CI_EVAL_TOKENS),
        "ci_unigram_perplexity": unigram_perplexity(splits["train"], held[:CI_EVAL_TOKENS], V, T),
    }


def render_card(card: dict) -> str:
    c = card["config"]
    t = card["train"]
    distilled = ""
    if t.get("teacher"):
        distilled = (
            f"| distilled from | {t['teacher']} (loss weight {t['distill']} on KL(teacher "
            f"\\|\\| student)); greedy agreement with it {card['teacher_agreement']:.1%} of "
            f"held-out tokens |\n"
        )
    if t.get("init"):
        distilled += f"| initialized from | {t['init']} |\n"
    return f"""# {card["name"]}

A tiny Llama-architecture model trained from scratch by `minillm train` (see
`minillm/train.py`), shipped with minillm so that every demo, perplexity table and
speculative-decoding experiment has real trained weights offline.

| | |
|---|---|
| parameters | {card["parameters"]:,} (tied input/output embeddings) |
| shape | {c["num_hidden_layers"]} layers, hidden {c["hidden_size"]}, \
{c["num_attention_heads"]} heads of {c["head_dim"]} ({c["num_key_value_heads"]} kv heads), \
MLP {c["intermediate_size"]}, vocab {c["vocab_size"]}, context {c["max_position_embeddings"]} |
| weights | fp16 safetensors |
| tokens seen | {card["tokens_seen"]:,} ({card["best_step"]} steps x {t["batch_size"]} x \
{t["seq_len"]}; the training split has {card["train_tokens"]:,} tokens) |
| held-out perplexity | **{card["heldout_perplexity"]:.3f}** on {card["heldout_tokens"]:,} tokens \
(windows of {card["eval_seq_len"]}) |
| unigram baseline | {card["unigram_perplexity"]:.1f} on the same tokens |
| trained on | {card["device"]}, torch {card["torch"]}, {card["train_seconds"]} s, \
seed {t["seed"]} |
{distilled}
## Data
The `.py` files of the Python standard library (PSF license; notice in
`minillm/assets/data/LICENSE-PSF.txt`), split by a hash of each file's path into
train / validation / held-out (`minillm/data.py`). The held-out text ships as
`minillm/assets/data/heldout.txt.gz` (sha256 of the text: `{card["heldout_sha256"]}`);
the first {card["ci_eval_tokens"]:,} held-out tokens give perplexity
{card["ci_heldout_perplexity"]:.3f} (unigram {card["ci_unigram_perplexity"]:.1f}), which
the test suite recomputes.

## Training
AdamW (betas 0.9/0.95, weight decay {t["weight_decay"]}), peak learning rate {t["lr"]} with
{t["warmup_steps"]} warm-up steps and cosine decay, gradient clipping {t["grad_clip"]},
batch {t["batch_size"]} x {t["seq_len"]} tokens, {t["steps"]} steps; the checkpoint with
the best validation loss ({card["best_val_loss"]:.4f} at step {card["best_step"]}) was kept.
bf16 autocast on CUDA, fp32 otherwise. The tokenizer is a byte-level BPE of
{c["vocab_size"]} tokens trained on the training split by `minillm tokenizer`; `<|endoftext|>`
(id 0) starts every document and ends generation.

![loss curve](loss.png)

To reproduce: `make models` (corpus, tokenizer, then `minillm train --preset {card["name"]}
--steps {t["steps"]} --batch-size {t["batch_size"]} --seq-len {t["seq_len"]}`). The corpus
depends on the running Python's standard library; these weights saw Python
{card["corpus_python"]}.

## Limits
A few million parameters trained on ~10M tokens of code: it writes Python-looking text,
not correct programs. It is a teaching and testing model.
"""
