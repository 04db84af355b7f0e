"""The tiny trained models that ship inside the package (see their model cards)."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODELS_DIR = ASSETS / "models"

# name -> what it is. Both share one tokenizer, so the draft can propose tokens for the
# target in speculative decoding.
BUNDLED_MODELS: dict[str, str] = {
    "minillm-tiny": "the default model (~5.8M parameters), trained on Python source code",
    "minillm-tiny-draft": "its draft model (~1.1M parameters, same tokenizer)",
}
DEFAULT_MODEL = "minillm-tiny"
DRAFT_MODEL = "minillm-tiny-draft"


def bundled_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a bundled model (a Hugging Face layout: config, safetensors, tokenizer)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    return MODELS_DIR / name


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A bundled model's name, or a local folder."""
    if isinstance(name_or_path, str) and name_or_path in BUNDLED_MODELS:
        return bundled_model_path(name_or_path)
    return Path(name_or_path)
