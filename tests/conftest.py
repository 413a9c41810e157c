"""Shared pytest fixtures for the relex_stream test suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from relex_stream.envvars import relex_test_device
from relex_stream.errors import RelexError
from tests.fixtures import Spec, Trajectory, build_trajectory

torch.set_num_threads(2)


def pytest_configure(config: pytest.Config) -> None:
    """RELEX_TEST_DEVICE must be valid, and 'cuda' needs a GPU: fail once, before any test."""
    try:
        device = relex_test_device()
    except RelexError as exc:
        raise pytest.UsageError(str(exc)) from None
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("RELEX_TEST_DEVICE=cuda but torch sees no CUDA GPU")


def pytest_report_header(config: pytest.Config) -> str:
    return f"relex_stream test device (RELEX_TEST_DEVICE): {relex_test_device()}"


@pytest.fixture
def make_traj(tmp_path: Path) -> Callable[..., Trajectory]:
    """Factory: make_traj(name='traj', **Spec fields) builds a trajectory under tmp_path."""

    def _make(name: str = "traj", **spec: object) -> Trajectory:
        return build_trajectory(tmp_path / name, Spec(**spec))

    return _make
