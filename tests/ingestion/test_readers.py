"""Gallery readers: manifests (jsonl / csv / parquet, local and pyarrow-filesystem URIs), COCO, REIRCOCO."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from reir.ingestion.gallery import list_gallery, read_uri
from reir.platform.config import IngestConfig, MilvusConfig

FIELDS = {"site": "str", "year": "int", "weight": "float", "public": "bool"}
ROWS = [
    {"uri": "imgs/a.jpg", "image_id": "a", "site": "north", "year": 2021, "weight": 0.5, "public": True, "x": 1},
    {"uri": "imgs/b.jpg", "site": "south", "year": 2022, "weight": 1.5, "public": False, "x": 2},
]


def _cfg(**source: object) -> IngestConfig:
    return IngestConfig.model_validate({"model_path": "/m", "milvus": MilvusConfig(metadata_fields=FIELDS), **source})


def _write(path: Path) -> Path:
    table = pa.Table.from_pylist(ROWS)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pcsv.write_csv(table, path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_manifest_formats_give_typed_metadata(tmp_path: Path, suffix: str) -> None:
    manifest = _write(tmp_path / f"list{suffix}")
    items = list_gallery(_cfg(manifest=str(manifest)))
    assert [i.image_id for i in items] == ["a", "imgs/b"]  # no image_id: the uri without suffix
    assert items[0].uri == str(tmp_path / "imgs" / "a.jpg")  # relative to the manifest
    assert dict(items[0].metadata) == {"site": "north", "year": 2021, "weight": 0.5, "public": True}
    assert dict(items[1].metadata) == {"site": "south", "year": 2022, "weight": 1.5, "public": False}


def test_manifest_through_a_filesystem_uri(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "list.parquet")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"abc")
    items = list_gallery(_cfg(manifest=f"file://{manifest}"))
    assert items[0].uri == f"file://{tmp_path}/imgs/a.jpg"
    assert read_uri(items[0].uri) == b"abc"


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "nouri.jsonl"
    bad.write_text('{"path": "x.jpg"}\n')
    with pytest.raises(ValueError, match="needs a 'uri' column"):
        list_gallery(_cfg(manifest=str(bad)))
    partial = tmp_path / "partial.jsonl"
    partial.write_text('{"uri": "x.jpg", "site": "s"}\n')
    with pytest.raises(ValueError, match=r"missing as columns: \['public', 'weight', 'year'\]"):
        list_gallery(_cfg(manifest=str(partial)))
    with pytest.raises(ValueError, match="unknown format"):
        list_gallery(_cfg(manifest=str(tmp_path / "list.txt")))


def test_coco_and_reircoco_annotations(tmp_path: Path) -> None:
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [
        {"id": 7, "file_name": "images/test/syn000007.jpg", "image_key": "syn000007", "width": 64},
        {"id": 9, "file_name": "images/test/x.jpg"},
    ], "annotations": []}))  # fmt: skip
    items = list_gallery(IngestConfig(model_path="/m", annotations=coco, milvus=MilvusConfig(metadata_fields={"width": "int"})))
    assert [(i.image_id, i.metadata["width"]) for i in items] == [("9", 0), ("syn000007", 64)]
    assert items[1].uri == str(tmp_path / "images" / "test" / "syn000007.jpg")
    refs = tmp_path / "reircoco.json"
    refs.write_text(json.dumps([
        {"image_id": "s1", "file_name": "images/train/s1.jpg", "split": "train"},
        {"image_id": "s2", "file_name": "images/test/s2.jpg", "split": "test"},
        {"image_id": "s2", "file_name": "images/test/s2.jpg", "split": "test"},  # one image, two refs
    ]))  # fmt: skip
    items = list_gallery(IngestConfig(model_path="/m", annotations=refs, annotations_root=tmp_path / "r", split="test"))
    assert [(i.image_id, i.uri) for i in items] == [("s2", str(tmp_path / "r" / "images" / "test" / "s2.jpg"))]
