"""Shared pytest fixtures for the relex_stream test suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.fixtures import Spec, Trajectory, build_trajectory

torch.set_num_threads(2)


@pytest.fixture
def make_traj(tmp_path: Path) -> Callable[..., Trajectory]:
    """Factory: make_traj(name='traj', **Spec fields) builds a trajectory under tmp_path."""

    def _make(name: str = "traj", **spec: object) -> Trajectory:
        return build_trajectory(tmp_path / name, Spec(**spec))

    return _make
