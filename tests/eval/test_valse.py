"""VALSE evaluator on fabricated files in the released format (file names, record fields, {id: record} nesting) with
tiny images in each piece's own image folder. A colour encoder makes every answer known: an image embeds as its
RGB colour, a text as the colour word it names, so "red image, caption red, foil green" is right, a green image
wrong, and a yellow image (equally red and green) a tie. Every expected number below is worked out by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from degla_scale.eval.common import EvalDataError
from degla_scale.eval.valse import ALL_PIECES, evaluate_valse, keep

RED, GREEN, YELLOW = (255, 0, 0), (0, 255, 0), (255, 255, 0)
COLOUR_AXES = {"red": 0, "green": 1, "blue": 2}
CAPTION, FOIL = "There is a red thing in the picture.", "There is a green thing in the picture."


class ColourEncoder:
    """Image → its unit RGB colour; text → the unit axis of the colour word it names."""

    def images(self, refs, desc="images"):
        rgb_N3 = torch.tensor([ref.load().getpixel((0, 0)) for ref in refs], dtype=torch.float32)
        return rgb_N3 / rgb_N3.norm(dim=-1, keepdim=True)

    def texts(self, texts, desc="texts"):
        out_N3 = torch.zeros(len(texts), 3)
        for i, text in enumerate(texts):
            out_N3[i, next(axis for word, axis in COLOUR_AXES.items() if word in text)] = 1.0
        return out_N3


# Each piece's folder under root/images and a released-looking image file name for sample i.
FOLDER_AND_NAME = {
    "existence": ("visual7w", lambda i: f"v7w_{2371040 + i}.jpg"),
    "plurals": ("coco/val2017", lambda i: f"{291610 + i:012d}.jpg"),
    "counting-hard": ("visual7w", lambda i: f"v7w_{100 + i}.jpg"),
    "counting-small-quant": ("visual7w", lambda i: f"v7w_{200 + i}.jpg"),
    "counting-adversarial": ("visual7w", lambda i: f"v7w_{300 + i}.jpg"),
    "relations": ("coco/val2017", lambda i: f"{462570 + i:012d}.jpg"),
    "action-replacement": ("swig", lambda i: f"exercising_{250 + i}.jpg"),
    "actant-swap": ("swig", lambda i: f"preaching_{110 + i}.jpg"),
    # VisDial v1.0 train: even samples from COCO train2014, odd ones from COCO val2014, as in the released file.
    "coreference-standard": (None, lambda i: f"COCO_{'train' if i % 2 == 0 else 'val'}2014_{254000 + i:012d}.jpg"),
    "coreference-hard": ("visdial", lambda i: f"VisualDialog_val2018_{284020 + i:012d}.jpg"),
    "foil-it": ("coco/val2014", lambda i: f"COCO_val2014_{165830 + i:012d}.jpg"),
}
DATASET = {"existence": "visual7w", "plurals": "coco2017", "relations": "coco_2017", "action-replacement": "SWiG",
           "actant-swap": "SWiG", "coreference-standard": "VisDial_v1.0", "coreference-hard": "VisDial_v1.0",
           "foil-it": "FOIL dataset"}


def folder_of(piece: str, image_file: str) -> str:
    folder = FOLDER_AND_NAME[piece][0]
    if folder is None:
        folder = "coco/train2014" if image_file.startswith("COCO_train2014_") else "coco/val2014"
    return folder


def write_piece(root: Path, piece: str, samples: list[tuple[tuple[int, int, int], int]], draw: bool = True) -> None:
    """data/<piece>.json with one record per (image colour, annotator votes for the caption), images beside."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    records = {}
    for i, (colour, caption_votes) in enumerate(samples):
        image_file = FOLDER_AND_NAME[piece][1](i)
        records[f"{piece}_test_{i}"] = {
            "dataset": DATASET.get(piece, "visual7w"),
            "original_split": "test",
            "dataset_idx": str(i),
            "linguistic_phenomena": piece.split("-")[0],
            "image_file": image_file,
            "caption": CAPTION,
            "classes": "red",
            "classes_foil": "green",
            "mturk": {"foil": 3 - caption_votes if caption_votes < 2 else 0, "caption": caption_votes,
                      "other": 0 if caption_votes < 2 else 3 - caption_votes},
            "foil": FOIL,
        }
        if draw:
            folder = root / "images" / folder_of(piece, image_file)
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), colour).save(folder / image_file, format="PNG")  # PNG bytes: exact colours
    (root / "data" / f"{piece}.json").write_text(json.dumps(records, indent=4))


