"""Multi-match ground truth: every instance a sentence's ``matches`` name is an acceptable answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reir.data.formats import load_reircoco, queries_from_reircoco, save_reircoco, test_queries
from reir.evaluation.metrics import Prediction, box_recall_at_k, is_hit, rec_accuracy
from reir.evaluation.runner import evaluate_predictions, load_queries

BOX_A1 = [10.0, 10.0, 20.0, 20.0]  # synA's referent
BOX_A2 = [60.0, 10.0, 20.0, 20.0]  # synA's second match
BOX_A3 = [10.0, 60.0, 20.0, 20.0]  # synA's distractor
BOX_B5 = [30.0, 30.0, 25.0, 25.0]  # synB (its own entry)
BOX_C7 = [5.0, 70.0, 15.0, 15.0]  # synC: only in instances_test.json
BOX_D9 = [40.0, 40.0, 10.0, 10.0]  # synD: only the match's own bbox


def _anno(ann_id: int, box: list[float]) -> dict[str, Any]:
    return {"ann_id": ann_id, "bbox": box, "category_name": "circle", "category_id": 0}


def _entry(image_id: str, ref: dict[str, Any], dets: list[dict[str, Any]], sentences: list[dict[str, Any]],
           split: str = "test") -> dict[str, Any]:
    return {"image_id": image_id, "file_name": f"images/{split}/{image_id}.jpg", "height": 100, "width": 100,
            "split": split, "sentences": sentences, "ref_anno": ref, "det_anno": dets}


def _write(root: Path, matches: list[dict[str, Any]] | None) -> Path:
    """Four test images; sentence s1 of synA with ``matches`` (None: the key left out)."""
    root.mkdir(parents=True, exist_ok=True)
    s1: dict[str, Any] = {"sent_id": "s1", "raw": "the circle"}
    if matches is not None:
        s1["matches"] = matches
    entries = [
        _entry("synA", _anno(1, BOX_A1), [_anno(1, BOX_A1), _anno(2, BOX_A2), _anno(3, BOX_A3)], [s1]),
        _entry("synB", _anno(5, BOX_B5), [_anno(5, BOX_B5)], [{"sent_id": "s2", "raw": "the lone circle",
                                                                 "matches": []}]),
    ]
    (root / "reircoco.json").write_text(json.dumps(entries))
    coco = {"images": [{"id": 3, "image_key": "synC", "file_name": "images/test/synC.jpg", "width": 100,
                        "height": 100}],
            "annotations": [{"id": 7, "image_id": 3, "category_id": 0, "bbox": BOX_C7}],
            "categories": [{"id": 0, "name": "circle"}]}
    (root / "instances_test.json").write_text(json.dumps(coco))
    return root


ALL_MATCHES = [{"image_id": "synA", "ann_id": 1}, {"image_id": "synA", "ann_id": 2},
               {"image_id": "synB", "ann_id": 5}, {"image_id": "synC", "ann_id": 7},
               {"image_id": "synD", "ann_id": 9, "bbox": BOX_D9}]


def test_every_match_is_a_target_resolved_from_entries_instances_or_bbox(tmp_path: Path) -> None:
    root = _write(tmp_path / "bench", ALL_MATCHES)
    q1, q2 = test_queries(root)
    assert (q1.image_id, q1.box, q1.objects) == ("synA", tuple(BOX_A1), 3)
    assert q1.ground_truth == (("synA", tuple(BOX_A1)), ("synA", tuple(BOX_A2)), ("synB", tuple(BOX_B5)),
                               ("synC", tuple(BOX_C7)), ("synD", tuple(BOX_D9)))
    # no matches: the entry's referent is the one target, as before
    assert q2.targets == () and q2.ground_truth == (("synB", tuple(BOX_B5)),)


def test_a_prediction_hitting_a_non_entry_match_counts_and_right_box_wrong_image_does_not(tmp_path: Path) -> None:
    (q1, q2) = test_queries(_write(tmp_path / "bench", ALL_MATCHES))
    predictions = {
        "s1": [Prediction("synB", BOX_B5)],  # another image's match: a hit
        "s2": [Prediction("synA", BOX_B5)],  # the right box in the wrong image: a miss
    }
    assert evaluate_predictions(predictions, [q1, q2])["BR@1@0.5"] == 0.5
    # a match found only in the instances file, at rank 3
    late = {"s1": [Prediction("synA", BOX_A3), Prediction("synD", BOX_A1), Prediction("synC", BOX_C7)]}
    recall = box_recall_at_k(late, {"s1": q1}, ks=(1, 5), taus=(0.5,))
    assert recall == {"BR@1@0.5": 0.0, "BR@5@0.5": 1.0}
    assert is_hit("synD", BOX_D9, q1) and not is_hit("synA", BOX_A3, q1)


def test_rec_accuracy_accepts_any_target_of_the_query_s_own_image(tmp_path: Path) -> None:
    (q1,) = test_queries(_write(tmp_path / "bench", ALL_MATCHES))[:1]
    truth = {"s1": q1}
    assert rec_accuracy({"s1": BOX_A2}, truth, taus=(0.5,)) == {"REC_Acc@0.5": 1.0}  # the second match
    assert rec_accuracy({"s1": BOX_A3}, truth, taus=(0.5,)) == {"REC_Acc@0.5": 0.0}  # a distractor
    # a box equal to another image's target, predicted inside synA: no target of synA is there
    assert rec_accuracy({"s1": BOX_B5}, truth, taus=(0.5,)) == {"REC_Acc@0.5": 0.0}


def test_absent_matches_keep_the_referent_and_the_file_round_trips(tmp_path: Path) -> None:
    root = _write(tmp_path / "bench", None)
    (q1, _) = test_queries(root)
    assert q1.ground_truth == (("synA", tuple(BOX_A1)),)
    entries = load_reircoco(root / "reircoco.json")
    save_reircoco(tmp_path / "again.json", entries)
    assert load_reircoco(tmp_path / "again.json") == entries


def test_an_unresolvable_ann_id_names_the_file_sentence_and_ann_id(tmp_path: Path) -> None:
    root = _write(tmp_path / "bench", [{"image_id": "synA", "ann_id": 1}, {"image_id": "synE", "ann_id": 77}])
    with pytest.raises(ValueError, match=r"reircoco\.json: .*sentence 's1': match ann_id 77 in image 'synE' has no box"):
        test_queries(root)


def test_annotations_file_with_images_elsewhere_and_another_split(tmp_path: Path) -> None:
    root = _write(tmp_path / "bench", ALL_MATCHES)
    data = json.loads((root / "reircoco.json").read_text())
    data[1]["split"] = "val"
    # no instances file beside this one: synC's match could not be resolved
    data[0]["sentences"][0]["matches"] = [m for m in ALL_MATCHES if m["image_id"] != "synC"]
    ann = tmp_path / "refs" / "mine.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(data))
    (val,) = load_queries(root, "val", ann)
    assert val.query_id == "s2" and val.path == str((root / "images/test/synB.jpg").resolve())
    (q1,) = load_queries(None, "test", ann)  # images beside the file; no instances file there
    assert q1.path == str((ann.parent / "images/test/synA.jpg").resolve())
    with pytest.raises(ValueError, match=r"no entries of split 'train' \(splits: \['test', 'val'\]\)"):
        queries_from_reircoco(ann, "train")
