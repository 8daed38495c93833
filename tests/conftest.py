"""Shared test fixtures: a headless Chromium (Debian's, driven by Playwright), one torch thread.

Markers: `slow` (end-to-end runs of a minute or more; `pytest -m "not slow"` is the fast
suite) and `gpu` (needs a CUDA device; skipped without one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RLHFLAB_QUIET", "1")  # no progress bars in test output
# The cores shared among pytest-xdist's workers (`-n 2`: one torch thread each), so they never
# spin more threads than there are cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium. In CI (CI=true) a missing browser is a failure, not a skip."""
    path = _chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave things for a person to look at (screenshots)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: tiny models gain nothing from two, and on a shared
    2-core machine OpenMP's spinning threads made a 0.5 s PPO run take 7-15 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
