"""Frequency profiles of images and latents: the ordering signal of CMLoRA.

CMLoRA orders LoRAs by how much high-frequency content the images of each one carry, and the
online variant ends its early phase when the latent stops being dominated by high frequencies.
The published code measured both with a radius in *pixels* (72 px on images, 80 on latents);
that band means something different at every resolution and is empty on 64x64 latents. Here
every radius is a fraction of the Nyquist frequency, so one band and one threshold serve every
resolution.

Conventions shared by every function below:

- Frequencies are taken in cycles per pixel, separately per axis (``fftfreq(H)`` and
  ``fftfreq(W)``), and the radius is ``rho = |f| / 0.5``: 0 at DC, 1 at the Nyquist frequency.
  For a square image this is the index radius divided by the half-size; for a non-square one it
  is the half-size of *each* axis, so rings stay circles in physical frequency instead of
  becoming ellipses (the published index radius treats the two axes of a 768x1024 image
  differently).
- The profile covers ``rho`` in [0, 1] only: the largest circle that is complete in both axes.
  The corners (``1 < rho <= sqrt(2)``) hold only diagonal frequencies, and a ring there is a
  few arcs whose size depends on the aspect ratio, so including them would make the profile
  depend on the image's shape.
- The DC term (the mean) is left out of every ring: it measures brightness, not frequency
  content, and as a single sample it is either far above the rest (images) or the noisiest
  value in the spectrum (a latent at high noise), so a max-normalised profile would be ruled by
  it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

    ImageLike = np.ndarray | Image.Image
else:
    ImageLike = Any

#: Rings in an image profile. 64 rings over [0, 1] are 2 px wide at 256x256 and 4 px at 512x512,
#: so every ring is populated from 128 px upwards and a stored profile has one fixed length.
DEFAULT_N_BINS = 64

#: Start of the high band for image scores, as a fraction of the Nyquist radius. The published
#: notebook used radius >= 72 px on 512x512 images, whose Nyquist radius is 256 px:
#: 72 / 256 = 0.28125. Keeping the fraction reproduces the published band at 512 px and carries it
#: to every other resolution; it is also exactly the lower edge of ring 18 of 64.
HIGH_BAND_START = 72 / 256

#: Start of the high band for the online latent statistic, as a fraction of the Nyquist radius.
#: The published statistic averaged radius >= 80 latent pixels (index radius, corners included):
#: on a 128x96 latent (1024x768 images) that is the single corner sample (Nyquist, Nyquist), on a
#: 64x64 latent (512 px) it is empty and the statistic is NaN, so every "m >= g" test was false.
#: What made g = 0.40 usable at 1024x768 is that the band sat at the top of the spectrum, where the
#: VAE latent of a finished image is weak and the sampling noise is flat: the statistic reads "noise
#: in the finest scales / strongest ring", near 1 on pure noise and low once the image has formed.
#: The outer half of the complete disc (rho >= 0.5) keeps that reading while averaging hundreds of
#: samples instead of one. On synthetic latents (white noise mixed with a unit-variance 1/f field
#: along the SD-1.5 schedule, 50 steps) it starts at 0.75-0.95, ends at 0.05-0.25 depending on the
#: field's spectrum, and follows the same curve at 64x64 and 128x96 (0.75 gives nearly the same
#: numbers); where real latents cross 0.40 is for the research instrumentation to measure.
LATENT_BAND_START = 0.5

#: Rings of the latent profile (fewer on latents smaller than 32x32: one ring per latent pixel of
#: the shorter half-size). Fixed rings in fractions of Nyquist, like the image profile, make the
#: statistic of the same content equal at 64x64 and 128x96; one-pixel rings would not (the first
#: ring would reach lower frequencies at 128 px, whose 1/f amplitude is larger, and would hold a
#: single Hermitian pair, whose value is noise).
LATENT_N_BINS = 16


def _greyscale(image: ImageLike) -> np.ndarray:
    """A float64 (H, W) luminance array; colour images use ITU-R BT.601 weights, like PIL's "L"."""
    if not isinstance(image, np.ndarray):
        try:
            from PIL import Image
        except ImportError as exc:  # pragma: no cover - pillow is a dependency
            raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}") from exc
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
        image = np.asarray(image.convert("RGB") if image.mode not in ("L", "F", "I") else image)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(
            f"expected a (H, W) greyscale or (H, W, 3) RGB image, got shape {tuple(np.shape(image))}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains non-finite values (NaN or inf)")
    return arr


