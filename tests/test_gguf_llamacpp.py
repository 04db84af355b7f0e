"""Opt-in: llama.cpp itself runs our GGUF exports and picks the same greedy tokens.

Run with `pytest -m llamacpp` (or MINILLM_LLAMACPP=1). The first run builds
llama-cpp-python from source (~4 minutes, portable CPU flags) into a cache folder
outside the repository, `$MINILLM_LLAMACPP_DIR` or ~/.cache/minillm/llama-cpp-python;
later runs reuse it. The default test run skips this file.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import minillm
from minillm.quant.gguf_model import export_gguf, load_gguf

pytestmark = pytest.mark.llamacpp

CACHE = Path(
    os.environ.get("MINILLM_LLAMACPP_DIR", Path.home() / ".cache/minillm/llama-cpp-python")
)
PROMPTS = ["def add(a, b):", "class Stack:\n    def __init__(self):", "import os\nimport sys\n"]
N_NEW = 32


@pytest.fixture(scope="module")
def llama_cpp(request):
    opted_in = "llamacpp" in (request.config.getoption("markexpr") or "")
    if not (opted_in or os.environ.get("MINILLM_LLAMACPP") == "1"):
        pytest.skip("opt-in: run with -m llamacpp (builds llama-cpp-python, ~4 min)")
    if not (CACHE / "llama_cpp").is_dir():
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}  # the native build crashed on Q8_0
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(CACHE),
               "llama-cpp-python", "diskcache"]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
    sys.path.insert(0, str(CACHE))
    import llama_cpp

    return llama_cpp


@pytest.mark.parametrize("ftype", ["F16", "Q8_0", "Q4_K_M"])
def test_llama_cpp_greedy_tokens_equal_minillm(llama_cpp, ftype, tmp_path):
    model, tok = minillm.load_model("minillm-tiny"), minillm.load_tokenizer("minillm-tiny")
    path = export_gguf(model, tmp_path / f"tiny-{ftype}.gguf", ftype, tokenizer=tok)
    ours = load_gguf(path)  # minillm on the very weights llama.cpp reads
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode()) == ids, "llama.cpp tokenizes the prompt differently"
        want = minillm.generate(ours, ids, N_NEW, stop_token_ids=[])
        got = []
        llm.reset()
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(token)
            if len(got) == N_NEW:
                break
        assert got == want, (ftype, prompt, got, want)
