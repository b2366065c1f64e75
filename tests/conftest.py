"""Shared test set-up: float32 parity at the highest matmul precision, on CPU."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the whole test session, so multi-device tests are ordinary tests. XLA reads the flag
# once, when jax loads, so it is set before the import below. Added once: pytest-xdist's workers inherit the
# environment of the main process, which has run this file too.
DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(flags if DEVICES_FLAG in flags else [*flags, DEVICES_FLAG])

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, str(Path(__file__).parent))  # `import torch_ref`

DATA = Path(__file__).resolve().parent / "data"  # see data/README.md

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def assets() -> Path:
    """tests/data: real images and speech from the reference repository's `asset/` folder."""
    return DATA
