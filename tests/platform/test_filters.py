"""Structured filters against a real milvus-lite collection, and the per-image context read."""

from __future__ import annotations

import numpy as np
import pytest

from reir.platform.filters import FilterError, StructuredFilter, allowed_fields, compile_filters
from reir.platform.schema import InstanceRow
from reir.platform.store import MilvusStore

FIELDS = allowed_fields({"split": "str", "year": "int", "area": "float", "flagged": "bool"})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> MilvusStore:
    db = tmp_path_factory.mktemp("filters") / "f.db"
    s = MilvusStore(str(db), "rows", dim=4)
    rows = []
    for i, image_id in enumerate(["a_1", "ab1", "b-2", "c.3"]):
        for rank in range(3 if i == 0 else 1):
            extra = {"split": "test" if i % 2 else "train", "year": 2020 + i, "area": 0.5 * i, "flagged": i == 3}
            rows.append(InstanceRow(image_id=image_id, uri=f"/g/{'x_' if i < 2 else 'y'}/{image_id}.jpg",
                                    box=(float(rank), 0.0, 2.0, 2.0), score=0.9 - rank / 10, rank=rank,
                                    model_version="v1", embedding=np.eye(4)[rank], extra=extra).to_dict())
    s.upsert(rows)
    s.build_index("FLAT")
    s.load()
    yield s
    s.close()


def _ids(store: MilvusStore, clauses: list[dict]) -> set[str]:
    flt = compile_filters(clauses, FIELDS, model_version="v1")
    hits = store.search(np.ones((1, 4)), 50, flt)[0]
    return {h.image_id for h in hits}


@pytest.mark.parametrize(
    ("clauses", "expected"),
    [
        ([], {"a_1", "ab1", "b-2", "c.3"}),
        ([{"field": "image_id", "op": "eq", "value": "ab1"}], {"ab1"}),
        ([{"field": "image_id", "op": "not_in", "value": ["ab1", "b-2"]}], {"a_1", "c.3"}),
        ([{"field": "split", "op": "eq", "value": "test"}], {"ab1", "c.3"}),
        ([{"field": "year", "op": "gt", "value": 2021}, {"field": "flagged", "op": "eq", "value": False}], {"b-2"}),
        ([{"field": "area", "op": "le", "value": 0.5}], {"a_1", "ab1"}),
        ([{"field": "uri", "op": "prefix", "value": "/g/x_/"}], {"a_1", "ab1"}),
        ([{"field": "image_id", "op": "prefix", "value": "a_"}], {"a_1"}),  # '_' is literal, not LIKE's wildcard
        ([{"field": "model_version", "op": "eq", "value": "v2"}], set()),
    ],
)
def test_filters_select_the_right_rows(store: MilvusStore, clauses: list[dict], expected: set[str]) -> None:
    assert _ids(store, clauses) == expected


@pytest.mark.parametrize(
    "clause",
    [
        {"field": "pk", "op": "ne", "value": ""},  # not on the allow-list
        {"field": "image_id", "op": "eq", "value": ""},
        {"field": "image_id", "op": "eq", "value": "bell\x07"},  # the grammar has no escape for it
        {"field": "image_id", "op": "eq", "value": "x" * 2049},
        {"field": "image_id", "op": "prefix", "value": ["a"]},
        {"field": "year", "op": "eq", "value": "1 or 1==1"},
        {"field": "year", "op": "eq", "value": True},
        {"field": "area", "op": "eq", "value": 0.5},  # no float equality
        {"field": "area", "op": "lt", "value": float("nan")},
        {"field": "flagged", "op": "eq", "value": 1},
        {"field": "split", "op": "in", "value": []},
        {"field": "split", "op": "exists", "value": "a"},
        {"field": "split", "op": "eq", "value": "a", "expr": "1"},
    ],
)
def test_unsafe_or_unknown_filters_are_rejected(clause: dict) -> None:
    with pytest.raises(FilterError):
        compile_filters([clause], FIELDS)


def test_metadata_fields_can_not_shadow_schema_fields_or_inject_names() -> None:
    for bad in ({"pk": "str"}, {"embedding": "str"}, {"a b": "str"}, {'x"': "int"}, {"ok": "json"}):
        with pytest.raises(FilterError):
            allowed_fields(bad)  # type: ignore[arg-type]


