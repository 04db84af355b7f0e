"""minillm: small, readable reference implementations of how LLMs are made fast.

Every concept (sampling, KV cache, quantization, parallelism, attention kernels,
the engine) is a short module that runs on a laptop CPU and uses the GPU when CUDA
is present. The modules build on one Llama-family model (`minillm.model`) that
agrees with Hugging Face `transformers`, and on two tiny trained models that ship
inside the package (`minillm-tiny` and its draft `minillm-tiny-draft`).

Shape legend used in every comment of the package:
    B batch, T tokens (query length), S keys/values length, H heads, Hkv kv heads,
    D head dim, C model dim, F MLP (intermediate) dim, V vocab, L layers.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _kernels_from_source_checkout() -> None:
    """Make `minillm.kernels` importable when minillm runs from a source checkout.

    An install maps the top-level folder `kernels/` to `minillm.kernels` (pyproject.toml).
    When Python instead finds `minillm/` directly (the repository root on sys.path, as with
    `python -m benchmarks.<name>` run from the root), there is no `minillm/kernels` folder:
    load `kernels/` under that name here, so both ways import the same modules."""
    if _importlib_util.find_spec("minillm.kernels") is not None:
        return
    init = _Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.exists():
        return
    spec = _importlib_util.spec_from_file_location(
        "minillm.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["minillm.kernels"] = module
    spec.loader.exec_module(module)


_kernels_from_source_checkout()

from minillm.bundled import BUNDLED_MODELS, bundled_model_path  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.generate import CompletionOutput, generate, generate_cached, generate_stream  # noqa: E402
from minillm.loading import CheckpointError, load_config, load_model, save_model  # noqa: E402
from minillm.model import CausalLM  # noqa: E402
from minillm.sampling_params import SamplingParams  # noqa: E402
from minillm.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BUNDLED_MODELS",
    "CausalLM",
    "CheckpointError",
    "CompletionOutput",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "__version__",
    "bundled_model_path",
    "generate",
    "generate_cached",
    "generate_stream",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_model",
]
