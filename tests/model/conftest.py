from __future__ import annotations

import os

# Never touch the network: every tokenizer/model here is built in code or saved to tmp.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from reir.model import ReirModel, ReirProcessor, create_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> tuple[ReirModel, ReirProcessor]:
    model, processor = create_model("tiny")
    return model.eval(), processor
