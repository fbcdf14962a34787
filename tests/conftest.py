"""Suite-wide settings and shared fixtures: one torch thread (the models here are tiny; threads
only add overhead), and an empty offline Hugging Face cache."""

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Each test starts on one thread; commands that set --threads cannot leak into the next."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline: nothing may come from the network."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root
