"""Model configuration: one validated dataclass for every Llama-family decoder.

Llama, Mistral, Qwen2 and Qwen3 are the same decoder (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP) with small switches: biases on the q/k/v projections (Qwen2),
an RMSNorm on each query and key head (Qwen3), a sliding attention window (Mistral),
tied input/output embeddings, and rescaled RoPE frequencies (Llama 3). `ModelConfig`
holds exactly those switches, reads and writes Hugging Face `config.json` files, and
has named presets (`ModelConfig.from_name("llama-3.2-1b")`).

The invariant that matters: `num_attention_heads % num_key_value_heads == 0`; each
key/value head serves `num_attention_heads // num_key_value_heads` query heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Hugging Face class name -> the `model_type` written into config.json.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class RopeScaling:
    """How RoPE frequencies are rescaled for long contexts.

    `linear` divides every frequency by `factor` (position interpolation). `llama3`
    (Llama 3.1+) divides only the low frequencies (wavelengths longer than
    `original_max_position_embeddings / low_freq_factor`) by `factor`, keeps the high
    frequencies, and blends smoothly in between.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if self.original_max_position_embeddings is None:
                raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"{self.high_freq_factor} and {self.low_freq_factor}"
                )


@dataclass
class ModelConfig:
    """Shapes and switches of a Llama-family decoder. Field names follow `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # the context length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q_proj, k_proj, v_proj (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3)
    sliding_window: int | None = None  # keys older than this many positions are masked
    layer_types: tuple[str, ...] | None = None  # per layer: full_attention / sliding_attention
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number (RoPE), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}): each kv head serves a whole "
                "group of query heads"
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for "
                    f"{self.num_hidden_layers} layers"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"unknown layer types {bad}; allowed: {', '.join(LAYER_TYPES)}")

    # ------------------------------------------------------------------ derived
    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def window_for_layer(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes (equals `sum(p.numel())` of the model)."""
        C, F, D = self.hidden_size, self.intermediate_size, self.head_dim
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        attn = C * H * D + 2 * C * Hkv * D + H * D * C
        attn += (H * D + 2 * Hkv * D) * self.qkv_bias + C * self.o_bias + 2 * D * self.qk_norm
        mlp = 3 * C * F + (2 * F + C) * self.mlp_bias
        per_layer = attn + mlp + 2 * C  # + two RMSNorm weights
        embed = self.vocab_size * C * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + C

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A named preset: the bundled models, or the shapes of well-known models."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    # ----------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` dictionary (transformers 4.x or 5.x layout)."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch is None:  # fall back on model_type
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(d.get("model_type", ""), d.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} in config.json; minillm supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; the SwiGLU MLP needs 'silu'")
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in d
        ]
        if missing:
            raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")

        # RoPE: transformers 5 writes `rope_parameters`, 4.x `rope_theta` + `rope_scaling`.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = dict(d.get("rope_scaling") or {}) or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        rope_scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
        )

        model_type = SUPPORTED_ARCHITECTURES[arch]
        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type in ("qwen2", "mistral") else attention_bias
        if model_type == "mistral":
            qkv_bias = False

        sliding_window = d.get("sliding_window")
        layer_types = d.get("layer_types")
        if model_type in ("qwen2", "qwen3"):
            if not d.get("use_sliding_window", False):
                sliding_window, layer_types = None, None
            elif layer_types is None:
                first = d.get("max_window_layers", d["num_hidden_layers"])
                layer_types = [
                    "sliding_attention" if i >= first else "full_attention"
                    for i in range(d["num_hidden_layers"])
                ]
        elif model_type == "mistral":
            layer_types = None  # Mistral slides on every layer when a window is set
        if layer_types is not None and sliding_window is None:
            layer_types = None

        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            architecture=arch,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dictionary that `transformers` (4.45+ and 5.x) loads."""
        model_type = SUPPORTED_ARCHITECTURES[self.architecture]
        if model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("Qwen2 has biases on q/k/v and none on o_proj")
        if model_type in ("llama", "qwen3") and self.qkv_bias != self.o_bias:
            raise ValueError(f"{self.architecture} has either all attention biases or none")
        if (model_type == "qwen3") != self.qk_norm:
            raise ValueError("per-head q/k norm exists in Qwen3 and only there")
        rs = self.rope_scaling
        rope: dict[str, Any] = {"rope_type": rs.rope_type, "rope_theta": self.rope_theta}
        if rs.rope_type != "default":
            rope["factor"] = rs.factor
        if rs.rope_type == "llama3":
            rope.update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            # Both layouts, so that transformers 4.x and 5.x read the same file.
            "rope_theta": self.rope_theta,
            "rope_scaling": None if rs.rope_type == "default" else dict(rope),
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = self.num_hidden_layers
            if self.sliding_window is not None:
                d["layer_types"] = list(
                    self.layer_types or ["sliding_attention"] * self.num_hidden_layers
                )
        return d


# Named presets. The first two are the models bundled with minillm; the others are the
# shapes of published models, used with random weights by calculators and benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "minillm-tiny": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "minillm-tiny-draft": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-2-70b": dict(
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen3-0.6b": dict(
        architecture="Qwen3ForCausalLM",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qk_norm=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}
