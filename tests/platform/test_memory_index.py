"""The store's in-memory exact index (reir.platform.memory_index) against milvus-lite itself:
same hits as an exhaustive (FLAT) search, filtered searches left to Milvus, alias moves and
new rows picked up, and the old path when it is off. Real milvus-lite files, generated rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from reir.platform import schema as S
from reir.platform.backend import partition_for
from reir.platform.memory_index import AnnSpec, MemoryIndex, Rows, enabled
from reir.platform.store import Hit, MilvusStore, SearchFilter

DIM = 16


def _rows(images: int, per_image: int, version: str, seed: int, prefix: str = "img") -> tuple[np.ndarray, list[dict]]:
    n = images * per_image
    vecs = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [
        S.InstanceRow(f"{prefix}{i // per_image}", f"/g/{prefix} {i // per_image}.jpg", (i, 1.5, 2.0, 3.0),
                      0.1 + (i % 7) / 10, i % per_image, version, vecs[i],
                      image_size=(640.0 + i // per_image, 480.0), n_instances=per_image).to_dict()
        for i in range(n)
    ]  # fmt: skip
    return vecs, rows


def _queries(n: int, seed: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MilvusStore]:
    """Two versions' rows (one partition each) under an exhaustive FLAT index."""
    with MilvusStore(str(tmp_path / "idx.db"), "instances", dim=DIM, upsert_batch_size=64) as s:
        s.upsert(_rows(60, 5, "v1", 0)[1] + _rows(40, 5, "v2", 1)[1])
        s.build_index("FLAT")
        s.load()
        yield s


def _same_hits(milvus: list[list[Hit]], memory: list[list[Hit]]) -> None:
    assert len(milvus) == len(memory)
    for a, b in zip(milvus, memory, strict=True):
        assert [h.pk for h in a] == [h.pk for h in b]
        for x, y in zip(a, b, strict=True):
            assert y.score == pytest.approx(x.score, abs=1e-6)
            # every other field, exactly (``row`` says which memory row answered: not the answer)
            assert {**asdict(x), "score": 0.0, "row": 0} == {**asdict(y), "score": 0.0, "row": 0}
            assert (x.image_size, x.n_instances, x.embedding) == (y.image_size, y.n_instances, None)


@pytest.mark.parametrize("version", ["v1", None])
def test_the_memory_index_answers_what_an_exhaustive_milvus_search_answers(store: MilvusStore,
                                                                           version: str | None) -> None:  # fmt: skip
    flt = SearchFilter(model_version=version) if version else None
    queries = _queries(5)
    milvus = [store.search(queries, top_n, flt) for top_n in (1, 37, 1000)]  # 1000: more than the rows
    assert store.memory_index is None
    assert store.use_memory_index("on", model_version=version, wait=True)
    status = store.memory_index.status()  # type: ignore[union-attr]
    assert (status.rows, status.partition) == ((300 if version else 500), partition_for(version) if version else None)
    for top_n, expected in zip((1, 37, 1000), milvus, strict=True):
        _same_hits(expected, store.search(queries, top_n, flt))
    assert status.answered == 3 and status.passed == 0
    assert len(store.search(queries[0], 1000, flt)[0]) == status.rows


def test_structured_filters_and_unknown_versions_still_go_to_milvus(store: MilvusStore) -> None:
    from reir.platform.filters import compile_filters

    store.use_memory_index("on", model_version="v1", wait=True)
    status = store.memory_index.status()  # type: ignore[union-attr]
    images = SearchFilter(model_version="v1", image_ids=("img3", "img7"))
    hits = store.search(_queries(1), 20, images)[0]
    assert {h.image_id for h in hits} == {"img3", "img7"} and len(hits) == 10
    prefix = compile_filters([{"field": "image_id", "op": "prefix", "value": "img1"}], {"image_id": "str"},
                             model_version="v1")  # fmt: skip
    assert {h.image_id[:4] for h in store.search(_queries(1), 100, prefix)[0]} == {"img1"}
    assert store.search(_queries(1), 5, SearchFilter(model_version="v9"))[0] == []  # no partition: filtered
    assert status.answered == 0 and status.passed == 0
    store.search(_queries(1), 5, SearchFilter(model_version="v1"))
    assert status.answered == 1