def test_structured_filter_keeps_the_base_filter() -> None:
    flt = StructuredFilter(model_version="v1", image_ids=("a",))
    assert flt.to_expr() == 'model_version == "v1" and image_id in ["a"]'


def test_rows_for_images_returns_every_instance_with_vectors(store: MilvusStore) -> None:
    ctx = store.rows_for_images(["a_1", "c.3", "zzz"], model_version="v1")
    assert [h.pk for h in ctx["a_1"]] == ["v1:a_1:0", "v1:a_1:1", "v1:a_1:2"]
    assert np.allclose(ctx["a_1"][1].embedding, np.eye(4)[1]) and ctx["a_1"][1].box == (1.0, 0.0, 2.0, 2.0)
    assert len(ctx["c.3"]) == 1 and ctx["zzz"] == []
    assert store.rows_for_images(["a_1"], model_version="v2") == {"a_1": []}
    assert store.rows_for_images(["a_1"], with_vectors=False)["a_1"][0].embedding is None
    assert store.rows_for_images(['a" or pk != "']) == {'a" or pk != "': []}  # escaped, not an expression



# Real file names and injection attempts: each must match exactly its own row.
ODD_URIS = [
    "photos/2024/a trip/x [1].jpg", 'photos/quote"d.jpg', "photos/back\\slash.jpg", "photos/ünï cödé/日本.jpg",
    "photos/new\nline\ttab.jpg", "photos/it's (2).jpg", 'x" or 1==1 or "', "a\\", "100%_done.png",
    '") or (image_id != "',
]


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory: pytest.TempPathFactory) -> MilvusStore:
    s = MilvusStore(str(tmp_path_factory.mktemp("odd") / "o.db"), "rows", dim=4)
    s.upsert([InstanceRow(image_id=f"img{i}", uri=uri, box=(0.0, 0.0, 1.0, 1.0), score=0.5, rank=0,
                          model_version="v1", embedding=np.eye(4)[i % 4]).to_dict()
              for i, uri in enumerate(ODD_URIS)])  # fmt: skip
    s.build_index("FLAT")
    s.load()
    yield s
    s.close()


def _odd(store: MilvusStore, clauses: list[dict]) -> set[str]:
    return {h.image_id for h in store.search(np.ones((1, 4)), 50, compile_filters(clauses, FIELDS))[0]}


@pytest.mark.parametrize("index", range(len(ODD_URIS)))
def test_any_file_name_is_filterable_and_matches_only_itself(odd_store: MilvusStore, index: int) -> None:
    uri = ODD_URIS[index]
    assert _odd(odd_store, [{"field": "uri", "op": "eq", "value": uri}]) == {f"img{index}"}
    assert _odd(odd_store, [{"field": "uri", "op": "in", "value": [uri, "nothing"]}]) == {f"img{index}"}
    assert f"img{index}" not in _odd(odd_store, [{"field": "uri", "op": "ne", "value": uri}])
    assert len(_odd(odd_store, [{"field": "uri", "op": "ne", "value": uri}])) == len(ODD_URIS) - 1


@pytest.mark.parametrize(
    "value",
    ['" or 1==1 or "', '" or uri != "', "\\", '\\"', '") or ("1"=="1', "x\n or 1==1", "ünï\" || true || \""],
)
def test_injection_attempts_match_nothing(odd_store: MilvusStore, value: str) -> None:
    """Each value is a whole literal: a row that must not match stays unmatched."""
    for op in ("eq", "prefix"):
        assert _odd(odd_store, [{"field": "image_id", "op": op, "value": value}]) == set()
    assert len(_odd(odd_store, [{"field": "image_id", "op": "not_in", "value": [value]}])) == len(ODD_URIS)


def test_prefix_treats_like_wildcards_and_backslashes_literally(odd_store: MilvusStore) -> None:
    def prefix(value: str) -> set[str]:
        return _odd(odd_store, [{"field": "uri", "op": "prefix", "value": value}])

    assert prefix("photos/2024/a trip/") == {"img0"}
    assert prefix("100%_") == {"img8"} and prefix("100_") == set() and prefix("%") == set()
    assert prefix("a\\") == {"img7"} and prefix("photos/back\\") == {"img2"}
    assert prefix("photos/ünï cödé/") == {"img3"}
    assert len(prefix("photos/")) == 6
