"""The store's query-path reads: cached layout, per-version partitions, keyed context fetch,
image size in the rows, and the fallbacks for collections written before those fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from reir.platform import schema as S
from reir.platform.backend import auto_index, partition_for, search_params
from reir.platform.store import MilvusStore, SearchFilter

DIM = 8


def _rows(images: int, per_image: int, version: str = "v1", seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    n = images * per_image
    vecs = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [
        S.InstanceRow(f"img{i // per_image}", f"/g/img{i // per_image}.jpg", (i, 1.0, 2.0, 3.0), 0.5, i % per_image,
                      version, vecs[i], image_size=(640.0 + i // per_image, 480.0), n_instances=per_image).to_dict()
        for i in range(n)
    ]  # fmt: skip
    return vecs, rows


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MilvusStore]:
    with MilvusStore(str(tmp_path / "idx.db"), "instances", dim=DIM) as s:
        yield s


def test_layout_is_read_once_and_refreshed_by_an_index_build(store: MilvusStore) -> None:
    _, rows = _rows(3, 2)
    store.upsert(rows)
    first = store.layout()
    assert store.layout() is first and first.index_type is None and first.has_context
    store.build_index("FLAT")
    store.load()
    assert store.layout() is not first and store.layout().index_type == "FLAT"


def test_autoindex_on_lite_builds_flat_and_keeps_an_index_already_there(tmp_path: Path) -> None:
    vecs, rows = _rows(4, 2)
    with MilvusStore(str(tmp_path / "auto.db"), "auto", dim=DIM) as store:
        store.upsert(rows)
        store.build_index("AUTOINDEX")
        store.load()
        assert store.layout().index_type == "FLAT"
        assert [h.pk for h in store.search(vecs[5], 1)[0]] == [rows[5][S.PK]]
    with MilvusStore(str(tmp_path / "old.db"), "old", dim=DIM) as store:
        store.upsert(rows)
        store.build_index("HNSW")  # what an older reir's AUTOINDEX left on a lite collection
        store.build_index("AUTOINDEX")  # kept: rebuilding would release a serving collection
        assert store.layout().index_type == "HNSW"
        store.build_index("FLAT")  # an explicit type is built
        assert store.layout().index_type == "FLAT"


def test_each_model_version_gets_its_partition_and_is_searched_without_a_filter(store: MilvusStore) -> None:
    vecs, v1 = _rows(4, 2, "v1")
    _, v2 = _rows(4, 2, "v2:x".replace(":", "-"), seed=1)
    store.upsert(v1 + v2)
    store.build_index("AUTOINDEX")
    store.load()
    assert {partition_for("v1"), partition_for("v2-x")} <= set(store.client.list_partitions("instances"))
    hits = store.search(vecs[3], 16, SearchFilter(model_version="v1"))[0]
    assert len(hits) == 8 and {h.model_version for h in hits} == {"v1"} and hits[0].pk == v1[3][S.PK]
    # a version with no partition falls back to the filter (and finds nothing)
    assert store.search(vecs[3], 16, SearchFilter(model_version="v9"))[0] == []
    assert store.count(SearchFilter(model_version="v2-x")) == 8


def test_context_is_a_keyed_fetch_of_every_instance_with_size_and_vectors(store: MilvusStore) -> None:
    vecs, rows = _rows(5, 3)
    store.upsert(rows)
    store.build_index("AUTOINDEX")
    store.load()
    hits = store.search(vecs[[4, 10]], 1)
    assert [h[0].image_id for h in hits] == ["img1", "img3"]
    assert hits[0][0].n_instances == 3 and hits[0][0].image_size == (641.0, 480.0)
    context = store.context([hits[0][0], hits[1][0]], model_version="v1")
    assert sorted(context) == ["img1", "img3"]
    assert [h.pk for h in context["img1"]] == [S.make_pk("v1", "img1", r) for r in range(3)]
    got = context["img3"][1]
    # read from img3's rank-0 row, which packs the image's vectors as float16
    assert got.embedding is not None and np.array_equal(got.embedding, vecs[10].astype(np.float16).astype(np.float32))
    assert got.image_size == (643.0, 480.0) and got.box == (10.0, 1.0, 2.0, 3.0)
    assert got.instance_score == 0.5 and got.n_instances == 3


def test_the_rank0_row_packs_its_image_and_the_others_stay_empty(store: MilvusStore) -> None:
    _, rows = _rows(2, 3)
    store.upsert(rows)
    stored = {r[S.PK]: r[S.PACKED_CONTEXT] for r in store.get([r[S.PK] for r in rows])}
    packed = S.unpack_context(stored[S.make_pk("v1", "img1", 0)])
    assert packed is not None and packed.embeddings.shape == (3, DIM)
    assert np.array_equal(packed.boxes[:, 0], [3.0, 4.0, 5.0])  # rank order
    assert [stored[S.make_pk("v1", "img1", r)] for r in (1, 2)] == ["", ""]
    assert "image_context" not in store._scalar_fields(store.layout())  # searches never carry it


def test_an_image_written_in_pieces_is_read_row_by_row_exactly(store: MilvusStore) -> None:
    vecs, rows = _rows(2, 3)
    store.upsert(rows[:1])  # rank 0 of img0 alone: nothing to pack it with
    store.upsert(rows[1:])
    assert store.get([rows[0][S.PK]])[0][S.PACKED_CONTEXT] == ""
    store.build_index("AUTOINDEX")
    store.load()
    hit = store.search(vecs[1], 1)[0][0]
    context = store.context([hit, store.search(vecs[4], 1)[0][0]], model_version="v1")
    assert [h.pk for h in context["img0"]] == [S.make_pk("v1", "img0", r) for r in range(3)]
    assert all(np.allclose(h.embedding, vecs[r], atol=1e-6) for r, h in enumerate(context["img0"]))  # float32 rows
    assert [h.box[0] for h in context["img1"]] == [3.0, 4.0, 5.0]  # img1 came whole: packed


def _schema_without_packed_context() -> object:
    """The row schema with image size and count but before the packed context field."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    for f in S.collection_schema(DIM).fields:
        if f.name != S.PACKED_CONTEXT:
            schema.add_field(f.name, f.dtype, is_primary=f.is_primary, **f.params)
    return schema


