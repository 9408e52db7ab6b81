"""VQA as LiMBer evaluates it: VQAv2's accuracy and answer normalisation, the data format, the shapes set."""
import json

import pytest

from clipforge.captioning.vqa import image_files, load_vqa, normalize_answer, shapes_vqa, vqa_accuracy


def test_answers_are_normalised_as_vqav2_does():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("The red one.") == "red 1"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("  A  Yellow\tCircle ") == "yellow circle"
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"


def test_vqa_accuracy_averages_min_count_over_3_leaving_each_annotator_out():
    answers = ["two"] * 3 + ["3"] * 7
    # 3 annotators said "2": leaving one of them out leaves 2 matches (2/3), leaving any other out leaves 3 (1)
    assert vqa_accuracy("2", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("3", answers) == 1.0 and vqa_accuracy("four", answers) == 0.0
    assert vqa_accuracy("Red.", ["red"]) == 1.0  # a single answer: exact match after normalisation


def test_shapes_question_set_is_vqav2_format_with_known_answers(tmp_path):
    images, questions, annotations = shapes_vqa(tmp_path, n_images=9, seed=1)
    items = load_vqa(questions, annotations)
    assert {item["question"] for item in items} == {"What colour is the shape?", "What shape is it?",
                                                    "Where is the shape?", "How many shapes are there?"}
    counts = [item["answers"][0] for item in items if item["question"].startswith("How many")]
    assert counts == ["1", "2", "3"] * 3 and all(len(item["answers"]) == 10 for item in items)
    files = image_files(images, [item["image_id"] for item in items])
    assert len(files) == 9 and files[4].name == "4.png"
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    assert image_files(tmp_path / "coco", [42])[42].name.endswith("42.jpg")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="has no annotation"):
        load_vqa(questions, bad)
