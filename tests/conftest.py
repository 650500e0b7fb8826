"""Shared test fixtures: seeds, per-dtype tolerances, automatic skipping of GPU tests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

SEED = 20240531

# Allowed error of a fast op, relative to the max-abs of the float64 reference output.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
}


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded CPU generator for fresh, reproducible random inputs."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture
def np_rng() -> np.random.Generator:
    """A seeded numpy generator for fresh, reproducible random inputs."""
    return np.random.default_rng(SEED)


@pytest.fixture
def torch_seed() -> Iterator[int]:
    """Seeds torch's global RNG for the test and restores its state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    yield SEED
    torch.random.set_rng_state(state)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def ext():
    """The compiled module ffengine._C; skips the test where it is not built."""
    from ffengine import _ext

    module = _ext.load_extension()
    if module is None:
        pytest.skip(f"compiled extension not built: {_ext.unavailable_reason()}")
    return module


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module's tests: the tiny model gains nothing from threads,
    and spinning threads on a busy machine cost a lot (``pytestmark = usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trace_setup(tmp_path_factory, one_thread) -> dict:
    """The tiny real trace setup of ``trace_fixture`` (data, run, instance), built once per
    module on one thread."""
    from .trace_fixture import shared_setup

    return shared_setup(tmp_path_factory)
