"""CLIPScore against a tiny random CLIP built offline, checked against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cmlora.evaluate.clipscore import (
    ClipPreprocessConfig,
    ClipScorer,
    _as_features,
    clip_score_run,
    clipscore_from_embeddings,
    preprocess_images,
)
from cmlora.evaluate.runs import ManifestError, read_jsonl

MEAN = [0.5, 0.4, 0.3]
STD = [0.2, 0.25, 0.3]


def _write_tokenizer_files(folder: Path) -> None:
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    for tok in ("th", "the</w>", "an", "ha"):
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = ["#version: 0.2", "t h", "th e</w>", "a n", "h a"]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    _write_tokenizer_files(folder)
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(folder)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": MEAN,
        "image_std": STD,
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor), encoding="utf-8")
    return folder


def _lora(name: str, category: str, triggers: list[str]) -> dict:
    return {
        "name": name,
        "category": category,
        "triggers": triggers,
        "weight": 0.8,
        "sha256": "0" * 64,
        "file": "x",
    }


def _make_run(root: Path, sizes: list[tuple[int, int]]) -> Path:
    run = root / "run"
    (run / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    lines = []
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(run / "images" / f"job{i}.png")
        loras = [_lora("hero", "character", ["the hero"]), _lora("hat", "clothing", ["a hat", "cat"])]
        rec = {
            "image": f"images/job{i}.png",
            "job_id": f"job{i}",
            "composition_id": f"c{i % 2}",
            "n": 2,
            "method": "merge" if i % 2 else "switch",
            "seed": 111,
            "seed_index": 0,
            "prompt": "base, the hero, a hat, cat",
            "loras": loras,
            "full_calls": 10,
            "cached_calls": 0,
            "macs": 1,
            "seconds": 0.5,
        }
        # Line 1 has no trigger_prompt (rebuilt from the LoRAs); line 2's is over CLIP's 16 tokens here.
        if i != 1:
            rec["trigger_prompt"] = "the hero, a hat, cat" if i != 2 else "the hero " * 30
        lines.append(json.dumps(rec))
    (run / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run


def _direct_scores(clip_dir: Path, run: Path) -> dict[str, float]:
    """CLIPScore spelled out on the raw towers, independent of ClipScorer's helpers."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    except ImportError:  # pragma: no cover - older/newer transformers layout
        processor = None
    out = {}
    for line in (run / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        text = rec.get("trigger_prompt") or ", ".join(t for lo in rec["loras"] for t in lo["triggers"])
        img = Image.open(run / rec["image"]).convert("RGB")
        if processor is not None:
            pixels = torch.as_tensor(np.asarray(processor(images=img, return_tensors="np")["pixel_values"]))
        else:  # pragma: no cover
            w, h = img.size
            s = 32 / min(w, h)
            img = img.resize((max(32, int(w * s)), max(32, int(h * s))), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 255
            top, left = (arr.shape[0] - 32) // 2, (arr.shape[1] - 32) // 2
            arr = (arr[top : top + 32, left : left + 32] - MEAN) / STD
            pixels = torch.as_tensor(arr.transpose(2, 0, 1)[None], dtype=torch.float32)
        enc = tok([text], truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            img_emb = model.visual_projection(model.vision_model(pixel_values=pixels.float()).pooler_output)
            txt_emb = model.text_projection(model.text_model(**enc).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img_emb, txt_emb).item()
        out[rec["image"]] = 100.0 * max(cos, 0.0)
    return out


def test_clipscore_matches_direct_computation(clip_dir: Path, tmp_path: Path) -> None:
    run = _make_run(tmp_path, [(40, 48), (64, 32), (32, 32), (50, 37), (33, 80)])
    records = clip_score_run(run, str(clip_dir), batch_size=2, device="cpu", progress=False)
    expected = _direct_scores(clip_dir, run)
    assert len(records) == 5
    assert sum(v > 1.0 for v in expected.values()) >= 3  # not trivially clamped to 0
    on_disk = read_jsonl(run / "eval" / "clipscore.jsonl")
    assert on_disk == records
    for rec in on_disk:
        assert rec["clip_model"] == str(clip_dir)
        assert rec["clipscore"] == pytest.approx(expected[rec["image"]], abs=1e-3)
        assert 0.0 <= rec["clipscore"] <= 100.0


def test_scores_not_all_zero_and_clamped() -> None:
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    got = clipscore_from_embeddings(img, txt).tolist()
    assert got == pytest.approx([100.0, 0.0, 100.0 / 2**0.5])


def test_resume_skips_scored_images_and_refuses_other_model(clip_dir: Path, tmp_path: Path) -> None:
    run = _make_run(tmp_path, [(32, 32), (40, 32), (32, 40)])
    first = clip_score_run(run, str(clip_dir), batch_size=8, device="cpu", progress=False)

    class Boom:
        def score(self, *a: object) -> list[float]:
            raise AssertionError("nothing should be rescored")

    again = clip_score_run(run, str(clip_dir), progress=False, scorer=Boom())  # type: ignore[arg-type]
    assert again == first
    # Simulate an interrupted run: drop the last record and leave a partial line behind.
    path = run / "eval" / "clipscore.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + '{"image": "images/jo')
    resumed = clip_score_run(run, str(clip_dir), device="cpu", progress=False)
    assert [r["image"] for r in resumed] == [r["image"] for r in first]
    assert len(read_jsonl(path)) == 3
    with pytest.raises(ManifestError, match="overwrite"):
        clip_score_run(run, "some/other-clip", progress=False, scorer=Boom())  # type: ignore[arg-type]


def test_preprocess_reads_config_and_crops(clip_dir: Path) -> None:
    scorer = ClipScorer(clip_dir, device="cpu")
    cfg = scorer.preprocess_config
    assert cfg.mean == tuple(MEAN) and cfg.std == tuple(STD)
    assert (cfg.shortest_edge, cfg.crop_height, cfg.crop_width) == (32, 32, 32)
    white = Image.new("RGB", (64, 40), (255, 255, 255))
    pixels = preprocess_images([white], cfg)
    assert pixels.shape == (1, 3, 32, 32)
    expected = (1.0 - np.asarray(MEAN)) / np.asarray(STD)
    assert pixels[0, :, 5, 5].numpy() == pytest.approx(expected, abs=1e-4)
    default = ClipPreprocessConfig.from_dict({}, image_size=224)
    assert default.shortest_edge == 224 and default.crop_width == 224


def test_feature_extraction_handles_tensor_and_model_output() -> None:
    t = torch.randn(3, 8)
    assert _as_features(t, "image", 8) is t
    assert torch.equal(_as_features(SimpleNamespace(pooler_output=t), "image", 8), t)
    assert torch.equal(_as_features(SimpleNamespace(text_embeds=t, pooler_output=None), "text", 8), t)
    with pytest.raises(TypeError, match="expected"):
        _as_features(SimpleNamespace(pooler_output=torch.randn(3, 16)), "image", 8)
    with pytest.raises(TypeError):
        _as_features(SimpleNamespace(), "image", 8)
