"""The searcher's answer crosses a Ray hop by column (``Candidates.__reduce__``): every field of
every hit, the scores and the timings come back as they went, except the re-ranked rows'
vectors, which stay in the searcher (the answer reads boxes and scores)."""

from __future__ import annotations

import pickle

import numpy as np

from reir.platform.store import HIT_FIELDS, Hit
from reir.serving.pipeline import Candidates


def _hit(i: int, *, embedding: bool) -> Hit:
    return Hit(pk=f"v1:img{i // 3}:{i % 3}", image_id=f"img{i // 3}", uri=f"/g/img{i // 3}.jpg",
               box=(1.0 * i, 2.0, 3.0, 4.5), score=0.1 * i, instance_score=0.9 - 0.01 * i, model_version="v1",
               embedding=np.full(4, i, dtype=np.float32) if embedding else None,
               image_size=(64.0, 48.0) if i % 2 else None, n_instances=3, row=i if i % 2 else -1)  # fmt: skip


def _fields(hit: Hit) -> dict[str, object]:
    return {name: getattr(hit, name) for name in HIT_FIELDS}


def test_candidates_cross_a_pickle_boundary_field_for_field() -> None:
    hits = [_hit(i, embedding=False) for i in range(7)]
    scored = [(_hit(i, embedding=i % 2 == 0), 0.5 + 0.01 * i) for i in range(10, 16)]  # context rows carry vectors
    sent = pickle.dumps(Candidates(hits, scored, {"ann": 0.002}), protocol=5)
    back = pickle.loads(sent)
    assert isinstance(back, Candidates) and all(isinstance(h, Hit) for h in back.hits)
    assert [_fields(h) for h in back.hits] == [_fields(h) for h in hits]
    assert back.scored is not None and [p for _, p in back.scored] == [p for _, p in scored]
    for (got, _), (row, _) in zip(back.scored, scored, strict=True):
        assert got.embedding is None
        assert _fields(got) == {**_fields(row), "embedding": None}
    assert scored[0][0].embedding is not None  # the searcher's own rows keep theirs
    assert np.full(4, 10, dtype=np.float32).tobytes() not in sent
    assert back.timings_s == {"ann": 0.002}
    # Frozen and comparable as before.
    assert back.hits[0] == hits[0] and hash(back.hits[0]) == hash(hits[0])
    unranked = pickle.loads(pickle.dumps(Candidates(hits)))
    assert unranked.scored is None and unranked.hits == hits
