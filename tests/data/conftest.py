from __future__ import annotations

from pathlib import Path

import pytest

from reir.data.synth import SynthSummary, generate


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    """A small benchmark shared by the data tests (about two seconds to build)."""
    out: Path = tmp_path_factory.mktemp("synth")
    return generate(out, num_images=150, test_fraction=0.2, seed=7, discovery_queries=24, train_discovery_queries=8)


@pytest.fixture(scope="session")
def synth_root(synth: SynthSummary) -> Path:
    return Path(synth.out_dir)
