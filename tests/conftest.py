"""Test setup: 8 host devices for the multi-device tests, poisoned kernel outputs, shared helpers."""
import os

# All must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# On a GPU, `pytest -n 8` runs 8 processes on one device: each allocates as it goes instead of
# reserving most of the memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Native handlers fill their outputs with NaN before computing, so unwritten elements show.
os.environ.setdefault("JAX_NATTEN_POISON_OUTPUTS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
