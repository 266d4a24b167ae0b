"""A fake model whose text encoder takes a fixed time: queues build up so autoscaling reacts.

Module-level so Serve replicas can unpickle :func:`slow_loader` (it is injected through the
``loader`` argument of ``app_for``, not patched in).
"""

from __future__ import annotations

import time
from typing import Any

from tests.platform.fakes import FakeModel, FakeProcessor, FakeTextOutput, fake_loader

ENCODE_SECONDS = 0.25


class SlowTextModel(FakeModel):
    def encode_text(self, input_ids: Any, attention_mask: Any) -> FakeTextOutput:
        time.sleep(ENCODE_SECONDS)
        return super().encode_text(input_ids, attention_mask)


def slow_loader(path: str) -> tuple[SlowTextModel, FakeProcessor]:
    fake_loader(path)  # same checkpoint check
    return SlowTextModel(), FakeProcessor()
