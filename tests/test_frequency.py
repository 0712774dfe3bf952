"""Frequency profiles: known spectra, resolution independence, the online statistic, the partition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cmlora.frequency import (
    DEFAULT_N_BINS,
    HIGH_BAND_START,
    LATENT_BAND_START,
    band_mean,
    high_frequency_score,
    latent_high_frequency,
    order_and_partition,
    plot_radial_profiles,
    plot_spectra,
    radial_profile,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = [(256, 256), (512, 512), (768, 1024), (1024, 768)]  # (H, W)


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:h, :w]
    return y, x


def checkerboard(h: int, w: int, cell: int) -> np.ndarray:
    y, x = _pixel_grid(h, w)
    return (((x // cell) + (y // cell)) % 2).astype(np.float64)


def square_stripes(h: int, w: int, period: int) -> np.ndarray:
    _, x = _pixel_grid(h, w)
    return ((x // (period // 2)) % 2).astype(np.float64)


def gradient(h: int, w: int) -> np.ndarray:
    _, x = _pixel_grid(h, w)
    return (x + 0.5) / w


def white_noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w))


def _phase(kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random phase per frequency (cycles per unit length), the same at every size."""
    return np.mod(np.sin(kx * 12.9898 + ky * 78.233) * 43758.5453, 1.0)


def scale_free_field(h: int, w: int, alpha: float = 1.0) -> np.ndarray:
    """One fixed image, amplitude 1/|k|**alpha, rendered on an (h, w) grid up to that grid's Nyquist.

    The unit of length is the shorter side, so the field is a function of normalised coordinates and
    a higher resolution adds finer detail to the same picture, as a photograph does. alpha = 1 is the
    usual model of natural images.
    """
    unit = min(h, w)
    ky = np.fft.fftfreq(h) * unit
    kx = np.fft.fftfreq(w) * unit
    KY, KX = np.meshgrid(ky, kx, indexing="ij")
    k = np.hypot(KY, KX)
    k[0, 0] = 1.0
    phase = 2 * np.pi * (_phase(KX, KY) - _phase(-KX, -KY))
    spectrum = np.exp(1j * phase) / k**alpha
    spectrum[0, 0] = 0.0
    return np.real(np.fft.ifft2(spectrum))


# --- radial_profile -------------------------------------------------------------------------------


def test_profile_shape_range_and_input_kinds() -> None:
    grey = white_noise(128, 96)
    profile = radial_profile(grey)
    assert profile.shape == (DEFAULT_N_BINS,)
    assert profile.max() == 1.0
    assert profile.min() >= 0.0
    rgb_float = np.repeat(grey[..., None], 3, axis=2)
    rgb_uint8 = np.round(rgb_float * 255).astype(np.uint8)
    np.testing.assert_allclose(radial_profile(rgb_float), profile, rtol=1e-12)
    # Units do not matter (the spectrum is taken relative to its own mean magnitude): 0-255 == 0-1.
    np.testing.assert_allclose(
        radial_profile(rgb_uint8), radial_profile(rgb_uint8[..., 0] / 255.0), rtol=1e-12
    )
    np.testing.assert_allclose(
        radial_profile(Image.fromarray(rgb_uint8)), radial_profile(rgb_uint8), rtol=1e-12
    )
    # Nor do brightness and contrast.
    np.testing.assert_allclose(radial_profile(3.0 * grey + 7.0), profile, rtol=1e-9)


def test_single_frequency_gives_a_one_hot_profile_at_its_radius() -> None:
    # 2-px cells: the spectrum is the four samples at (+-1/4, +-1/4) cycles/px, rho = sqrt(2)/2.
    profile = radial_profile(checkerboard(256, 256, cell=2))
    expected_ring = math.floor(math.sqrt(2) / 2 * DEFAULT_N_BINS)
    assert np.flatnonzero(profile > 1e-12).tolist() == [expected_ring]
    assert profile[expected_ring] == 1.0


