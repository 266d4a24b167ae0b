"""The synthetic benchmark: determinism, layout, and exactness of its ground truth.

Ground truth is re-derived here from the files alone: scenes are rebuilt from the COCO
instances file, each sentence's stored program is checked against its text (every
content word said, typos undone; template sentences are parsed back exactly), and every
instance of the split is evaluated with the predicate API; stored ``matches`` must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from reir.data.formats import negative_groups
from reir.data.language import parse, template_phrases
from reir.data.layouts import REGIMES
from reir.data.phrasing import HELDOUT_FAMILIES, TRAIN_FAMILIES, canonical_words, meaning_words, mentioned
from reir.data.semantics import MAYBE, YES, Expr, Gallery, evaluate
from reir.data.synth import DEFAULT_HELDOUT, DEFAULT_REGIMES, MIN_TRAIN_CHUNK, generate, load_gallery, progress_total
from reir.data.vocab import VOCABULARY


def _read(root: Path, name: str) -> Any:
    return json.loads((root / name).read_text())


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _truth_table(gallery: Gallery, expr: Expr) -> dict[int, set[tuple[str, int]]]:
    """Brute force over every instance of the gallery (no index shortcuts)."""
    out: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for scene in gallery.scenes:
        for i, obj in enumerate(scene.objects):
            out[evaluate(expr, scene, i)].add((scene.image_id, obj.ann_id))
    return out


def _sentence_expr(sentence: dict[str, Any]) -> Expr:
    """The stored program, once the text is shown to say it (phrasings vary, meaning does not)."""
    expr = Expr.from_program(sentence["program"])
    assert mentioned(sentence["raw"]) == meaning_words(expr), sentence["raw"]
    if sentence["family"] == "template":
        assert parse(" ".join(canonical_words(sentence["raw"]))) == expr, sentence["raw"]
    return expr


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    ticks: list[int] = []
    a = generate(tmp_path / "a", num_images=24, seed=3, discovery_queries=6, progress=ticks.append)
    b = generate(tmp_path / "b", num_images=24, seed=3, discovery_queries=6)
    assert sum(ticks) == progress_total(24) == 48 and len(ticks) > 24  # drawn one by one, then planned
    files_a, files_b = _all_files(Path(a.out_dir)), _all_files(Path(b.out_dir))
    assert files_a.keys() == files_b.keys()
    assert all(files_a[k] == files_b[k] for k in files_a)


def test_processes_write_the_same_benchmark(tmp_path: Path) -> None:
    """Drawing and planning in two processes (as a large benchmark does) gives the bytes one
    process writes: each image and each chunk of images has its own random stream. In a fresh
    interpreter: generate falls back to one process where threads are alive."""
    one = generate(tmp_path / "one", num_images=60, seed=5, discovery_queries=6, workers=1)
    script = ("import sys; from reir.data.synth import generate; "
              "s = generate(sys.argv[1], num_images=60, seed=5, discovery_queries=6, workers=2); print(s.processes)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "two")], capture_output=True, text=True,
                          timeout=300, check=True)  # fmt: skip
    assert one.processes == 1 and done.stdout.split() == ["2"], done.stderr
    files_one, files_two = _all_files(tmp_path / "one"), _all_files(tmp_path / "two")
    assert files_one.keys() == files_two.keys() and len(files_one) > 60
    assert [k for k in files_one if files_one[k] != files_two[k]] == []
    with pytest.raises(ValueError, match="workers"):
        generate(tmp_path / "none", num_images=4, workers=0)


def test_different_seed_differs(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", num_images=24, seed=3, discovery_queries=6)
    b = generate(tmp_path / "b", num_images=24, seed=4, discovery_queries=6)
    files_a, files_b = _all_files(Path(a.out_dir)), _all_files(Path(b.out_dir))
    assert files_a["reircoco.json"] != files_b["reircoco.json"]
    images = [k for k in files_a if k.endswith(".jpg")]
    assert any(files_a[k] != files_b.get(k) for k in images)


def test_layout_and_meta(synth_root: Path) -> None:
    meta = _read(synth_root, "meta.json")
    assert meta["seed"] == 7 and meta["num_images"] == 150 and meta["image_size"] == 128
    assert set(meta["splits"]) == {"train", "test"}
    assert meta["splits"]["test"]["matches_scope"] == "gallery"
    for split in ("train", "test"):
        coco = _read(synth_root, f"instances_{split}.json")
        assert len(coco["images"]) == meta["splits"][split]["num_images"]
        for img in coco["images"]:
            assert img["file_name"] == f"images/{split}/{img['image_key']}.jpg"
            assert img["image_key"] == f"syn{img['id']:06d}"
            with Image.open(synth_root / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])


def test_splits_are_disjoint(synth_root: Path) -> None:
    ids = {s: {i["image_key"] for i in _read(synth_root, f"instances_{s}.json")["images"]} for s in ("train", "test")}
    assert ids["train"] and ids["test"] and not ids["train"] & ids["test"]
    assert len(ids["train"]) + len(ids["test"]) == 150
    for entry in _read(synth_root, "reircoco.json"):
        assert entry["image_id"] in ids[entry["split"]]
        assert entry["file_name"].startswith(f"images/{entry['split']}/")
    for q in _read(synth_root, "discovery.json")["queries"]:
        assert all(m["image_id"] in ids[q["split"]] for m in q["matches"])


def test_boxes_inside_images_and_sizes_distinct(synth_root: Path) -> None:
    for split in ("train", "test"):
        coco = _read(synth_root, f"instances_{split}.json")
        sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
        regimes = {i["id"]: REGIMES[i["regime"]] for i in coco["images"]}
        per_image: dict[int, int] = defaultdict(int)
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
            side = max(w, h) / width
            if ann["attributes"]["size"] == "small":
                assert side <= 0.15
            else:
                assert side >= 0.2
            assert ann["attributes"]["visible_fraction"] >= 0.75 - 1e-6
            per_image[ann["image_id"]] += 1
        # Object counts follow each image's scene regime (3 to 13 objects in all).
        assert all(regimes[k].counts[0] <= n <= regimes[k].counts[1] for k, n in per_image.items())
        assert len(per_image) == len(sizes)


def test_scene_regimes_are_recorded_and_held_out(synth_root: Path) -> None:
    """Held-out regimes never reach the train split but do reach the test split; every
    entry and COCO image names its regime, and meta.json counts agree with the files."""
    meta = _read(synth_root, "meta.json")
    info = meta["regimes"]
    assert info["train_mixture"] == DEFAULT_REGIMES and info["heldout"] == list(DEFAULT_HELDOUT)
    assert set(info["definitions"]) == set(DEFAULT_REGIMES) | set(DEFAULT_HELDOUT)
    by_key: dict[str, str] = {}
    for split in ("train", "test"):
        coco = _read(synth_root, f"instances_{split}.json")
        counts = Counter(img["regime"] for img in coco["images"])
        assert info["counts"][split] == dict(counts)
        objects = Counter(a["image_id"] for a in coco["annotations"]).values()
        stats = meta["splits"][split]["objects_per_image"]
        assert (stats["min"], stats["max"]) == (min(objects), max(objects))
        assert stats["mean"] == pytest.approx(sum(objects) / len(objects), abs=1e-3)
        by_key.update({img["image_key"]: img["regime"] for img in coco["images"]})
    train, test = set(info["counts"]["train"]), set(info["counts"]["test"])
    assert train <= set(DEFAULT_REGIMES) and not train & set(DEFAULT_HELDOUT)
    assert set(DEFAULT_HELDOUT) <= test and len(test) >= 4
    for entry in _read(synth_root, "reircoco.json"):
        assert entry["regime"] == by_key[entry["image_id"]]


def test_regime_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown regime"):
        generate(tmp_path, num_images=4, regimes={"sparse": 1.0, "crowded": 1.0})
    with pytest.raises(ValueError, match="held-out"):
        generate(tmp_path, num_images=4, regimes={"sparse": 1.0, "row": 0.5}, heldout_regimes=("row",))
    with pytest.raises(ValueError, match="positive sum"):
        generate(tmp_path, num_images=4, regimes={"sparse": 0.0})


def test_every_test_sentence_names_exactly_its_referent(synth_root: Path) -> None:
    """One or two referents per test image, each described twice with one program: in a
    training family and in a held-out family."""
    gallery = load_gallery(synth_root, "test")
    test_images = {s.image_id for s in gallery.scenes}
    per_image: dict[str, int] = defaultdict(int)
    entries = [e for e in _read(synth_root, "reircoco.json") if e["split"] == "test"]
    assert entries
    for entry in entries:
        referent = (entry["image_id"], entry["ref_anno"]["ann_id"])
        for sentence in entry["sentences"]:
            table = _truth_table(gallery, _sentence_expr(sentence))
            assert table[YES] == {referent}, sentence["raw"]
            assert not table[MAYBE], sentence["raw"]
            assert [(m["image_id"], m["ann_id"]) for m in sentence["matches"]] == [referent]
        families = [s["family"] for s in entry["sentences"]]
        assert len(families) == 2 and families[0] in TRAIN_FAMILIES and families[1] in HELDOUT_FAMILIES
        assert entry["sentences"][0]["program"] == entry["sentences"][1]["program"]
        per_image[entry["image_id"]] += 1
    assert all(1 <= n <= 2 for n in per_image.values())
    assert len(per_image) >= 0.8 * len(test_images)


def test_train_sentences_are_unique_within_their_chunk(synth_root: Path) -> None:
    """Train sentences name one instance among a chunk of train images as large as the
    test gallery (so cross-image CLIA negatives are true negatives)."""
    meta = _read(synth_root, "meta.json")
    _assert_unique_within_chunks(synth_root, max(MIN_TRAIN_CHUNK, meta["splits"]["test"]["num_images"]))


def test_a_training_only_benchmark_plans_in_the_chunks_asked_for(tmp_path: Path) -> None:
    """``train_chunk``: training images without a test split of their size (make demo's extra
    images for the re-ranker) are planned in chunks as large as asked, not MIN_TRAIN_CHUNK."""
    generate(tmp_path, num_images=48, test_fraction=0.0, image_size=64, seed=5, discovery_queries=0,
             train_discovery_queries=0, train_chunk=20)
    _assert_unique_within_chunks(tmp_path, 20)
    train = [s.image_id for s in load_gallery(tmp_path, "train").scenes]
    assert negative_groups(tmp_path, "train", train) == [k // 20 for k in range(len(train))]
    with pytest.raises(ValueError, match="train_chunk"):
        generate(tmp_path / "bad", num_images=10, train_chunk=0)


def _assert_unique_within_chunks(synth_root: Path, chunk: int) -> None:
    meta = _read(synth_root, "meta.json")
    assert meta["splits"]["train"]["matches_scope"] == f"chunk of {chunk} train images"
    gallery = load_gallery(synth_root, "train")
    order = [s.image_id for s in gallery.scenes]
    assert order == sorted(order)
    entries = [e for e in _read(synth_root, "reircoco.json") if e["split"] == "train"]
    covered = 0
    for entry in entries:
        pos = order.index(entry["image_id"])
        scenes = Gallery(gallery.scenes[pos - pos % chunk: pos - pos % chunk + chunk])
        referent = (entry["image_id"], entry["ref_anno"]["ann_id"])
        for sentence in entry["sentences"]:
            table = _truth_table(scenes, _sentence_expr(sentence))
            assert table[YES] == {referent}, sentence["raw"]
            assert not table[MAYBE], sentence["raw"]
            assert [(m["image_id"], m["ann_id"]) for m in sentence["matches"]] == [referent]
            assert sentence["family"] in TRAIN_FAMILIES
        assert len({s["raw"] for s in entry["sentences"]}) == len(entry["sentences"])
        covered += 1
    n_instances = sum(len(s.objects) for s in gallery.scenes)
    assert covered >= 0.5 * n_instances  # most objects are described


def test_discovery_matches_are_exact(synth_root: Path) -> None:
    gallery = load_gallery(synth_root, "test")
    boxes = {(s.image_id, o.ann_id): list(o.box) for s in gallery.scenes for o in s.objects}
    queries = [q for q in _read(synth_root, "discovery.json")["queries"] if q["split"] == "test"]
    assert len(queries) == 24
    counts = [len(q["matches"]) for q in queries]
    assert 0 in counts and any(c >= 2 for c in counts)
    for q in queries:
        assert q["split"] == "test" and len(q["matches"]) != 1
        table = _truth_table(gallery, _sentence_expr(q))
        stored = {(m["image_id"], m["ann_id"]) for m in q["matches"]}
        assert stored == table[YES] and not table[MAYBE], q["raw"]
        assert all(m["bbox"] == boxes[(m["image_id"], m["ann_id"])] for m in q["matches"])


def test_training_discovery_queries_are_exact_within_their_chunk(synth_root: Path) -> None:
    """Training discovery queries list every clear match of their chunk (the negative group
    they are complete over), none borderline, and use training phrasings only."""
    meta = _read(synth_root, "meta.json")
    chunk = meta["splits"]["train"]["chunk_size"]
    gallery = load_gallery(synth_root, "train")
    queries = [q for q in _read(synth_root, "discovery.json")["queries"] if q["split"] == "train"]
    n_chunks = -(-len(gallery.scenes) // chunk)
    assert n_chunks >= 2 and len(queries) == 8 * n_chunks == meta["discovery"]["train"]
    assert 0 < meta["discovery"]["train_empty"] < len(queries)
    for q in queries:
        scenes = Gallery(gallery.scenes[q["group"] * chunk: (q["group"] + 1) * chunk])
        table = _truth_table(scenes, _sentence_expr(q))
        assert {(m["image_id"], m["ann_id"]) for m in q["matches"]} == table[YES] and not table[MAYBE], q["raw"]
        assert q["family"] in TRAIN_FAMILIES and len(q["matches"]) != 1


def test_training_discovery_queries_never_shift_the_test_split(tmp_path: Path) -> None:
    """Their own random streams: the test gallery, its sentences and discovery queries are the
    same bytes with or without them."""
    kw = {"num_images": 60, "test_fraction": 0.25, "image_size": 64, "seed": 3, "discovery_queries": 6}
    with_train, without = tmp_path / "a", tmp_path / "b"
    generate(with_train, train_discovery_queries=5, **kw)
    generate(without, train_discovery_queries=0, **kw)
    for name in ("reircoco.json", "instances_test.json", "instances_train.json"):
        assert (with_train / name).read_bytes() == (without / name).read_bytes()
    tests = [[q for q in _read(root, "discovery.json")["queries"] if q["split"] == "test"] for root in (with_train, without)]
    assert tests[0] == tests[1] and len(tests[0]) == 6
    assert sum(q["split"] == "train" for q in _read(with_train, "discovery.json")["queries"]) == 5


def test_every_emitted_word_is_in_the_vocabulary(synth_root: Path) -> None:
    vocab = set(VOCABULARY)
    assert len(vocab) == len(VOCABULARY)
    assert {w for phrase in template_phrases() for w in phrase.split()} <= vocab
    texts = [s["raw"] for e in _read(synth_root, "reircoco.json") for s in e["sentences"]]
    texts += [q["raw"] for q in _read(synth_root, "discovery.json")["queries"]]
    # Surface noise adds capitals, punctuation and at most one misspelt word per sentence.
    assert {w for t in texts for w in canonical_words(t)} <= vocab
    for text in texts:
        raw = text.lower().replace("-", " ").split()
        assert sum(w.strip(",.?:") not in vocab | {"coloured"} for w in raw) <= 1, text


def test_invalid_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, num_images=0)


def test_a_run_into_an_earlier_runs_folder_leaves_only_its_own_images(tmp_path: Path) -> None:
    generate(tmp_path, num_images=30, test_fraction=0.2, image_size=64, seed=1, discovery_queries=0)
    mine = tmp_path / "images" / "test" / "notes.txt"  # not the generator's: left alone
    mine.write_text("kept")
    summary = generate(tmp_path, num_images=40, test_fraction=0.5, image_size=64, seed=1, discovery_queries=0)
    for split in ("train", "test"):
        on_disk = {p.name for p in (tmp_path / "images" / split).glob("*.jpg")}
        listed = {Path(img["file_name"]).name for img in _read(tmp_path, f"instances_{split}.json")["images"]}
        assert on_disk == listed, split  # the gallery folder holds its split alone
    assert summary.stale_removed > 0 and mine.read_text() == "kept"
    again = generate(tmp_path, num_images=40, test_fraction=0.5, image_size=64, seed=1, discovery_queries=0)
    assert again.stale_removed == 0
