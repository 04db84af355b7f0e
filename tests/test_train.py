"""Training from scratch, on a small corpus: the loss falls, runs are reproducible, and
the output folder is a complete model (weights, tokenizer, card, loss curve)."""

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