def _radius(height: int, width: int) -> np.ndarray:
    """rho for every sample of an fftshifted (H, W) spectrum: 0 at DC, 1 at the Nyquist frequency."""
    fy = np.fft.fftshift(np.fft.fftfreq(height)) / 0.5
    fx = np.fft.fftshift(np.fft.fftfreq(width)) / 0.5
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def _ring_means(spectrum: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of an fftshifted spectrum over n_bins equal rings of rho in [0, 1], DC excluded.

    Returns (means, counts); a ring with no sample has mean 0 and count 0, and the callers decide
    what an empty ring means for them.
    """
    height, width = spectrum.shape
    rho = _radius(height, width)
    idx = np.floor(rho * n_bins).astype(np.int64)
    # rho == 1 exactly (the Nyquist sample on an even axis) belongs to the last ring, not past it.
    idx[rho == 1.0] = n_bins - 1
    keep = idx < n_bins
    keep[height // 2, width // 2] = False  # the DC sample, see the module docstring
    counts = np.bincount(idx[keep], minlength=n_bins).astype(np.float64)
    sums = np.bincount(idx[keep], weights=spectrum[keep], minlength=n_bins)
    means = np.divide(sums, counts, out=np.zeros(n_bins), where=counts > 0)
    return means, counts


def _bin_centres(n_bins: int) -> np.ndarray:
    return (np.arange(n_bins) + 0.5) / n_bins


def _check_band(band: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(band[0]), float(band[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
        raise ValueError(
            f"band must satisfy 0 <= lo < hi <= 1 (fractions of the Nyquist radius), got {band!r}"
        )
    return lo, hi


def _image_spectrum(grey: np.ndarray) -> np.ndarray:
    """log1p of the FFT magnitude of an image, relative to its mean magnitude over the disc, fftshifted.

    The log needs a reference scale, and the choice decides what is resolution-independent. Without
    one, log1p adds a log(H * W) offset to every ring that max-normalisation cannot remove, and the
    same content scores differently at 512 and 1024 px. Dividing by the mean magnitude over
    ``rho <= 1`` (DC removed) makes the argument independent of intensity units (0-1 or 0-255), of
    contrast, and of resolution for scale-free content: a 1/f amplitude spectrum, the usual model
    of natural images, has the same profile over rho at every size, and so does white noise.
    Dividing by the standard deviation instead would not do for 1/f content, whose variance grows
    like log(size) (5% drift in the score between 256 and 1024 px, against 0.3% with this one).
    """
    magnitude = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean(), norm="ortho")))
    rho = _radius(*grey.shape)
    disc = rho <= 1.0
    reference = float(magnitude[disc].mean())
    if reference == 0.0:
        return np.zeros_like(grey)
    return np.log1p(magnitude / reference)


def radial_profile(image: ImageLike, n_bins: int = DEFAULT_N_BINS) -> np.ndarray:
    """Max-normalised ring average of an image's log-magnitude spectrum, rings in fractions of Nyquist.

    ``image`` is a (H, W) greyscale array, an (H, W, 3) RGB array (uint8 or float, any scale) or a
    PIL image. Ring ``i`` covers ``rho`` in [i / n_bins, (i + 1) / n_bins); see the module
    docstring for rho and the DC term. Images smaller than about ``2 * n_bins`` pixels on their
    shorter side leave some rings without a sample: those are filled by linear interpolation
    between their populated neighbours, so the profile keeps its fixed length and stored profiles
    of different resolutions stay comparable ring by ring. A constant image has no frequency
    content and gets an all-zero profile.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    grey = _greyscale(image)
    if min(grey.shape) < 2:
        raise ValueError(f"image must be at least 2x2 to have a non-DC frequency, got {grey.shape}")
    means, counts = _ring_means(_image_spectrum(grey), n_bins)
    filled = counts > 0
    if not filled.all():
        centres = _bin_centres(n_bins)
        means = np.interp(centres, centres[filled], means[filled])
    peak = float(means.max())
    if peak <= 0.0:
        return np.zeros(n_bins)
    return means / peak


def band_mean(profile: np.ndarray, band: tuple[float, float]) -> float:
    """Mean of a profile over the rings whose centre lies in ``band`` (fractions of Nyquist).

    Centres rather than edges so that a ring is either in the band or out of it; with the default
    64 rings and band start 72/256 the two rules agree exactly.
    """
    lo, hi = _check_band(band)
    profile = np.asarray(profile, dtype=np.float64)
    if profile.ndim != 1 or profile.size == 0:
        raise ValueError(f"profile must be a non-empty 1-D array, got shape {profile.shape}")
    centres = _bin_centres(profile.size)
    inside = (centres >= lo) & (centres <= hi)
    if not inside.any():
        raise ValueError(f"band {band!r} contains no ring centre of a {profile.size}-ring profile")
    return float(profile[inside].mean())


def high_frequency_score(
    image: ImageLike,
    band: tuple[float, float] = (HIGH_BAND_START, 1.0),
    n_bins: int = DEFAULT_N_BINS,
) -> float:
    """Score of one image for the LoRA order: mean of its normalised radial profile over ``band``.

    In [0, 1]; higher means more of the spectrum sits in fine detail. The band is in fractions of
    the Nyquist radius (see :data:`HIGH_BAND_START` for the default).
    """
    _check_band(band)
    return band_mean(radial_profile(image, n_bins=n_bins), band)


def latent_high_frequency(latent: torch.Tensor, band_start: float = LATENT_BAND_START) -> float:
    """The online phase statistic of a latent (B, C, H, W) or (C, H, W); in [0, 1], never NaN.

    Channels and batch rows are averaged first (as published: the statistic describes the shared
    image, not one channel), then the plain FFT magnitude (no log, as published) is averaged over
    :data:`LATENT_N_BINS` rings, normalised by the strongest ring, and averaged over the rings whose
    centre is at ``rho >= band_start`` (see :data:`LATENT_BAND_START`).

    On latents so small that no populated ring lies in the band (4x4, 5x7, ...), the outermost
    populated ring is used, so the statistic is defined at every size of at least 2x2. A latent
    whose mean-over-channels is constant has no frequency content at all and gets 0.0.
    """
    import torch

    if not isinstance(latent, torch.Tensor):
        raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
    if latent.dim() not in (3, 4):
        raise ValueError(f"latent must have shape (B, C, H, W) or (C, H, W), got {tuple(latent.shape)}")
    if latent.numel() == 0:
        raise ValueError(f"latent is empty: shape {tuple(latent.shape)}")
    if not 0.0 <= band_start < 1.0:
        raise ValueError(f"band_start must be in [0, 1), got {band_start}")
    height, width = int(latent.shape[-2]), int(latent.shape[-1])
    if min(height, width) < 2:
        raise ValueError(f"latent must be at least 2x2 to have a non-DC frequency, got {height}x{width}")
    plane = latent.detach().to(device="cpu", dtype=torch.float64).reshape(-1, height, width).mean(dim=0)
    grid = plane.numpy()
    if not np.all(np.isfinite(grid)):
        raise ValueError("latent contains non-finite values (NaN or inf)")
    n_bins = min(LATENT_N_BINS, min(height, width) // 2)
    means, counts = _ring_means(np.abs(np.fft.fftshift(np.fft.fft2(grid))), n_bins)
    peak = float(means.max())
    if peak <= 0.0:
        return 0.0
    profile = means / peak
    populated = counts > 0
    inside = populated & (_bin_centres(n_bins) >= band_start)
    if not inside.any():
        inside = np.zeros(n_bins, dtype=bool)
        inside[np.flatnonzero(populated)[-1]] = True
    return float(profile[inside].mean())


def order_and_partition(
    scores: Mapping[str, float], threshold: float | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(order, H, L): LoRA names high-frequency first, and the split into high and low groups.

    Ties keep the input order (a stable sort), so a user's order decides between equal scores.
    Without a threshold the split is at the largest gap between consecutive sorted scores (the
    first of several equal largest gaps, so H stays small); if all scores are equal there is no
    gap and every LoRA is in H. With a threshold, ``score >= threshold`` goes to H; if no score
    reaches it, the highest-scoring LoRA alone is H, because the schedule needs at least one LoRA
    to dominate the early phase. A single LoRA is always H = [it], L = [].
    """
    names = list(scores)
    if not names:
        raise ValueError("order_and_partition needs at least one score")
    values: dict[str, float] = {}
    for name in names:
        value = float(scores[name])
        if not math.isfinite(value):
            raise ValueError(f"score of LoRA {name!r} is not finite: {scores[name]!r}")
        values[name] = value
    order = sorted(names, key=lambda n: -values[n])
    if threshold is not None:
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        high = [n for n in order if values[n] >= threshold]
        if not high:
            high = [order[0]]
        low = [n for n in order if n not in high]
        return order, high, low
    if len(order) == 1:
        return order, order[:], []
    gaps = [values[order[i]] - values[order[i + 1]] for i in range(len(order) - 1)]
    largest = max(gaps)
    if largest <= 0.0:
        return order, order[:], []
    cut = gaps.index(largest) + 1
    return order, order[:cut], order[cut:]


def _finish_figure(fig: Any, out_png: str | PathLike[str]) -> None:
    import os

    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png", dpi=100)


def _pyplot() -> Any:
    """pyplot on the Agg backend, imported only when a plot is asked for (matplotlib is slow to load)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(
    images: Sequence[tuple[str, ImageLike]],
    out_png: str | PathLike[str],
    n_bins: int = DEFAULT_N_BINS,
    band_start: float = HIGH_BAND_START,
) -> None:
    """One figure, one row per image: its log-magnitude spectrum and its radial profile.

    The spectrum panel shows what :func:`radial_profile` averages (standardised image, DC left
    out), with the complete disc (rho = 1) and the band start drawn, so a reader can see which
    structures the score counts.
    """
    if not images:
        raise ValueError("plot_spectra needs at least one (name, image) pair")
    plt = _pyplot()
    from matplotlib.patches import Ellipse

    fig, axes = plt.subplots(len(images), 2, figsize=(9, 3.6 * len(images)), squeeze=False)
    centres = _bin_centres(n_bins)
    try:
        for row, (name, image) in enumerate(images):
            grey = _greyscale(image)
            spectrum = _image_spectrum(grey)
            h, w = spectrum.shape
            shown = spectrum.copy()
            shown[h // 2, w // 2] = 0.0
            ax_s, ax_p = axes[row]
            ax_s.imshow(shown, cmap="magma", extent=(-1, 1, -1, 1), origin="lower", aspect="equal")
            for radius, style in ((1.0, "-"), (band_start, "--")):
                ax_s.add_patch(
                    Ellipse((0, 0), 2 * radius, 2 * radius, fill=False, color="cyan", ls=style, lw=0.8)
                )
            ax_s.set_title(f"{name}: log-magnitude spectrum ({w}x{h})", fontsize=9)
            ax_s.set_xlabel("f_x / Nyquist")
            ax_s.set_ylabel("f_y / Nyquist")
            profile = radial_profile(grey, n_bins=n_bins)
            score = band_mean(profile, (band_start, 1.0))
            ax_p.plot(centres, profile, color="C0")
            ax_p.axvspan(band_start, 1.0, color="C1", alpha=0.15, label=f"high band, score {score:.3f}")
            ax_p.set_xlim(0, 1)
            ax_p.set_ylim(0, 1.05)
            ax_p.set_xlabel("radius / Nyquist")
            ax_p.set_ylabel("normalised ring mean")
            ax_p.set_title(f"{name}: radial profile", fontsize=9)
            ax_p.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        _finish_figure(fig, out_png)
    finally:
        plt.close(fig)


def plot_radial_profiles(
    profiles: Mapping[str, np.ndarray | Sequence[float]],
    out_png: str | PathLike[str],
    band_start: float = HIGH_BAND_START,
) -> None:
    """Radial profiles of several LoRAs on one axis, the high band shaded, scores in the legend."""
    if not profiles:
        raise ValueError("plot_radial_profiles needs at least one profile")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for name, profile in profiles.items():
            arr = np.asarray(profile, dtype=np.float64)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(
                    f"profile of {name!r} must be a non-empty 1-D sequence, got shape {arr.shape}"
                )
            score = band_mean(arr, (band_start, 1.0))
            ax.plot(_bin_centres(arr.size), arr, label=f"{name} ({score:.3f})")
        ax.axvspan(band_start, 1.0, color="grey", alpha=0.15, label=f"high band (>= {band_start:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("radius / Nyquist")
        ax.set_ylabel("normalised ring mean of log-magnitude")
        ax.set_title("LoRA frequency profiles (score = mean over the high band)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _finish_figure(fig, out_png)
    finally:
        plt.close(fig)


def read_image(path: str | PathLike[str]) -> Image.Image:
    """An image file a user named, decoded to RGB, or a PathError naming it.

    The file must be a regular file (a pipe would block, a device never ends), and PIL's
    decompression-bomb guard is made strict: past ``Image.MAX_IMAGE_PIXELS`` PIL only warns,
    then decodes hundreds of megabytes, so the warning is an error here too. Any decoding failure
    (not an image, truncated, corrupt) is the same one-line error, never a traceback.
    """
    import warnings

    from PIL import Image as PILImage

    from .errors import PathError
    from .paths import check_regular_file

    checked = check_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(checked) as image:
                return image.convert("RGB")
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise PathError(f"{path}: image too large to decode safely ({exc}); downscale it first") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) on bad input
        raise PathError(
            f"{path}: not a readable image ({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from None
