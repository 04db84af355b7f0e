"""The command line: generate, info, and clear one-line errors (no tracebacks)."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "minillm", *args], capture_output=True, text=True, env=ENV, cwd=cwd
    )


def test_generate_streams_text_and_reports_speed(tmp_path):
    out = run(
        "generate",
        "--prompt",
        "def add(a, b):",
        "--max-new-tokens",
        "20",
        "--seed",
        "0",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def add(a, b):")
    assert len(out.stdout) > len("def add(a, b):") + 5
    assert "tokens/s" in out.stderr and "20 tokens" in out.stderr
    assert "(1 thread)" in out.stderr  # a small model on one thread


def test_generate_threads_flag():
    out = run("generate", "import", "--max-new-tokens", "3", "--threads", "2")
    assert out.returncode == 0 and "(2 threads)" in out.stderr, out.stderr
    bad = run("generate", "import", "--threads", "0")
    assert bad.returncode != 0 and "--threads must be >= 1" in bad.stderr


def test_generate_is_reproducible_with_a_seed():
    a = run("generate", "import", "--max-new-tokens", "12", "--seed", "5")
    b = run("generate", "import", "--max-new-tokens", "12", "--seed", "5")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_greedy_matches_the_library():
    import minillm

    out = run(
        "generate",
        "class Foo:",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--model",
        "minillm-tiny-draft",
    )
    tok = minillm.load_tokenizer("minillm-tiny-draft")
    model = minillm.load_model("minillm-tiny-draft")
    ids = minillm.generate(model, tok.encode("class Foo:"), 16)
    assert out.stdout == "class Foo:" + tok.decode(ids) + "\n"


def test_info():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for word in ("minillm", "torch", "transformers", "device", "5,770,496 parameters"):
        assert word in out.stdout


def test_prompt_longer_than_the_context():
    out = run("generate", "--prompt", "x = 1\n" * 1000, "--max-new-tokens", "2")
    assert out.returncode == 2
    assert "more than the model's context of 1024" in out.stderr
    assert "Traceback" not in out.stderr


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    out = run("generate", "hi", "--model", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "BertModel" in out.stderr and "LlamaForCausalLM" in out.stderr


def test_missing_model_folder(tmp_path):
    out = run("info", "--model", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no such model folder" in out.stderr


@pytest.mark.parametrize(
    "flag, value, message", [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p")]
)
def test_bad_sampling_flags(flag, value, message):
    out = run("generate", "x", flag, value)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_no_prompt():
    out = run("generate")
    assert out.returncode == 2 and "needs a prompt" in out.stderr