def test_a_collection_without_the_packed_field_reads_context_row_by_row(tmp_path: Path) -> None:
    with MilvusStore(str(tmp_path / "mid.db"), "mid") as store:
        store.client.create_collection("mid", schema=_schema_without_packed_context())
        vecs, rows = _rows(3, 2)
        store.upsert(rows)
        assert store.layout().has_context and not store.layout().has_packed_context
        assert S.PACKED_CONTEXT not in store.get([rows[0][S.PK]])[0]  # not stuffed into the dynamic field
        store.build_index("AUTOINDEX")
        store.load()
        hit = store.search(vecs[3], 1)[0][0]
        context = store.context([hit], model_version="v1")
        assert [h.pk for h in context["img1"]] == [rows[2][S.PK], rows[3][S.PK]]
        assert np.allclose(context["img1"][1].embedding, vecs[3], atol=1e-6)


def _old_schema() -> object:
    """The row schema before image size / instance count were stored."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field(S.PK, DataType.VARCHAR, is_primary=True, max_length=S.MAX_PK_LEN)
    schema.add_field(S.IMAGE_ID, DataType.VARCHAR, max_length=S.MAX_IMAGE_ID_LEN)
    schema.add_field(S.URI, DataType.VARCHAR, max_length=S.MAX_URI_LEN)
    for name in (*S.BOX_FIELDS, S.SCORE):
        schema.add_field(name, DataType.FLOAT)
    schema.add_field(S.RANK, DataType.INT64)
    schema.add_field(S.MODEL_VERSION, DataType.VARCHAR, max_length=S.MAX_MODEL_VERSION_LEN)
    schema.add_field(S.EMBEDDING, DataType.FLOAT_VECTOR, dim=DIM)
    return schema


def test_a_collection_without_the_context_fields_still_serves(tmp_path: Path) -> None:
    with MilvusStore(str(tmp_path / "old.db"), "old") as store:
        store.client.create_collection("old", schema=_old_schema())
        vecs, rows = _rows(3, 2)
        store.upsert(rows)  # the new fields are dropped, not stuffed into the dynamic field
        store.build_index("AUTOINDEX")
        store.load()
        assert not store.layout().has_context
        assert "image_w" not in store.get([rows[0][S.PK]])[0]
        hit = store.search(vecs[2], 1, SearchFilter(model_version="v1"))[0][0]
        assert hit.image_id == "img1" and hit.n_instances == 0 and hit.image_size is None
        context = store.context([hit], model_version="v1")  # the scalar-query fallback
        assert [h.pk for h in context["img1"]] == [rows[2][S.PK], rows[3][S.PK]]


def test_backend_defaults() -> None:
    assert auto_index(lite=False, requested="AUTOINDEX") == ("HNSW", {"M": 16, "efConstruction": 200})
    assert auto_index(lite=True, requested="AUTOINDEX") == ("FLAT", {})
    assert auto_index(lite=True, requested="HNSW") == ("HNSW", {})
    assert auto_index(lite=True, requested="AUTOINDEX", current="HNSW") == ("HNSW", {})  # kept
    assert auto_index(lite=False, requested="AUTOINDEX", current="FLAT")[0] == "HNSW"
    assert auto_index(lite=False, requested="IVF_FLAT") == ("IVF_FLAT", {})
    assert search_params("HNSW", 100, lite=False, overrides={})["params"]["ef"] >= 256
    assert search_params("HNSW", 100, lite=False, overrides={"ef": 300})["params"]["ef"] == 300
    assert search_params("AUTOINDEX", 100, lite=True, overrides={})["params"]["ef"] >= 256  # FAISS HNSW in lite
    assert "ef" not in search_params("AUTOINDEX", 100, lite=False, overrides={})["params"]
    assert partition_for("v1") != partition_for("v1.") and partition_for("a b").startswith("mv_a_b_")


def test_a_version_count_is_exact_with_one_version_or_several(store: MilvusStore) -> None:
    """milvus-lite ignores a partition in count(*): one version's partition is counted as the
    whole collection only while no other partition holds rows."""
    _, v1 = _rows(3, 2, "v1")
    store.upsert(v1)
    store.load()
    assert store.count(SearchFilter(model_version="v1")) == 6 and store.count(SearchFilter(model_version="v9")) == 0
    assert store.count(SearchFilter(model_version="v1", image_ids=("img0",))) == 2
    _, v2 = _rows(2, 2, "v2", seed=1)
    store.upsert(v2)
    store.refresh()  # a new partition: as a new reader sees it
    assert (store.count(SearchFilter(model_version="v1")), store.count(SearchFilter(model_version="v2"))) == (6, 4)
    assert store.count() == 10
