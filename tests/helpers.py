"""Helpers shared by the tests (importable as `helpers`; pytest puts tests/ on sys.path)."""

import torch

# name -> (transformers class name, config kwargs). Small, but every switch is on
# somewhere: GQA, llama3 rope scaling, tied embeddings, all three kinds of bias, q/k
# norm, a sliding window shorter than the test sequences, an explicit head_dim.
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ARCHS = {
    "llama": (
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", dict(sliding_window=16, tie_word_embeddings=False)),
}


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """A random transformers model of `arch`, with non-trivial biases and norm weights."""
    import transformers

    cls_name, extra = ARCHS[arch]
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:  # init is 0 / 1: make them matter
                p.add_(0.1 * torch.randn_like(p))
    return model
