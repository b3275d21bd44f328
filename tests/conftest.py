"""Test configuration: the Triton interpreter must be on before triton/torchvision import."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastland.testing import BACKENDS, num_threads, skip_if_unavailable  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    """Each kernel backend in turn, forced for the test (``fastland.ops.forced_backend``),
    skipped where it cannot run."""
    from fastland import ops

    skip_if_unavailable(request.param)
    monkeypatch.setenv("FASTLAND_BACKEND", request.param)
    with ops.forced_backend(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs (restored after): on a shared CPU with few cores,
    2-thread OpenMP regions stall behind other processes (10-15x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with num_threads(1):
        yield