def test_deleted_overwritten_and_unflushed_rows_are_read_as_milvus_reads_them(store: MilvusStore) -> None:
    vecs, rows = _rows(60, 5, "v1", 0)
    store.delete([rows[0][S.PK], rows[1][S.PK]])
    moved = {**rows[2], S.URI: "/g/moved.jpg", S.EMBEDDING: -vecs[2]}  # same pk, new vector and uri
    store.upsert([moved, *_rows(3, 5, "v1", 7, prefix="new")[1]])  # still in milvus-lite's memtable
    flt = SearchFilter(model_version="v1")
    queries = np.concatenate([_queries(3), vecs[:3], -vecs[2:3]])
    milvus = store.search(queries, 40, flt)
    store.use_memory_index("on", model_version="v1", wait=True)
    assert store.memory_index.status().rows == 300 - 2 + 15  # type: ignore[union-attr]
    _same_hits(milvus, store.search(queries, 40, flt))
    assert store.search(-vecs[2], 1, flt)[0][0].uri == "/g/moved.jpg"


def test_the_api_path_reads_the_same_rows_as_the_engine(store: MilvusStore) -> None:
    """A server (or milvus-lite in another process) is read with the query iterator; here the
    same file read both ways gives the same index."""
    part = partition_for("v2")
    direct = MemoryIndex(store.memory_rows(part, 10_000), partition=part, signal=None)  # type: ignore[arg-type]
    store._lite_path, lite_path = None, store._lite_path  # no engine in reach: the API path
    try:
        paged = MemoryIndex(store.memory_rows(part, 10_000), partition=part, signal=None)  # type: ignore[arg-type]
        assert store.memory_rows(part, 199) is None  # more than max_rows
    finally:
        store._lite_path = lite_path
    order = np.argsort(np.asarray(direct.pk.to_pylist()))
    again = np.argsort(np.asarray(paged.pk.to_pylist()))
    assert np.array_equal(direct.vectors[order], paged.vectors[again])
    assert np.array_equal(direct.box[order], paged.box[again]) and np.array_equal(direct.size[order], paged.size[again])
    assert direct.uri.take(order).to_pylist() == paged.uri.take(again).to_pylist()
    queries = _queries(4)
    _same_hits(direct.search(queries, 50), paged.search(queries, 50))


@pytest.mark.parametrize("reader_path", ["engine", "api"])
def test_an_alias_move_is_seen_at_the_next_search_and_new_rows_at_the_next_check(tmp_path: Path,
                                                                                  reader_path: str) -> None:  # fmt: skip
    """``api``: the reader resolves the alias and reads rows over the API, as from a server or
    a milvus-lite in another process."""
    db = str(tmp_path / "idx.db")
    with MilvusStore(db, "c1", dim=DIM) as writer, MilvusStore(db, "live") as reader:
        lite_path = reader._lite_path
        writer.upsert(_rows(10, 5, "v1", 0, prefix="a")[1])
        c2 = MilvusStore(db, "c2", dim=DIM)
        c2.upsert(_rows(10, 5, "v1", 1, prefix="b")[1])
        for s in (writer, c2):
            s.build_index("FLAT")
            s.load()
        writer.point_alias("live", "c1")
        if reader_path == "api":
            reader._lite_path = None
        try:
            reader.use_memory_index("on", model_version="v1", wait=True, check_every_s=0.0)
            manager = reader.memory_index
            assert manager is not None
            flt = SearchFilter(model_version="v1")
            assert {h.image_id[0] for h in reader.search(_queries(1), 50, flt)[0]} == {"a"}
            assert manager.status().answered == 1

            writer.point_alias("live", "c2")  # another store moves the alias (as `reir index promote` does)
            hits = reader.search(_queries(1), 50, flt)[0]  # Milvus, at once; the index reloads beside it
            assert {h.image_id[0] for h in hits} == {"b"} and manager.status().answered == 1
            manager.wait(30)
            _same_hits([hits], [reader.search(_queries(1), 50, flt)[0]])
            assert (manager.status().answered, manager.status().loads) == (2, 2)

            c2.upsert(_rows(2, 5, "v1", 2, prefix="c")[1])  # new rows, written by another store
            reader.search(_queries(1), 5, flt)  # due for a check (check_every_s 0): it runs beside this search
            manager.wait(30)
            manager.wait(30)
            assert manager.status().rows == 60 and manager.status().loads == 3
            _same_hits([c2.search(_queries(2), 60, flt)[0]], [reader.search(_queries(2), 60, flt)[0]])
        finally:
            reader._lite_path = lite_path
            c2.close()


