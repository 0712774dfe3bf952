"""CLIPScore of generated images against their composition's trigger words.

CLIPScore = 100 * max(cos(image embedding, text embedding), 0), as in Hessel et al. and as used by
Zhong et al. with CLIP ViT-B/16.  It is built directly on transformers' ``CLIPModel`` and
``CLIPTokenizer`` because torchmetrics only accepts a fixed list of hub ids, whereas reproductions
need offline local checkpoints.  Image preprocessing is done here with PIL + numpy (shortest side
bicubic resize, centre crop, CLIP mean/std) so that it neither needs torchvision nor changes with
transformers' image-processor backends; the parameters come from the checkpoint's
``preprocessor_config.json`` when it has one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .runs import (
    CLIPSCORE_FILENAME,
    JsonlAppender,
    ManifestError,
    eval_dir,
    open_run_image,
    read_jsonl,
    read_manifest,
    readable_images,
)

__all__ = [
    "CLIPSCORE_FILENAME",
    "ClipPreprocessConfig",
    "ClipScorer",
    "clip_score_run",
    "clipscore_from_embeddings",
    "preprocess_images",
]

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocessConfig:
    """The few preprocessing numbers CLIP needs; defaults are OpenAI CLIP's."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1.0 / 255.0
    do_resize: bool = True
    do_center_crop: bool = True

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], image_size: int) -> ClipPreprocessConfig:
        """Read a ``preprocessor_config.json``; tolerate the int / dict spellings of sizes across versions."""
        size = cfg.get("size", image_size)
        if isinstance(size, dict):
            shortest = size.get("shortest_edge") or min(
                size.get("height", image_size), size.get("width", image_size)
            )
        else:
            shortest = int(size)
        crop = cfg.get("crop_size", image_size)
        if isinstance(crop, dict):
            crop_h, crop_w = int(crop.get("height", image_size)), int(crop.get("width", image_size))
        else:
            crop_h = crop_w = int(crop)
        mean = tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_mean/image_std must have 3 entries, got {mean} / {std}")
        return cls(
            shortest_edge=int(shortest),
            crop_height=crop_h,
            crop_width=crop_w,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            rescale_factor=float(cfg.get("rescale_factor", 1.0 / 255.0)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
        )


def _resize_shortest(img: Image.Image, shortest: int) -> Image.Image:
    # Same output size rule as transformers' get_resize_output_image_size(default_to_square=False).
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == shortest:
        return img
    new_short, new_long = shortest, int(shortest * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < crop_h or w < crop_w:
        # Pad like transformers does when the image is smaller than the crop.
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        arr = np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        h, w = arr.shape[:2]
    top = int((h - crop_h) / 2.0)
    left = int((w - crop_w) / 2.0)
    return arr[top : top + crop_h, left : left + crop_w]


def preprocess_images(images: Sequence[Image.Image], cfg: ClipPreprocessConfig) -> torch.Tensor:
    """Turn PIL images into a normalised ``(B, 3, H, W)`` float32 tensor for CLIP's vision tower."""
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    batch = []
    for img in images:
        img = img.convert("RGB")
        if cfg.do_resize:
            img = _resize_shortest(img, cfg.shortest_edge)
        arr = np.asarray(img, dtype=np.float32)
        if cfg.do_center_crop:
            arr = _center_crop(arr, cfg.crop_height, cfg.crop_width)
        arr = (arr * cfg.rescale_factor - mean) / std
        batch.append(arr.transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch, axis=0)))


def _as_features(out: Any, kind: str, projection_dim: int) -> torch.Tensor:
    """Extract projected embeddings from ``get_*_features`` across transformers versions.

    transformers 4.x returned a tensor; 5.x returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` already holds the *projected* embedding.  The dimension check guards against
    a future version handing back the unprojected pooled state instead.
    """
    if isinstance(out, torch.Tensor):
        feats = out
    else:
        feats = None
        for name in (f"{kind}_embeds", "pooler_output"):
            value = getattr(out, name, None)
            if value is None and isinstance(out, dict):
                value = out.get(name)
            if isinstance(value, torch.Tensor):
                feats = value
                break
        if feats is None and isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            feats = out[0]
        if feats is None:
            raise TypeError(f"cannot find {kind} embeddings in {type(out).__name__}")
    if feats.ndim != 2 or feats.shape[-1] != projection_dim:
        raise TypeError(
            f"{kind} features have shape {tuple(feats.shape)}, expected (batch, {projection_dim}); "
            "this transformers version returns something unexpected from get_*_features"
        )
    return feats


