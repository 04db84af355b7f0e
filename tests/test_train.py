"""Training from scratch, on a small corpus: the loss falls, runs are reproducible, and
the output folder is a complete model (weights, tokenizer, card, loss curve)."""

import contextlib
import hashlib
import json

import pytest

import minillm
from minillm.data import EOT, build_corpus, read_documents, split_of
from minillm.train import TrainConfig, train


def name_in_split(split: str, stem: str) -> str:
    """A file name (found by search) that the hash split assigns to `split`."""
    for i in range(10_000):
        name = f"{stem}_{i}.py"
        if split_of(name) == split:
            return name
    raise AssertionError("no name found")


def fake_stdlib(root, n_train=12):
    body = "def f{i}(x):\n    '''Return x plus {i}.'''\n    return x + {i}\n\n" * 20
    names = [name_in_split("train", f"mod{k}") for k in range(n_train)]
    names += [name_in_split("val", "val"), name_in_split("heldout", "held")]
    for k, name in enumerate(names):
        (root / name).write_text(body.format(i=k))
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "skipped.py").write_text("x = 1\n")
    (root / name_in_split("train", "latin")).write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    return names


def test_corpus_split_and_manifest(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    names = fake_stdlib(root)
    m = build_corpus(tmp_path / "corpus", root=root)
    assert m["documents"] == {"train": len(names) - 2, "val": 1, "heldout": 1}
    assert {f["path"] for f in m["files"]} == set(names)  # no pycache, no non-UTF-8 file
    docs = read_documents(tmp_path / "corpus" / "heldout.txt")
    assert len(docs) == 1 and EOT not in docs[0]
    got = hashlib.sha256((tmp_path / "corpus" / "train.txt").read_bytes()).hexdigest()
    assert m["sha256"]["train"] == got


def test_real_stdlib_split_is_stable():
    """The split of the bundled models' held-out files does not change between versions."""
    manifest = json.loads(
        __import__("gzip").decompress(
            (minillm.bundled.ASSETS / "data" / "corpus_manifest.json.gz").read_bytes()
        )
    )
    for f in manifest["files"]:
        assert split_of(f["path"]) == f["split"]


MICRO = minillm.ModelConfig(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    (tmp / "lib").mkdir()
    fake_stdlib(tmp / "lib")
    build_corpus(tmp / "corpus", root=tmp / "lib")
    return tmp / "corpus"


def run_training(corpus, out):
    cfg = TrainConfig(
        steps=40,
        batch_size=8,
        seq_len=32,
        lr=1e-2,
        warmup_steps=5,
        eval_every=10,
        eval_tokens=2000,
        vocab_size=300,
        device="cpu",
    )
    return train(cfg, corpus, out, progress=False, model_config=MICRO)


def test_training_learns_and_writes_a_complete_model(corpus, tmp_path):
    card = run_training(corpus, tmp_path / "a")
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["val_loss"][-1] < log["val_loss"][0] - 1.0
    assert card["heldout_perplexity"] < card["unigram_perplexity"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "README.md"):
        assert (tmp_path / "a" / f).exists(), f
    model = minillm.load_model(tmp_path / "a")
    assert model.num_parameters() == card["parameters"]
    tok = minillm.load_tokenizer(tmp_path / "a")
    assert tok.vocab_size == model.config.vocab_size <= 300


def test_training_is_reproducible(corpus, tmp_path):
    run_training(corpus, tmp_path / "a")
    run_training(corpus, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "train_log.json").read_text())
    b = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert a == b
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(steps=0), "steps"), (dict(lr=0), "lr"), (dict(seq_len=1), "seq_len")],
)
def test_train_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_seq_len_beyond_context(corpus, tmp_path):
    cfg = TrainConfig(steps=1, seq_len=64, device="cpu", vocab_size=300)
    with pytest.raises(ValueError, match="exceeds the context"):
        train(cfg, corpus, tmp_path / "x", progress=False, model_config=MICRO)


def distill_config(**kw):
    base = dict(steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5, eval_every=10,
                eval_tokens=2000, vocab_size=300, device="cpu")  # fmt: skip
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    run_training(corpus, out)
    return out


def test_distillation_pulls_the_student_to_the_teacher(corpus, teacher, tmp_path):
    """A one-layer student distilled from the two-layer teacher (distill=1: the teacher's
    distributions are the only signal) ends much closer to it in KL than it started, and its
    card reports its greedy agreement with the teacher, as measured here."""
    import numpy as np
    import torch

    from minillm.data import load_tokens
    from minillm.train import distill_loss, greedy_agreement

    small = MICRO.replace(num_hidden_layers=1)
    card = train(distill_config(teacher=str(teacher), distill=1.0), corpus, tmp_path / "s",
                 tokenizer_dir=teacher, progress=False, model_config=small)  # fmt: skip
    student, t = minillm.load_model(tmp_path / "s"), minillm.load_model(teacher)
    torch.manual_seed(0)
    fresh = minillm.CausalLM(student.config)
    tok = minillm.load_tokenizer(teacher)
    held = load_tokens(corpus, "heldout", tok)
    x = torch.as_tensor(held[: 4 * 32].astype(np.int64)).view(4, 32)
    with torch.no_grad():
        before = float(distill_loss(fresh(x), t, x, contextlib.nullcontext))
        after = float(distill_loss(student(x), t, x, contextlib.nullcontext))
    assert after < 0.5 * before
    assert card["teacher_agreement"] == pytest.approx(
        greedy_agreement(student, t, held, 32, 65536), abs=1e-9
    )
    assert 0 < card["teacher_agreement"] <= 1
    assert "distilled from" in (tmp_path / "s" / "README.md").read_text()


def test_init_starts_from_the_given_weights(corpus, teacher, tmp_path):
    """Initialized from the teacher and trained with a vanishing learning rate, the student
    is the teacher: it agrees on every greedy token."""
    cfg = distill_config(teacher=str(teacher), distill=0.5, init=str(teacher), steps=2, lr=1e-9,
                         warmup_steps=0)  # fmt: skip
    card = train(cfg, corpus, tmp_path / "s", tokenizer_dir=teacher, progress=False,
                 model_config=MICRO)  # fmt: skip
    assert card["teacher_agreement"] > 0.99
    with pytest.raises(ValueError, match="another shape"):
        train(distill_config(init=str(teacher), steps=1), corpus, tmp_path / "x",
              tokenizer_dir=teacher, progress=False,
              model_config=MICRO.replace(num_hidden_layers=1))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(distill=0.5), "needs a teacher"), (dict(distill=1.5, teacher="t"), r"\[0, 1\]")],
)
def test_distill_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
