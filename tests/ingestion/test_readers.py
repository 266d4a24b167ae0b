"""Gallery readers: manifests (jsonl / csv / parquet, local and pyarrow-filesystem URIs), COCO, REIRCOCO."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from reir.ingestion.gallery import image_id_for, list_gallery, read_uri
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


def test_a_folder_tree_of_real_file_names_gets_safe_unique_ids(tmp_path: Path) -> None:
    names = ["2024/a trip/IMG 0001.jpg", "2024/a_trip/IMG_0001.jpg", "2024/a-trip/IMG_0001.jpg",
             "ünï cödé/日本 [1].png", "other/it's \"quoted\".webp", "other/x.jpg", "other/x.png",
             "other/100%.jpeg", ".thumbs/skip.jpg", "other/notes.txt"]  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not decoded here")
    items = list_gallery(IngestConfig(model_path="/m", gallery_root=tmp_path))
    by_uri = {Path(i.uri).relative_to(tmp_path).as_posix(): i.image_id for i in items}
    assert set(by_uri) == set(names[:8])  # hidden folders and non-images are skipped
    assert by_uri["2024/a_trip/IMG_0001.jpg"] == "2024/a_trip/IMG_0001"  # already safe: unchanged
    assert by_uri["2024/a-trip/IMG_0001.jpg"] == "2024/a-trip/IMG_0001"
    assert by_uri["2024/a trip/IMG 0001.jpg"].startswith("2024/a_trip/IMG_0001~")  # folded + hashed: no clash
    assert by_uri["other/x.jpg"] == "other/x.jpg" and by_uri["other/x.png"] == "other/x.png"  # same stem
    assert len(set(by_uri.values())) == len(by_uri)
    for image_id in by_uri.values():
        assert re.fullmatch(r"[A-Za-z0-9_.\-/]+(~[0-9a-f]{10})?", image_id), image_id
    assert image_id_for("ünï cödé/日本 [1]") == by_uri["ünï cödé/日本 [1].png"]  # stable across runs
    assert image_id_for("ünï cödé/日本 [1]").startswith("uni_code/1~")
    assert len(image_id_for("/".join(["a long folder name"] * 40))) <= 256


def test_image_dir_listing_follows_links_and_scales(tmp_path: Path) -> None:
    """Real paths as uris (a linked folder, a linked file), hidden entries skipped, and ids
    that stay distinct where only the suffix differs, on a listing of thousands of files."""
    from reir.ingestion.gallery import list_image_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "far.jpg").write_bytes(b"x")
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.jpg").write_bytes(b"x")
    (root / "a" / ".dot.jpg").write_bytes(b"x")
    for i in range(3000):
        (root / "a" / f"p{i:05d}.jpg").write_bytes(b"x")
    (root / "a" / "p00000.png").write_bytes(b"x")  # same stem, other suffix
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "one.jpg").symlink_to(outside / "far.jpg")
    items = {it.image_id: it.uri for it in list_image_dir(root)}
    assert len(items) == 3000 + 1 + 2
    assert items["a/p00000.jpg"].endswith("a/p00000.jpg") and items["a/p00000.png"].endswith(".png")
    assert items["a/p00001"] == str((root / "a" / "p00001.jpg").resolve())
    assert items["linked/far"] == items["one"] == str((outside / "far.jpg").resolve())
    assert not any("hidden" in i or "dot" in i for i in items)
