"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one thread is as fast and does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# No test reaches the network by accident: the backbones' first-use download (engine/weights.py) is off
# unless a test turns it on (tests/test_weights.py serves files from a loopback server).
os.environ.setdefault("PATCHCORE_OFFLINE", "1")