def test_a_write_through_the_same_store_drops_the_index_until_reloaded(store: MilvusStore) -> None:
    store.use_memory_index("on", model_version="v1", wait=True)
    manager = store.memory_index
    assert manager is not None and manager.index is not None
    _, rows = _rows(1, 5, "v1", 3, prefix="late")
    store.upsert(rows)
    assert manager.index is None  # this search goes to Milvus and sees the new rows
    flt = SearchFilter(model_version="v1")
    assert store.search(np.asarray(rows[0][S.EMBEDDING]), 1, flt)[0][0].pk == rows[0][S.PK]
    manager.wait(30)
    assert manager.status().rows == 305
    assert store.search(np.asarray(rows[0][S.EMBEDDING]), 1, flt)[0][0].pk == rows[0][S.PK]


def test_off_keeps_the_milvus_path_and_auto_follows_the_backend(store: MilvusStore) -> None:
    queries = _queries(2)
    before = store.search(queries, 10)
    assert store.use_memory_index("off") is False and store.memory_index is None
    assert [[h.pk for h in q] for q in store.search(queries, 10)] == [[h.pk for h in q] for q in before]
    assert enabled("auto", lite=True) and not enabled("auto", lite=False)
    assert enabled("on", lite=False) and not enabled("off", lite=True)
    with pytest.raises(ValueError, match="auto, on or off"):
        enabled("yes", lite=True)  # type: ignore[arg-type]
    assert store.use_memory_index("auto", wait=True) is True  # milvus-lite


def test_a_scope_over_max_rows_stays_in_milvus(store: MilvusStore) -> None:
    store.use_memory_index("on", max_rows=299, model_version="v1", wait=True)
    manager = store.memory_index
    assert manager is not None and manager.index is None and manager.status().over_max_rows
    flt = SearchFilter(model_version="v1")
    assert len(store.search(_queries(1), 10, flt)[0]) == 10 and manager.status().passed == 1
    store.use_memory_index("on", max_rows=300, model_version="v1", wait=True)
    assert store.memory_index is not None and store.memory_index.status().rows == 300


def test_auto_pages_a_milvus_lite_served_by_another_process_only_while_small(store: MilvusStore) -> None:
    """Without the engine in this process, milvus-lite's rows come through its query iterator,
    slow at scale: ``auto`` reads no more than ``api_auto_max_rows`` there (LITE_API_AUTO_MAX_ROWS
    by default), ``on`` does."""
    lite_path, store._lite_path = store._lite_path, None
    try:
        assert store.use_memory_index("auto", model_version="v1", wait=True, api_auto_max_rows=400)  # 500 rows
        manager = store.memory_index
        assert manager is not None and manager.index is None and manager.status().over_max_rows
        store.use_memory_index("on", model_version="v1", wait=True, api_auto_max_rows=400)
        assert store.memory_index is not None and store.memory_index.status().rows == 300
    finally:
        store._lite_path = lite_path


