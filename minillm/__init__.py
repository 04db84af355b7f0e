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

from minillm.bundled import BUNDLED_MODELS, bundled_model_path
from minillm.config import ModelConfig
from minillm.generate import CompletionOutput, generate, generate_cached, generate_stream
from minillm.loading import CheckpointError, load_config, load_model, save_model
from minillm.model import CausalLM
from minillm.sampling_params import SamplingParams
from minillm.tokenizer import Tokenizer, load_tokenizer

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
