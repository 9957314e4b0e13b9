"""Shared test configuration.

The test suite runs offline on a 2-core CPU: hub downloads are disabled so that a missing
model fails fast with our own error instead of waiting on the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The training-script tests' tiny teachers, encoders and statistics (``train_fixtures.build_all``), built once."""
    from train_fixtures import build_all

    return build_all(tmp_path_factory.getbasetemp() / "train_assets")


@pytest.fixture(scope="module")
def script():
    """``train_scripts/train_fd_onestep.py`` loaded as a module (its ``parse_args``, ``main`` and helpers)."""
    import importlib.util

    from train_fixtures import SCRIPT

    spec = importlib.util.spec_from_file_location("train_fd_onestep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
