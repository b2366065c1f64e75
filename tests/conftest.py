"""Shared test set-up: float32 parity at the highest matmul precision, on CPU."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, str(Path(__file__).parent))  # `import torch_ref`

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def assets() -> Path:
    """../shared/assets: real images and speech from the reference repository."""
    assert ASSETS.is_dir(), f"shared assets not found at {ASSETS}"
    return ASSETS
