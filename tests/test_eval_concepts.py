"""Concept scoring of a run, with a stand-in judge (the mini world's real one is tested there)."""

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

    def fake_judge(images):
        import numpy as np

        from cmlora.mini import world

        calls.append(len(images))
        n = len(images)
        proba = {cat: np.zeros((n, len(detectors.CLASSES[cat]))) for cat in world.CATEGORIES}
        graded = np.zeros((n, len(world.CONCEPT_IDS)))
        for i, im in enumerate(images):
            red = im.getpixel((0, 0))[0] > 128
            for cat in world.CATEGORIES:
                proba[cat][i, 0] = 1.0
            proba["character"][i] = 0.0
            proba["character"][i, 1 if red else 0] = 1.0
            proba["object"][i] = 0.0
            proba["object"][i, 1] = 1.0
            graded[i, world.CONCEPT_IDS.index("character_1")] = 0.9 if red else 0.3
            graded[i, world.CONCEPT_IDS.index("character_2")] = 0.2
            graded[i, world.CONCEPT_IDS.index("object_1")] = 0.7
        return detectors.Judgement(proba, graded, np.array([1.0 + i for i in range(n)]))

    monkeypatch.setattr(detectors, "judge", fake_judge)
    out = concepts.score_run(run, progress=False)
    rows = {r["image"]: r for r in read_jsonl(out)}
    assert rows["images/0.png"]["recall"] == 1.0 and rows["images/0.png"]["all_present"] is True
    assert rows["images/1.png"]["recall"] == 0.5 and rows["images/1.png"]["all_present"] is False
    # graded: mean over the composition's concepts (character_1 + object_1, character_2 + object_1)
    assert rows["images/0.png"]["graded"] == pytest.approx((0.9 + 0.7) / 2)
    assert rows["images/1.png"]["graded"] == pytest.approx((0.2 + 0.7) / 2)
    assert [rows[f"images/{k}.png"]["artifact"] for k in range(2)] == [1.0, 2.0]
    concepts.score_run(run, progress=False)  # nothing left to score
    assert calls == [2]

    from cmlora.evaluate.report import build_report

    data = build_report(run, n_resamples=50)
    assert data.has_concepts
    # every score names its judge; another judge (retrained, recalibrated) is refused until the run is
    # scored afresh, and a rescore that cannot read an image leaves the old scores as they were
    assert {r["judge"] for r in read_jsonl(out)} == {detectors.judge_id()}
    monkeypatch.setattr(detectors, "judge_id", lambda path=None: "0123456789abcdef")
    with pytest.raises(concepts.ManifestError, match=r"another judge \(.*; this one is 0123456789abcdef\)"):
        concepts.score_run(run, progress=False)
    before = out.read_bytes()
    (run / "images" / "1.png").rename(run / "images" / "1.moved")
    with pytest.raises(concepts.ManifestError, match=r"1 manifest image\(s\) cannot be read"):
        concepts.score_run(run, progress=False, overwrite=True)
    assert out.read_bytes() == before and calls == [2]
    (run / "images" / "1.moved").rename(run / "images" / "1.png")
    concepts.score_run(run, progress=False, overwrite=True)
    assert calls == [2, 2] and {r["judge"] for r in read_jsonl(out)} == {"0123456789abcdef"}
    assert len(read_jsonl(out)) == 2
