"""Suite-wide settings: one torch thread (the models here are tiny; threads only add overhead)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Each test starts on one thread; commands that set --threads cannot leak into the next."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
