"""Nucleus segmenters: the watershed default, the registry, the deep hooks, morphology."""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest

from stimg.segmenters import (
    get_segmenter,
    list_segmenters,
    nucleus_morphology,
    register_segmenter,
    segment_nuclei,
)

_BG, _NUC = (225, 165, 205), (70, 45, 125)  # eosin-pink background, haematoxylin-dark nuclei


def _image(discs, shape=(96, 96)):
    img = np.empty((*shape, 3), np.uint8)
    img[:] = _BG
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for cy, cx, r in discs:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = _NUC
    return img


def test_watershed_finds_and_splits_nuclei():
    # three separate nuclei and two touching ones (centres 10 px apart, radius 6)
    img = _image([(15, 15, 6), (15, 70, 6), (75, 20, 6), (60, 60, 6), (60, 70, 6)])
    lab = segment_nuclei(img, mpp=0.5)
    assert lab.dtype == np.int32 and lab.shape == img.shape[:2]
    assert lab.max() == 5
    assert set(np.unique(lab)) == set(range(6))  # numbered without gaps
    assert lab[60, 60] != lab[60, 70] and lab[60, 60] > 0 and lab[60, 70] > 0
    from scipy.ndimage import binary_dilation

    far = ~binary_dilation(img[..., 0] == _NUC[0], iterations=2)
    assert (lab[far] == 0).all()  # background (beyond the blurred rim) stays background
    m = nucleus_morphology(lab, mpp=0.5, image=img)
    solo = m.loc[[lab[15, 15], lab[15, 70], lab[75, 20]]]
    np.testing.assert_allclose(solo["area_um2"], np.pi * 6**2 * 0.25, rtol=0.15)
    assert (m["haematoxylin"] > 0).all()


def test_watershed_drops_specks_and_blank_patches():
    img = _image([(30, 30, 6), (70, 70, 1)])  # a nucleus and a 1-px-radius speck (~1 µm²)
    assert segment_nuclei(img, mpp=0.5).max() == 1
    assert segment_nuclei(np.full((40, 40, 3), 240, np.uint8), mpp=0.5).max() == 0
    # float images in [0, 1] are accepted; other ranges are refused with the fix
    assert segment_nuclei(img / 255.0, mpp=0.5).max() == 1
    with pytest.raises(ValueError, match="rescale it to 0–255"):
        segment_nuclei(img.astype(np.float32) * 3, mpp=0.5)
    with pytest.raises(ValueError, match="positive number of µm per pixel"):
        segment_nuclei(img, mpp=0)


def test_registry_plugins_and_errors():
    assert list_segmenters()[:3] == ["watershed", "cellpose", "stardist"]
    with pytest.raises(KeyError, match="Registered: .*watershed"):
        get_segmenter("hovernet")
    with pytest.raises(ValueError, match="already registered"):
        register_segmenter("watershed", lambda image, *, mpp: image[..., 0])

    def squares(image, *, mpp, size=8):
        lab = np.zeros(image.shape[:2], np.int32)
        lab[:size, :size], lab[-size:, -size:] = 7, 9
        return lab

    register_segmenter("test_squares", squares, overwrite=True)
    lab = segment_nuclei(_image([]), mpp=1.0, method="test_squares", size=4)
    assert lab.max() == 2 and (lab[:4, :4] == 1).all()  # relabelled 1 … n
    assert segment_nuclei(_image([]), mpp=1.0, method=squares).max() == 2  # a function works directly
    with pytest.raises(ValueError, match="labels of shape"):
        segment_nuclei(_image([]), mpp=1.0, method=lambda image, *, mpp: np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="non-negative integer labels"):
        segment_nuclei(_image([]), mpp=1.0, method=lambda image, *, mpp: np.zeros(image.shape[:2], bool))


@pytest.mark.parametrize(("name", "hint"), [("cellpose", "pip install cellpose"), ("stardist", "pip install stardist")])
def test_deep_segmenters_say_how_to_install(name, hint):
    if find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    with pytest.raises(ImportError, match=hint):
        segment_nuclei(_image([(30, 30, 6)]), mpp=0.5, method=name)


def test_morphology_of_an_ellipse():
    yy, xx = np.mgrid[:80, :80]
    lab = (((yy - 40) / 8.0) ** 2 + ((xx - 40) / 24.0) ** 2 <= 1).astype(np.int32)
    m = nucleus_morphology(lab, mpp=0.5).iloc[0]
    assert m["area_um2"] == pytest.approx(np.pi * 8 * 24 * 0.25, rel=0.05)
    assert m["eccentricity"] == pytest.approx(np.sqrt(1 - (8 / 24) ** 2), abs=0.02)
    assert m["major_axis_um"] == pytest.approx(24.0, rel=0.05)
    assert (m["centroid_x"], m["centroid_y"]) == pytest.approx((40, 40), abs=0.1)
