from __future__ import annotations

import numpy as np
import pytest

from reir.platform import schema as S


def test_make_pk_is_deterministic_and_validated() -> None:
    assert S.make_pk("tiny-abc", "img1", 3) == "tiny-abc:img1:3"
    with pytest.raises(ValueError):
        S.make_pk("bad:version", "img1", 0)
    with pytest.raises(ValueError):
        S.make_pk("v", "", 0)
    with pytest.raises(ValueError):
        S.make_pk("v", "img", -1)


def test_instance_row_round_trip_keeps_dynamic_fields() -> None:
    row = S.InstanceRow("img1", "/g/img1.jpg", (1.0, 2.0, 3.0, 4.0), 0.9, 2, "v1",
                        np.arange(4, dtype=np.float32), extra={"split": "test"})  # fmt: skip
    d = row.to_dict()
    assert d[S.PK] == "v1:img1:2" and d["split"] == "test" and d[S.BOX_W] == 3.0
    back = S.InstanceRow.from_dict(d)
    assert back.box == row.box and back.extra == {"split": "test"} and back.pk == row.pk
    np.testing.assert_allclose(back.embedding, row.embedding)


def test_extra_fields_can_not_shadow_schema() -> None:
    row = S.InstanceRow("i", "u", (0, 0, 1, 1), 0.5, 0, "v", np.ones(2), extra={S.SCORE: 1})
    with pytest.raises(ValueError, match="shadow"):
        row.to_dict()


def test_rows_from_columns_takes_only_schema_fields() -> None:
    cols = {
        S.IMAGE_ID: np.array(["a", "b"], dtype=object), S.URI: np.array(["ua", "ub"], dtype=object),
        S.BOX_X: np.zeros(2), S.BOX_Y: np.zeros(2), S.BOX_W: np.ones(2), S.BOX_H: np.ones(2),
        S.SCORE: np.array([0.1, 0.2]), S.RANK: np.array([0, 1]),
        S.MODEL_VERSION: np.array(["v", "v"], dtype=object), S.EMBEDDING: np.ones((2, 3)),
        "status": np.array(["ok", "ok"], dtype=object),
    }  # fmt: skip
    rows = list(S.rows_from_columns(cols))
    assert [r[S.PK] for r in rows] == ["v:a:0", "v:b:1"]
    assert all("status" not in r for r in rows)


def test_collection_schema_has_dynamic_fields_and_vector() -> None:
    schema = S.collection_schema(16)
    assert schema.enable_dynamic_field
    names = [f.name for f in schema.fields]
    assert names == [*S.ROW_FIELDS[:-1], S.PACKED_CONTEXT, S.EMBEDDING] and set(names) == set(S.RESERVED_FIELDS)


def test_packed_context_round_trips_in_rank_order_and_refuses_what_does_not_fit() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 16)).astype(np.float32)
    rows = [S.InstanceRow("im", "/im.jpg", (float(r), 2.0, 3.0, 4.5), 0.25 * r, r, "v1", emb[r], n_instances=4).to_dict()
            for r in range(4)]  # fmt: skip
    packed = S.unpack_context(S.pack_context(rows))
    assert packed is not None
    assert np.array_equal(packed.boxes, [[r, 2.0, 3.0, 4.5] for r in range(4)])
    assert np.array_equal(packed.scores, [0.0, 0.25, 0.5, 0.75])
    assert np.array_equal(packed.embeddings, emb.astype(np.float16).astype(np.float32))
    assert S.unpack_context("") is None and S.unpack_context("xyz") is None
    wide = [{**rows[0], S.EMBEDDING: np.ones(S.MAX_PACKED_LEN, np.float32)}]
    assert S.pack_context(wide) == ""  # over Milvus' VARCHAR limit: the rows are read one by one


def test_attach_packs_only_images_whose_rows_are_all_there() -> None:
    emb = np.eye(4, dtype=np.float32)
    whole = [S.InstanceRow("a", "/a", (0.0, 0.0, 1.0, 1.0), 0.9, r, "v1", emb[r], n_instances=2).to_dict()
             for r in range(2)]  # fmt: skip
    part = [S.InstanceRow("b", "/b", (0.0, 0.0, 1.0, 1.0), 0.9, 0, "v1", emb[2], n_instances=3).to_dict()]
    rows = whole + part
    S.attach_packed_context(rows)
    assert rows[0][S.PACKED_CONTEXT] and rows[1][S.PACKED_CONTEXT] == "" and rows[2][S.PACKED_CONTEXT] == ""
