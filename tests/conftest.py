"""Session fixtures shared by the test suite.

vLLM reads its environment when it is imported, so the settings are made here, before any test
module can import it: no hub access, and the engine in-process (~2 s to start instead of ~15 s;
export VLLM_ENABLE_V1_MULTIPROCESSING=1 to test the multiprocess mode instead).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

from tests.coordinatorutil import served  # noqa: F401  (a coordinator on loopback TCP)
from tests.s3server import s3_env, s3_server  # noqa: F401  (the S3 server on loopback)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "data" / "build_tiny_model.py"


def _load_builder() -> ModuleType:
    """data/ is not a package; load the build script as a module."""
    spec = importlib.util.spec_from_file_location("build_tiny_model", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a freshly built tiny random-weight Llama model (about 4 s, once per session)."""
    return _load_builder().build(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a seeded two-label classification head (LlamaForSequenceClassification):
    a generative checkpoint has no head for vLLM to load."""
    import shutil

    import torch
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-classifier") / "model"
    shutil.copytree(tiny_model, out)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model.save_pretrained(out, safe_serialization=True)
    return out
