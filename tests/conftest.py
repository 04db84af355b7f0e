"""Shared fixtures: tiny random Hugging Face checkpoints of every supported architecture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import ARCHS, make_hf_model

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=list(ARCHS))
def hf_checkpoint(request, tmp_path_factory):
    """(arch, transformers model, folder) for each architecture, saved once per session."""
    arch = request.param
    model = make_hf_model(arch)
    path = tmp_path_factory.mktemp(f"hf-{arch}")
    model.save_pretrained(path)
    return arch, model, path