RIGHT, WRONG = (RED, 3), (GREEN, 3)


def test_keep_needs_two_caption_votes():
    assert keep({"mturk": {"foil": 0, "caption": 3, "other": 0}})
    assert keep({"mturk": {"foil": 1, "caption": 2, "other": 0}})
    assert not keep({"mturk": {"foil": 2, "caption": 1, "other": 0}})
    assert not keep({"mturk": {"foil": 0, "caption": 1, "other": 2}})  # few foil votes do not make it valid
    assert not keep({"mturk": {"foil": 3, "caption": 0, "other": 0}})
    assert not keep({"caption": CAPTION, "foil": FOIL})  # never validated
    assert not keep({"mturk": None})


def test_tie_is_wrong_and_unvalidated_samples_are_dropped(tmp_path):
    write_piece(tmp_path, "existence", [
        (RED, 3),     # kept, right
        (YELLOW, 2),  # kept, tie: wrong
        (GREEN, 2),   # kept, wrong
        (RED, 2),     # kept, right
        (GREEN, 1),   # dropped (1 caption vote); would be wrong
        (GREEN, 0),   # dropped (0 caption votes); would be wrong
    ])
    # Kept: 2 right of 4 = 50.0. Without the filter: 2/6 = 33.3; with ties counted right: 3/4 = 75.0.
    result = evaluate_valse(ColourEncoder(), tmp_path, pieces=["existence"])
    assert result == {"existence": 50.0, "Existence": 50.0, "average": 50.0}


def test_dropped_samples_need_no_image(tmp_path):
    write_piece(tmp_path, "plurals", [RIGHT, (GREEN, 1)])
    (tmp_path / "images/coco/val2017" / f"{291611:012d}.jpg").unlink()  # the dropped sample's image
    assert evaluate_valse(ColourEncoder(), tmp_path, pieces=["plurals"])["plurals"] == 100.0


def test_full_suite_pieces_columns_and_average(tmp_path):
    samples = {
        "existence": [RIGHT],                                  # 1/1 = 100
        "plurals": [RIGHT, WRONG],                             # 1/2 = 50
        "counting-hard": [RIGHT, WRONG, (RED, 1)],             # 1/2 = 50 (the third is dropped)
        "counting-small-quant": [RIGHT, RIGHT, RIGHT, WRONG],  # 3/4 = 75
        "counting-adversarial": [RIGHT, (GREEN, 0)],           # 1/1 = 100 (the second is dropped)
        "relations": [WRONG],                                  # 0/1 = 0
        "action-replacement": [RIGHT],                         # 1/1 = 100
        "actant-swap": [RIGHT, WRONG],                         # 1/2 = 50
        "coreference-standard": [RIGHT, WRONG],                # train2014 image right, val2014 image wrong: 50
        "coreference-hard": [RIGHT, WRONG, WRONG, WRONG],      # 1/4 = 25
        "foil-it": [RIGHT],                                    # 1/1 = 100
    }
    for piece, rows in samples.items():
        write_piece(tmp_path, piece, rows)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(f"{p}.json" for p in ALL_PIECES)
    assert (tmp_path / "images/coco/train2014" / f"COCO_train2014_{254000:012d}.jpg").is_file()
    assert (tmp_path / "images/coco/val2014" / f"COCO_val2014_{254001:012d}.jpg").is_file()

    result = evaluate_valse(ColourEncoder(), tmp_path)
    expected = {
        "existence": 100.0, "plurals": 50.0, "counting-hard": 50.0, "counting-small-quant": 75.0,
        "counting-adversarial": 100.0, "relations": 0.0, "action-replacement": 100.0, "actant-swap": 50.0,
        "coreference-standard": 50.0, "coreference-hard": 25.0, "foil-it": 100.0,
        "Existence": 100.0, "Plurality": 50.0,
        "Counting": 75.0,  # (50 + 75 + 100) / 3; pooling the 7 kept samples would give 5/7 = 71.4
        "Spatial relations": 0.0,
        "Actions": 75.0,  # (100 + 50) / 2
        "Coreference": 37.5,  # (50 + 25) / 2
        "Foil-it": 100.0,
        "average": 700.0 / 11,  # over the 11 pieces (63.6); over the 7 columns it would be 437.5 / 7 = 62.5
    }
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_counting_column_is_the_mean_of_its_three_pieces(tmp_path):
    write_piece(tmp_path, "counting-hard", [RIGHT, WRONG])                      # 50
    write_piece(tmp_path, "counting-small-quant", [RIGHT, RIGHT, RIGHT, WRONG])  # 75
    write_piece(tmp_path, "counting-adversarial", [RIGHT])                      # 100
    counting = ["counting-hard", "counting-small-quant", "counting-adversarial"]
    result = evaluate_valse(ColourEncoder(), tmp_path, pieces=counting)
    assert result["Counting"] == pytest.approx(75.0)  # (50 + 75 + 100) / 3
    assert result["average"] == pytest.approx(75.0)
    partial = evaluate_valse(ColourEncoder(), tmp_path, pieces=counting[:2])
    assert "Counting" not in partial and partial["average"] == pytest.approx(62.5)  # (50 + 75) / 2