def _clustered(n: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` centres, as trained embeddings are (not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    vecs = centres[rng.integers(0, clusters, size=n)] + 0.35 * rng.normal(size=(n, DIM))
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def _index_of(vecs: np.ndarray, ann: AnnSpec | None) -> MemoryIndex:
    n = len(vecs)
    columns = {S.PK: [f"v1:img{i}:0" for i in range(n)], S.IMAGE_ID: [f"img{i}" for i in range(n)],
               S.URI: [f"/g/{i}.jpg" for i in range(n)], S.MODEL_VERSION: ["v1"] * n,
               **{f: np.arange(n, dtype=np.float32) for f in (*S.BOX_FIELDS, S.SCORE)}}  # fmt: skip
    return MemoryIndex(Rows(vecs, columns, has_context=False), partition=None, signal=None, ann=ann)


def test_inverted_lists_reach_their_calibrated_recall_on_new_queries_and_score_exactly() -> None:
    vecs = _clustered(20_000, 40, seed=0)
    exact = _index_of(vecs, None)
    ann = _index_of(vecs, AnnSpec(min_rows=10_000, recall=0.95))
    lists = ann.lists
    assert exact.lists is None and lists is not None
    assert len(lists) == 141 and 1 <= lists.nprobe < len(lists) and lists.recall >= 0.95  # isqrt(20,000) lists
    assert int(lists.offsets[-1]) == 20_000 and sorted(ann.pk.to_pylist()) == sorted(exact.pk.to_pylist())
    # new queries near stored rows (as a text query lands near its referent), not the rows themselves
    queries = vecs[np.random.default_rng(5).choice(20_000, 50)] + 0.2 * np.random.default_rng(6).normal(size=(50, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    truth, found = exact.search(queries, 100), ann.search(queries, 100)
    recall = np.mean([len({h.pk for h in t} & {h.pk for h in f}) / 100 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.9  # calibrated for 0.95 on the rows' own queries; these queries are new
    for t, f in zip(truth, found, strict=True):  # each answer scored exactly, best first
        by_pk = {h.pk: h.score for h in t}
        assert [h.score for h in f] == sorted((h.score for h in f), reverse=True)
        assert all(h.score == pytest.approx(by_pk[h.pk], abs=1e-5) for h in f if h.pk in by_pk)
    assert len(ann.search(queries[:1], 5_000)[0]) == 5_000  # longer answers probe more lists
    everything = _index_of(vecs, AnnSpec(min_rows=10_000, recall=1.0, max_probe_share=1.0))
    assert everything.lists is not None
    assert [[h.pk for h in q] for q in everything.search(queries, 100)] == [[h.pk for h in q] for q in truth]
    assert _index_of(vecs, AnnSpec(min_rows=20_001)).lists is None  # below min_rows: exact
    uniform = np.random.default_rng(3).normal(size=(20_000, 128)).astype(np.float32)  # as random as embeddings get
    uniform /= np.linalg.norm(uniform, axis=1, keepdims=True)
    # no clusters: reaching the recall takes more than half the lists, so every row is scanned
    assert _index_of(uniform, AnnSpec(min_rows=10_000, recall=0.99)).lists is None
    with pytest.raises(ValueError, match="recall"):
        AnnSpec(recall=0.0)
    with pytest.raises(ValueError, match="max_probe_share"):
        AnnSpec(max_probe_share=0.0)


def test_the_re_rank_context_of_memory_hits_is_read_from_memory_as_milvus_holds_it(store: MilvusStore) -> None:
    flt = SearchFilter(model_version="v1")
    queries = _queries(3)
    from_milvus = [store.context(store.search(q, 12, flt)[0], model_version="v1") for q in queries]
    # lists kept whatever they cost (max_probe_share 1): rows permuted, answers exact
    store.use_memory_index("on", model_version="v1", wait=True,
                           ann=AnnSpec(min_rows=100, recall=1.0, max_probe_share=1.0))  # fmt: skip
    manager = store.memory_index
    assert manager is not None and manager.status().lists == 17  # isqrt(300) lists, permuted rows
    for q, expected in zip(queries, from_milvus, strict=True):
        hits = store.search(q, 12, flt)[0]
        assert all(h.row >= 0 for h in hits)
        got = store.context(hits, model_version="v1")
        assert list(got) == list(expected)
        for image_id, rows in expected.items():
            assert [r.pk for r in got[image_id]] == [r.pk for r in rows] and len(rows) == 5
            for a, b in zip(rows, got[image_id], strict=True):
                assert (a.box, a.instance_score, a.uri, a.image_size, a.n_instances) == \
                    (b.box, b.instance_score, b.uri, b.image_size, b.n_instances)
                assert np.array_equal(a.embedding, b.embedding)  # float16-rounded, as packed in Milvus
    assert manager.status().contexts == sum(len(e) for e in from_milvus)
    stale = store.search(queries[0], 1, flt)[0][0]
    from dataclasses import replace

    moved = replace(stale, row=(stale.row + 1) % 300)  # a row that holds another pk now (a reload)
    assert [r.pk for r in store.context([moved], model_version="v1")[stale.image_id]] == \
        [S.make_pk("v1", stale.image_id, r) for r in range(5)]  # read from Milvus instead
    assert manager.status().contexts == sum(len(e) for e in from_milvus)


def test_live_recall_is_measured_on_real_queries_and_raises_the_probe_count_below_target(store: MilvusStore) -> None:
    store.use_memory_index("on", model_version="v1", wait=True,
                           ann=AnnSpec(min_rows=100, recall=1.0, max_probe_share=1.0))  # fmt: skip
    manager = store.memory_index
    assert manager is not None and manager.index is not None and manager.index.lists is not None
    assert manager.measure_recall() is None  # no query seen yet
    lists = manager.index.lists
    lists.nprobe = 1  # as if calibrated on queries easier than the real ones
    flt = SearchFilter(model_version="v1")
    queries = _queries(20, seed=3)
    for q in queries:
        store.search(q, 100, flt)
    recall = manager.measure_recall()
    assert recall is not None and recall < 1.0 and manager.status().live_recall == pytest.approx(recall, abs=1e-4)
    assert lists.nprobe > 1 and manager.status().nprobe == lists.nprobe and manager.status().live_queries == 20
    exact = MemoryIndex(store.memory_rows(partition_for("v1"), 10_000), partition=None, signal=None)  # type: ignore[arg-type]
    assert [[h.pk for h in a] for a in store.search(queries, 100, flt)] == [[h.pk for h in a] for a in exact.search(queries, 100)]
    assert manager.measure_recall() == 1.0 and manager.recall() == 1.0  # what the Searcher's gauge reads


def test_contexts_read_whole_images_only_and_leave_incomplete_or_stale_ones_to_milvus() -> None:
    # (image, rank) of each row, shuffled; n_instances is what the image's rows say it holds
    layout = [("a", 0, 3), ("b", 0, 3), ("a", 2, 3), ("d", 3, 2), ("b", 2, 3), ("a", 1, 3), ("d", 0, 2),
              ("c", 0, 3), ("c", 1, 3), ("c", 1, 3), ("d", 1, 2), ("e", 0, 1), ("d", 2, 2)]  # fmt: skip
    n = len(layout)
    vecs = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    columns = {S.PK: [f"v1:{im}:{r}:{i}" for i, (im, r, _) in enumerate(layout)],
               S.IMAGE_ID: [im for im, _, _ in layout], S.URI: [f"/g/{im}.jpg" for im, _, _ in layout],
               S.MODEL_VERSION: ["v1"] * n, **{f: np.arange(n, dtype=np.float32) for f in (*S.BOX_FIELDS, S.SCORE)},
               S.IMAGE_W: np.full(n, 64.0), S.IMAGE_H: np.full(n, 48.0),
               S.N_INSTANCES: np.asarray([k for _, _, k in layout]), S.RANK: np.asarray([r for _, r, _ in layout])}  # fmt: skip
    index = MemoryIndex(Rows(vecs, columns, has_context=True), partition=None, signal=None)

    def hit(row: int, pk: str | None = None, count: int | None = None) -> Hit:
        image, _, k = layout[row % n]
        return Hit(pk or columns[S.PK][row % n], image, f"/g/{image}.jpg", (0.0, 0.0, 1.0, 1.0), 0.5, 0.5, "v1",
                   n_instances=k if count is None else count, row=row)  # fmt: skip

    hits = [hit(2), hit(1), hit(7), hit(12), hit(11), hit(0, pk="v1:other"), hit(5, count=4), hit(n + 3)]
    found = index.contexts(hits, float16=False)
    # a: ranks 0..2 in rank order; d: its first two ranks (rank 3 is beyond its count); e: one row.
    # b lacks rank 1, c holds rank 1 twice, a stale pk, a count the rows do not reach, a row past the end: not here.
    assert sorted(found) == [0, 3, 4]
    assert found[0].rows.tolist() == [0, 5, 2] and found[0].pks == [columns[S.PK][i] for i in (0, 5, 2)]
    assert found[3].rows.tolist() == [6, 10] and found[4].rows.tolist() == [11]
    assert found[0].boxes == [[float(i)] * 4 for i in (0, 5, 2)] and found[3].objectness == [6.0, 10.0]
    assert np.array_equal(found[0].vectors, vecs[[0, 5, 2]])
    assert index.contexts([], float16=False) == {}
    # as arrays: every image whole or none at all
    assert index.context_arrays(hits, float16=False) is None
    whole = [hits[i] for i in (0, 3, 4)]
    packed = index.context_arrays(whole, float16=True)
    assert packed is not None and packed.counts.tolist() == [3, 2, 1]
    assert packed.pks == [pk for i in (0, 3, 4) for pk in found[i].pks]
    assert packed.boxes.tolist() == [b for i in (0, 3, 4) for b in found[i].boxes]
    assert packed.objectness.tolist() == [o for i in (0, 3, 4) for o in found[i].objectness]
    assert np.array_equal(packed.vectors, vecs[[0, 5, 2, 6, 10, 11]].astype(np.float16).astype(np.float32))