def clipscore_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """100 * max(cos, 0) row by row; kept separate so tests can check the formula on its own."""
    img = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    return 100.0 * (img * txt).sum(dim=-1).clamp(min=0.0)


def _load_preprocess_dict(clip: str) -> dict[str, Any]:
    local = Path(clip)
    if local.is_dir():
        cfg_path = local / "preprocessor_config.json"
        if cfg_path.is_file():
            return json.loads(cfg_path.read_text(encoding="utf-8"))
        return {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(clip, "preprocessor_config.json")).read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - absent config is fine: defaults are OpenAI CLIP's
        logger.warning("no preprocessor_config.json for %s (%s); using OpenAI CLIP defaults", clip, exc)
        return {}


class ClipScorer:
    """A loaded CLIP model that scores images against texts in batches.

    Text embeddings are memoised because a sweep has many images (methods x seeds) per trigger text.
    """

    def __init__(
        self,
        clip: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.name = str(clip)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = CLIPModel.from_pretrained(self.name, dtype=dtype).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(self.name)
        self.dtype = dtype
        self.projection_dim = int(self.model.config.projection_dim)
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        image_size = int(self.model.config.vision_config.image_size)
        self.preprocess_config = ClipPreprocessConfig.from_dict(_load_preprocess_dict(self.name), image_size)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess_images(images, self.preprocess_config).to(self.device, self.dtype)
        out = self.model.get_image_features(pixel_values=pixels)
        return _as_features(out, "image", self.projection_dim).float().cpu()

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts, truncating to CLIP's context (N=5 trigger lists can exceed 77 tokens)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            enc = self.tokenizer(
                list(missing),
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            out = self.model.get_text_features(**enc)
            feats = _as_features(out, "text", self.projection_dim).float().cpu()
            for text, row in zip(missing, feats, strict=True):
                self._text_cache[text] = row
        return torch.stack([self._text_cache[t] for t in texts], dim=0)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return []
        return clipscore_from_embeddings(self.image_embeddings(images), self.text_embeddings(texts)).tolist()


def clip_score_run(
    run_dir: str | os.PathLike[str],
    clip: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    scorer: ClipScorer | None = None,
) -> list[dict[str, Any]]:
    """Score every manifest image of a run, appending to ``RUN_DIR/eval/clipscore.jsonl``.

    Images already scored with the same ``clip_model`` are skipped so an interrupted run resumes.
    Mixing CLIP models in one file would make the report's means meaningless, so a different model
    is refused unless ``overwrite`` starts the file afresh.  Returns all records for this model.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    clip_name = str(clip)
    entries = read_manifest(run_dir)
    out_path = eval_dir(run_dir) / CLIPSCORE_FILENAME
    if overwrite and out_path.exists():
        out_path.unlink()
    existing = read_jsonl(out_path)
    others = sorted({str(r.get("clip_model")) for r in existing} - {clip_name})
    if others:
        raise ManifestError(
            f"{out_path} already holds scores from {', '.join(others)}; "
            f"pass overwrite=True (--overwrite) to rescore with {clip_name}"
        )
    done = {os.path.normpath(str(r["image"])) for r in existing if "image" in r}
    todo = [e for e in entries if os.path.normpath(e.image) not in done]
    records = list(existing)
    if not todo:
        logger.info("all %d images already scored with %s", len(entries), clip_name)
        return records
    # Validate every image exists before loading CLIP, so a typo fails in seconds, not mid-run.
    paths = readable_images(run_dir, todo)
    scorer = scorer or ClipScorer(clip_name, device=device)
    with (
        JsonlAppender(out_path) as sink,
        tqdm(total=len(todo), desc="CLIPScore", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [open_run_image(p) for p in paths[start : start + batch_size]]
            scores = scorer.score(images, [e.trigger_prompt for e in chunk])
            for entry, value in zip(chunk, scores, strict=True):
                rec = {"image": entry.image, "clipscore": float(value), "clip_model": clip_name}
                sink.write(rec)
                records.append(rec)
            bar.update(len(chunk))
    return records
