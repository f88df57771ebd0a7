"""The one rendering module: any colour map gives matplotlib's colours, palette PNGs keep their labels."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from daemon import rendering


@pytest.mark.parametrize("name", ["hot", "jet"])
def test_heat_rgba_gives_matplotlibs_colours_for_every_colour_map(name):
    from matplotlib import colormaps

    values = np.append(np.linspace(-0.2, 1.2, 4097, dtype=np.float32), np.float32(np.nan)).reshape(1, -1)
    np.testing.assert_array_equal(rendering.heat_rgba(values, name),
                                  (colormaps[name](np.clip(values, 0, 1)) * 255).round().astype(np.uint8))


def test_palette_png_keeps_the_labels_and_shows_their_colours():
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 4
    colours = [(40, 140, 255), (60, 220, 90), (255, 60, 60)]
    with Image.open(io.BytesIO(rendering.palette_png(labels, colours))) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), labels)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[0, 1:4], colours)


def test_label_overlay_tints_outlines_and_keeps_the_rest_of_the_image():
    gray = np.full((400, 600), 100, np.uint8)
    masks = np.zeros((2, 400, 600), bool)
    masks[0, 300:360, 10:60] = True
    overlay = rendering.label_overlay(gray, masks, ["first", "second"])
    first = np.array(rendering.distinct_colours(2)[0], np.float32)
    np.testing.assert_array_equal(overlay[330, 35], np.rint(100 * 0.55 + first * 0.45).astype(np.uint8))
    assert (overlay[390, 300] == 100).all()                     # far from the mask and the legend
    assert (overlay[2, -5] < 100).all()                       # the legend's dark box, top right


def test_write_pngs_encodes_side_by_side_and_never_overwrites(tmp_path):
    from daemon import outputs

    rng = np.random.default_rng(0)
    images = {"a_heat": rng.integers(0, 256, (40, 60, 4), dtype=np.uint8),
              "a_overlay": rng.integers(0, 256, (40, 60, 3), dtype=np.uint8),
              "a_gray": rng.integers(0, 256, (40, 60), dtype=np.uint8)}
    assert outputs.encode_pngs(list(images.values())) == [outputs.encode_png(i) for i in images.values()]
    first = outputs.write_pngs(tmp_path, images)
    second = outputs.write_pngs(tmp_path, images)
    assert [p.name for p in first.values()] == ["a_heat.png", "a_overlay.png", "a_gray.png"]
    assert [p.name for p in second.values()] == ["a_heat_1.png", "a_overlay_1.png", "a_gray_1.png"]
    for stem, image in images.items():
        with Image.open(first[stem]) as written:
            np.testing.assert_array_equal(np.asarray(written), image)


def test_write_pngs_renders_lazily_and_passes_errors_on(tmp_path):
    from daemon import outputs

    image = np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)
    rendered = []

    def render():
        rendered.append(True)
        return image

    written = outputs.write_pngs(tmp_path, {"b_overlay": image, "b_cam": render})
    assert rendered == [True]
    with Image.open(written["b_cam"]) as cam:
        np.testing.assert_array_equal(np.asarray(cam), image)
    with pytest.raises(ValueError, match="uint8"):
        outputs.encode_pngs([image, image.astype(np.float32)])
