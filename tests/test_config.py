"""ModelConfig: validation, presets, and the Hugging Face config.json round trip."""

import pytest
import torch

from minillm import CausalLM, ModelConfig
from minillm.config import PRESETS, SUPPORTED_ARCHITECTURES

# Parameter counts published for these models (their model cards / safetensors metadata).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "qwen3-0.6b": 596_049_920,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_equals_the_model(name):
    config = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only, no memory
        model = CausalLM(config)
    assert config.num_parameters() == model.num_parameters()
    if name in PUBLISHED:
        assert config.num_parameters() == PUBLISHED[name]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-2-7b"):
        ModelConfig.from_name("gpt-5")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_attention_heads=8, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(hidden_size=70, num_attention_heads=4), "not divisible by num_attention_heads"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(head_dim=7), "head_dim must be a positive even number"),
        (dict(rope_scaling=dict(rope_type="yarn")), "supported: default, linear, llama3"),
        (dict(architecture="GPT2LMHeadModel"), "LlamaForCausalLM"),
        (dict(layer_types=("full_attention",)), "layer_types has 1 entries for 2 layers"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    ],
)
def test_invalid_configs_say_what_is_wrong(changes, message):
    base = dict(
        vocab_size=10,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **changes})


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_dict_round_trip(name):
    config = ModelConfig.from_name(name)
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_reads_transformers_4_layout():
    """Older config.json files keep rope_theta at top level and rope_scaling with "type"."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 64,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling.rope_type == "linear" and c.rope_scaling.factor == 4.0
    assert c.num_key_value_heads == 4 and c.head_dim == 16


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "vocab_size": 1})
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)


def test_qwen2_sliding_layers_follow_max_window_layers():
    d = {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 64,
        "intermediate_size": 8,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "use_sliding_window": True,
        "sliding_window": 32,
        "max_window_layers": 2,
    }
    c = ModelConfig.from_hf_dict(d)
    assert [c.window_for_layer(i) for i in range(4)] == [None, None, 32, 32]
    assert ModelConfig.from_hf_dict({**d, "use_sliding_window": False}).sliding_window is None