def test_missing_piece_file_is_an_error(tmp_path):
    write_piece(tmp_path, "existence", [RIGHT])
    with pytest.raises(EvalDataError, match=r"data[/\\]relations\.json"):
        evaluate_valse(ColourEncoder(), tmp_path, pieces=["existence", "relations"])
    write_piece(tmp_path, "foil-it", [RIGHT])
    encoder = RecordingEncoder()
    with pytest.raises(EvalDataError, match=r"plurals\.json"):  # all pieces by default: none is skipped
        evaluate_valse(encoder, tmp_path)
    assert encoder.calls == 0  # checked before any embedding


class RecordingEncoder(ColourEncoder):
    calls = 0

    def images(self, refs, desc="images"):
        self.calls += 1
        return super().images(refs, desc)


def test_missing_image_names_its_path_and_dataset(tmp_path):
    write_piece(tmp_path, "coreference-standard", [RIGHT, RIGHT])
    missing = tmp_path / "images/coco/val2014" / f"COCO_val2014_{254001:012d}.jpg"
    missing.unlink()
    write_piece(tmp_path, "existence", [RIGHT])
    encoder = RecordingEncoder()
    with pytest.raises(EvalDataError, match="COCO 2014 val") as err:
        evaluate_valse(encoder, tmp_path, pieces=["existence", "coreference-standard"])
    assert str(missing) in str(err.value)
    assert encoder.calls == 0  # not even the complete piece before it was embedded


def test_image_dirs_point_at_downloaded_folders(tmp_path):
    write_piece(tmp_path, "actant-swap", [RIGHT, WRONG])
    elsewhere = tmp_path / "downloads/SWiG/images_512"
    elsewhere.parent.mkdir(parents=True)
    (tmp_path / "images/swig").rename(elsewhere)
    with pytest.raises(EvalDataError, match="SWiG"):
        evaluate_valse(ColourEncoder(), tmp_path, pieces=["actant-swap"])
    result = evaluate_valse(ColourEncoder(), tmp_path, pieces=["actant-swap"], image_dirs={"swig": elsewhere})
    assert result == {"actant-swap": 50.0, "average": 50.0}  # no Actions column without action-replacement
    with pytest.raises(ValueError, match="unknown VALSE image sources"):
        evaluate_valse(ColourEncoder(), tmp_path, pieces=["actant-swap"], image_dirs={"SWiG": elsewhere})


def test_bad_requests_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="counting_hard"):  # the spelling of VALSE's own config.py, not the file
        evaluate_valse(ColourEncoder(), tmp_path, pieces=["counting_hard"])
    write_piece(tmp_path, "relations", [(RED, 1), (RED, 0)])
    with pytest.raises(EvalDataError, match="no validated sample"):
        evaluate_valse(ColourEncoder(), tmp_path, pieces=["relations"])
    write_piece(tmp_path, "coreference-standard", [RIGHT], draw=False)
    path = tmp_path / "data/coreference-standard.json"
    records = json.loads(path.read_text())
    next(iter(records.values()))["image_file"] = "254000.jpg"
    path.write_text(json.dumps(records))
    with pytest.raises(EvalDataError, match="COCO_train2014_"):
        evaluate_valse(ColourEncoder(), tmp_path, pieces=["coreference-standard"])
