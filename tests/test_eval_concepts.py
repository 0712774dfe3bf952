"""Concept recall scoring of a run, with a stand-in detector (the mini world's real one is tested there)."""

import json

import pytest
from PIL import Image

from cmlora.evaluate import concepts
from cmlora.evaluate.runs import read_jsonl


def test_recall_arithmetic():
    expected = {"character": "character_1", "background": "background_2", "style": "style_1"}
    assert concepts.concept_recall(
        expected, {"character": "character_1", "background": None, "style": "style_1"}
    ) == (pytest.approx(2 / 3), False)
    assert concepts.concept_recall(expected, dict(expected)) == (1.0, True)


def test_score_run_resumes_and_feeds_the_report(tmp_path, monkeypatch):
    import cmlora.mini.detectors as detectors

    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    colours = {"red": "character_1", "blue": "character_2"}
    lines = []
    for k, (colour, char) in enumerate(colours.items()):
        Image.new("RGB", (8, 8), colour).save(run / "images" / f"{k}.png")
        lines.append(
            {
                "image": f"images/{k}.png",
                "job_id": f"j{k}",
                "composition_id": f"c{k}",
                "n": 2,
                "method": "merge",
                "seed": k,
                "seed_index": 0,
                "prompt": "p",
                "loras": [
                    {"name": char, "category": "character", "triggers": ["t"]},
                    {"name": "object_1", "category": "object", "triggers": ["o"]},
                ],
            }
        )
    (run / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    calls = []

    def fake_detect(images):
        calls.append(len(images))
        return [
            {"character": "character_1" if im.getpixel((0, 0))[0] > 128 else None, "object": "object_1"}
            for im in images
        ]

    monkeypatch.setattr(detectors, "detect", fake_detect)
    out = concepts.score_run(run, progress=False)
    rows = {r["image"]: r for r in read_jsonl(out)}
    assert rows["images/0.png"]["recall"] == 1.0 and rows["images/0.png"]["all_present"] is True
    assert rows["images/1.png"]["recall"] == 0.5 and rows["images/1.png"]["all_present"] is False
    concepts.score_run(run, progress=False)  # nothing left to score
    assert calls == [2]

    from cmlora.evaluate.report import build_report

    data = build_report(run, n_resamples=50)
    assert data.has_concepts
