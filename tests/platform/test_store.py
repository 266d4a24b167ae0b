from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reir.platform import schema as S
from reir.platform.store import MilvusStore, SearchFilter

DIM = 16


def _rows(n: int, version: str = "v1", seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    vecs = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [
        S.InstanceRow(f"img{i // 2}", f"/g/img{i // 2}.jpg", (i, 2.0, 3.0, 4.0), 0.5, i % 2, version,
                      vecs[i], extra={"split": "test"}).to_dict()
        for i in range(n)
    ]  # fmt: skip
    return vecs, rows


@pytest.fixture
def store(tmp_path: Path):
    with MilvusStore(str(tmp_path / "idx.db"), "instances", dim=DIM, upsert_batch_size=7) as s:
        yield s


def test_upsert_is_idempotent_and_search_finds_planted_row(store: MilvusStore) -> None:
    vecs, rows = _rows(40)
    assert store.upsert(rows) == 40
    assert store.upsert(rows) == 40  # same primary keys: replaced, not duplicated
    assert store.count() == 40
    store.build_index("AUTOINDEX")
    store.load()
    hits = store.search(vecs[[13, 21]], top_n=3)
    assert [h[0].pk for h in hits] == [rows[13][S.PK], rows[21][S.PK]]
    best = hits[0][0]
    assert best.image_id == "img6" and best.uri == "/g/img6.jpg" and best.box == (13.0, 2.0, 3.0, 4.0)
    assert best.score == pytest.approx(1.0, abs=1e-5) and best.instance_score == pytest.approx(0.5)
    assert best.model_version == "v1"
    assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score


@pytest.mark.parametrize("index_type", ["HNSW", "IVF_FLAT", "FLAT"])
def test_index_types_supported_by_milvus_lite(store: MilvusStore, index_type: str) -> None:
    vecs, rows = _rows(30)
    store.upsert(rows)
    store.build_index(index_type)
    store.build_index(index_type)  # no-op when already built
    store.load()
    assert store.index_type() == index_type
    assert store.search(vecs[5], top_n=1)[0][0].pk == rows[5][S.PK]


def test_filter_by_model_version_and_image_ids(store: MilvusStore) -> None:
    vecs, rows_v1 = _rows(10, "v1")
    _, rows_v2 = _rows(10, "v2")
    store.upsert(rows_v1 + rows_v2)
    store.load()
    assert store.count() == 20 and store.count(SearchFilter(model_version="v2")) == 10
    hits = store.search(vecs[0], 20, SearchFilter(model_version="v2", image_ids=("img1", "img2")))[0]
    assert {h.image_id for h in hits} == {"img1", "img2"} and {h.model_version for h in hits} == {"v2"}
    # a value is escaped into one literal: the injection attempt is just a version no row has
    assert store.count(SearchFilter(model_version='v1" or pk != "')) == 0
    with pytest.raises(ValueError, match="control character"):
        SearchFilter(model_version="v1\x00").to_expr()


def test_dynamic_fields_round_trip(store: MilvusStore) -> None:
    _, rows = _rows(2)
    store.upsert(rows)
    store.load()
    got = store.get([rows[1][S.PK]])
    assert got[0]["split"] == "test"
    assert S.InstanceRow.from_dict(got[0]).extra == {"split": "test"}


def test_dim_mismatch_is_an_error(store: MilvusStore) -> None:
    with pytest.raises(ValueError, match="dim"):
        store.ensure_collection(DIM + 1)


def test_close_releases_the_file_for_another_process(tmp_path: Path) -> None:
    path = tmp_path / "idx.db"
    with MilvusStore(str(path), "instances", dim=DIM) as s:
        s.upsert(_rows(4)[1])
    code = (
        "from reir.platform.store import MilvusStore\n"
        f"s = MilvusStore({str(path)!r}, 'instances'); print(s.count()); s.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "4"


def test_rows_go_by_column_and_read_back_exactly(store: MilvusStore) -> None:
    """Rows with exactly the schema's fields take the column upsert; values read back as written,
    and a batch with a dynamic field (or rows written again) takes the row API, same results."""
    vecs, rows = _rows(12)
    plain = [{k: v for k, v in row.items() if k != "split"} for row in rows]
    for i, row in enumerate(plain):
        row.update({S.IMAGE_W: 640.0 + i, S.IMAGE_H: 480.0, S.N_INSTANCES: 2})
    assert store.upsert(plain[:10]) == 10  # by column (upsert_batch_size 7: two calls)
    assert store.upsert([rows[10], plain[11]]) == 2  # one row has a dynamic field: the row API
    store.load()
    got = {r[S.PK]: r for r in store.get([r[S.PK] for r in plain], output_fields=["*"])}
    assert len(got) == 12
    for i, row in enumerate(plain):
        back = got[row[S.PK]]
        assert (back[S.IMAGE_ID], back[S.URI], back[S.RANK], back[S.MODEL_VERSION]) == (
            row[S.IMAGE_ID], row[S.URI], row[S.RANK], row[S.MODEL_VERSION])  # fmt: skip
        assert back["box_x"] == pytest.approx(float(i)) and back[S.SCORE] == pytest.approx(0.5)
        if i != 10:  # row 10 went in without the context fields (defaults)
            assert (back[S.IMAGE_W], back[S.N_INSTANCES]) == (640.0 + i, 2)
        assert np.allclose(back[S.EMBEDDING], vecs[i], atol=1e-6)
    assert got[rows[10][S.PK]]["split"] == "test" and "split" not in got[plain[0][S.PK]]
    # the packed context went in by column too: image 1's rank-0 row carries both instances
    packed = got[plain[2][S.PK]][S.PACKED_CONTEXT]
    context = S.unpack_context(packed)
    assert context is not None and context.embeddings.shape == (2, DIM) and got[plain[3][S.PK]][S.PACKED_CONTEXT] == ""
    assert np.allclose(context.embeddings, vecs[2:4], atol=2e-3)  # float16 in the pack


def test_writers_creating_a_new_version_partition_at_once_all_succeed(tmp_path: Path) -> None:
    """Ingestion's encoder actors (and a restarted one) write the same new model version at
    once: each sees no partition, creates it, and all but one lose that race; none may fail."""
    import threading

    path = str(tmp_path / "idx.db")
    MilvusStore(path, "instances", dim=DIM).close()
    writers = 4
    stores = [MilvusStore(path, "instances") for _ in range(writers)]
    errors: list[BaseException] = []
    try:
        for k in range(5):  # five new versions, each written by every store at once
            start = threading.Barrier(writers)

            def write(store: MilvusStore, part: int, version: str = f"v{k}", start: threading.Barrier = start) -> None:
                vecs = _rows(4, version, seed=part)[0]
                rows = [S.InstanceRow(f"w{part}_img{i // 2}", f"/g/w{part}_img{i // 2}.jpg", (i, 2.0, 3.0, 4.0), 0.5,
                                      i % 2, version, vecs[i]).to_dict() for i in range(4)]  # fmt: skip
                start.wait()
                try:
                    store.upsert(rows)
                except Exception as exc:  # noqa: BLE001 - collected, asserted below
                    errors.append(exc)

            threads = [threading.Thread(target=write, args=(s, i)) for i, s in enumerate(stores)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == []
        stores[0].flush()
        assert stores[0].count() == 5 * writers * 4
    finally:
        for s in stores:
            s.close()