def test_constant_image_has_zero_profile_and_score() -> None:
    assert radial_profile(np.full((64, 64), 0.3)).tolist() == [0.0] * DEFAULT_N_BINS
    assert high_frequency_score(np.full((64, 64), 0.3)) == 0.0


def test_small_image_fills_empty_rings_and_keeps_the_length() -> None:
    profile = radial_profile(white_noise(20, 16))
    assert profile.shape == (DEFAULT_N_BINS,)
    assert np.all(np.isfinite(profile))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((1, 8)), np.zeros((4, 4, 2)), np.zeros(16), np.array([[0.0, np.nan], [1.0, 2.0]])],
)
def test_profile_rejects_bad_images(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        radial_profile(bad)


# --- high_frequency_score -------------------------------------------------------------------------


def test_band_start_is_the_published_72_px_at_512() -> None:
    assert HIGH_BAND_START == 72 / 256 == 0.28125
    # With 64 rings it is exactly a ring edge: rings 18..63 are the band.
    profile = np.arange(DEFAULT_N_BINS, dtype=np.float64)
    assert band_mean(profile, (HIGH_BAND_START, 1.0)) == np.mean(np.arange(18, 64))


def test_scores_order_known_spectra() -> None:
    h = w = 512
    scores = {
        # flat spectrum: every ring near the maximum
        "noise": high_frequency_score(white_noise(h, w)),
        # 4-px cells: fundamental at rho 0.35 and odd harmonics, all in the band
        "fine checkerboard": high_frequency_score(checkerboard(h, w, cell=4)),
        # period 64 px: fundamental at rho 0.03, only its weak high harmonics reach the band
        "coarse stripes": high_frequency_score(square_stripes(h, w, period=64)),
        # a ramp: only the wrap-around edge of the periodic extension, falling as 1/k
        "gradient": high_frequency_score(gradient(h, w)),
        "constant": high_frequency_score(np.ones((h, w))),
    }
    assert list(scores) == sorted(scores, key=lambda n: -scores[n])
    assert scores["noise"] > 0.9
    assert scores["constant"] == 0.0
    # A pure sinusoid below the band has nothing in it.
    _, x = _pixel_grid(h, w)
    assert high_frequency_score(np.sin(2 * np.pi * x / 64)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_score_of_the_same_picture_is_resolution_independent(alpha: float) -> None:
    scores = [high_frequency_score(scale_free_field(h, w, alpha)) for h, w in SIZES]
    assert max(scores) / min(scores) - 1.0 < 0.02, scores


def test_score_of_pixel_scale_content_is_resolution_independent() -> None:
    scores = [high_frequency_score(checkerboard(h, w, cell=2)) for h, w in SIZES]
    # Exact up to rounding: a single frequency, at the same fraction of Nyquist at every size.
    assert scores == pytest.approx([1.0 / (DEFAULT_N_BINS - 18)] * len(SIZES), rel=1e-12)


def test_score_rejects_bad_bands() -> None:
    for band in [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.2), (math.nan, 1.0)]:
        with pytest.raises(ValueError, match="band"):
            high_frequency_score(white_noise(32, 32), band=band)


# --- latent_high_frequency ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(1, 4, 64, 64), (2, 4, 128, 96), (1, 4, 8, 8), (1, 4, 7, 5), (4, 4, 4), (4, 2, 2)]
)
def test_latent_statistic_is_finite_and_in_unit_range(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        value = latent_high_frequency(torch.randn(shape, generator=generator))
        assert math.isfinite(value)
        assert 0.0 <= value <= 1.0


def test_latent_statistic_separates_noise_from_an_image_like_latent() -> None:
    # The published statistic was NaN at 64x64; ours reads noise as high and a smooth latent as low,
    # on both sides of the published threshold 0.40, at 512-px and 1024x768 latent sizes alike.
    assert 0.0 < LATENT_BAND_START < 1.0
    generator = torch.Generator().manual_seed(1)
    for h, w in [(64, 64), (128, 96)]:
        noise = torch.randn(1, 4, h, w, generator=generator)
        field = torch.from_numpy(scale_free_field(h, w, alpha=1.0)).float()
        smooth = (field / field.std()).expand(1, 4, h, w) + torch.tensor([0.8, -0.3, 0.4, -0.5]).view(
            1, 4, 1, 1
        )
        assert latent_high_frequency(noise) > 0.6
        assert latent_high_frequency(smooth) < 0.1


def test_latent_statistic_accepts_half_precision_and_constant_latents() -> None:
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    assert math.isfinite(latent_high_frequency(latent.to(torch.bfloat16)))
    assert latent_high_frequency(torch.ones(1, 4, 16, 16)) == 0.0


@pytest.mark.parametrize(
    ("latent", "message"),
    [
        (torch.zeros(1, 4, 1, 1), "at least 2x2"),
        (torch.zeros(4, 1, 9), "at least 2x2"),
        (torch.zeros(0, 4, 8, 8), "empty"),
        (torch.zeros(8, 8), "shape"),
        (torch.full((4, 8, 8), math.nan), "non-finite"),
        (torch.tensor([[[0.0, math.inf], [1.0, 2.0]]]), "non-finite"),
    ],
)
def test_latent_statistic_rejects_degenerate_input(latent: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        latent_high_frequency(latent)


# --- order_and_partition --------------------------------------------------------------------------


def test_partition_splits_at_the_largest_gap() -> None:
    scores = {"background": 0.10, "character": 0.50, "style": 0.42, "clothing": 0.45, "object": 0.12}
    order, high, low = order_and_partition(scores)
    assert order == ["character", "clothing", "style", "object", "background"]
    assert high == ["character", "clothing", "style"]
    assert low == ["object", "background"]


def test_partition_ties_keep_input_order() -> None:
    order, high, low = order_and_partition({"a": 0.3, "b": 0.5, "c": 0.3, "d": 0.5})
    assert order == ["b", "d", "a", "c"]
    assert (high, low) == (["b", "d"], ["a", "c"])
    # Equal largest gaps: the first one, so H stays small.
    assert order_and_partition({"x": 0.1, "y": 0.3, "z": 0.5}) == (["z", "y", "x"], ["z"], ["y", "x"])
    # No gap at all: everyone is high.
    assert order_and_partition({"p": 0.2, "q": 0.2}) == (["p", "q"], ["p", "q"], [])


def test_partition_by_threshold() -> None:
    scores = {"a": 0.2, "b": 0.4, "c": 0.39}
    assert order_and_partition(scores, threshold=0.39) == (["b", "c", "a"], ["b", "c"], ["a"])
    assert order_and_partition(scores, threshold=0.4) == (["b", "c", "a"], ["b"], ["c", "a"])
    # H is never empty: below the threshold everywhere, the top LoRA alone is H.
    assert order_and_partition(scores, threshold=0.9) == (["b", "c", "a"], ["b"], ["c", "a"])


def test_partition_single_and_invalid() -> None:
    assert order_and_partition({"only": 0.0}) == (["only"], ["only"], [])
    assert order_and_partition({"only": 0.0}, threshold=0.5) == (["only"], ["only"], [])
    with pytest.raises(ValueError, match="at least one"):
        order_and_partition({})
    with pytest.raises(ValueError, match="'bad'"):
        order_and_partition({"ok": 0.1, "bad": math.nan})


# --- plots ----------------------------------------------------------------------------------------


def _assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def test_plots_write_valid_pngs(tmp_path) -> None:
    images = [
        ("noise", white_noise(64, 48)),
        ("checkerboard", Image.fromarray((checkerboard(64, 64, cell=2) * 255).astype(np.uint8))),
    ]
    spectra = tmp_path / "sub" / "spectra.png"
    plot_spectra(images, spectra)
    _assert_png(spectra)
    profiles = {name: radial_profile(image) for name, image in images}
    curves = tmp_path / "profiles.png"
    plot_radial_profiles(profiles, curves, band_start=HIGH_BAND_START)
    _assert_png(curves)
    with pytest.raises(ValueError):
        plot_radial_profiles({}, tmp_path / "empty.png")
