"""Image folders become exactly the declared preprocessing, pixel for pixel."""

import dataclasses

import numpy as np
import pytest

from dlopt.calibration import ImagePreprocess, open_dataset
from dlopt.core.errors import ConfigError, DataError
from dlopt.core.specs import InputSpec

Image = pytest.importorskip("PIL.Image")

F32 = np.dtype(np.float32)
PIXEL = (10, 20, 30)  # R, G, B at row 1, column 2 of every generated image


def _image(value: int, mode="RGB", size=(6, 4)):  # PIL sizes are (width, height)
    pixels = np.full((size[1], size[0], 3), value, np.uint8)
    pixels[1, 2] = PIXEL
    image = Image.fromarray(pixels, "RGB")
    return image if mode == "RGB" else image.convert(mode)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    _image(100).save(tmp_path / "b.png")
    _image(50).save(tmp_path / "a.png")
    _image(200).save(tmp_path / "sub" / "c.bmp")
    (tmp_path / "notes.txt").write_text("not an image, not picked up")
    return tmp_path


def test_nchw_rgb_mean_std_values(folder):
    spec = [InputSpec("img", F32, ("N", 3, 4, 6))]
    pre = ImagePreprocess(size=(4, 6), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    data = open_dataset(folder, spec, preprocess=pre, batch_size=2)
    assert [p.name for p in data.files] == ["a.png", "b.png", "c.bmp"]  # sorted by path, recursive
    batches = [b["img"] for b in data]
    assert [b.shape for b in batches] == [(2, 3, 4, 6), (1, 3, 4, 6)] and batches[0].dtype == np.float32
    # (10/255 - 0.1) / 0.5, (20/255 - 0.2) / 0.25, (30/255 - 0.3) / 0.125
    np.testing.assert_allclose(batches[0][0, :, 1, 2], [-0.12156863, -0.48627451, -1.45882353], rtol=1e-6)
    # the background of b.png (100) and c.bmp (200), red channel: (v/255 - 0.1) / 0.5
    np.testing.assert_allclose([batches[0][1, 0, 0, 0], batches[1][0, 0, 3, 5]], [0.58431373, 1.36862745], rtol=1e-6)


def test_nhwc_bgr_reverses_channels_and_takes_mean_in_bgr_order(folder):
    spec = [InputSpec("img", np.dtype(np.float16), (1, 4, 6, 3))]
    pre = ImagePreprocess(size=(4, 6), layout="NHWC", color="BGR", mean=(0.5,), std=(2.0, 1.0, 0.5), scale=1.0)
    first = next(iter(open_dataset(folder, spec, preprocess=pre)))["img"]
    assert first.shape == (1, 4, 6, 3) and first.dtype == np.float16
    # B, G, R = 30, 20, 10: (30 - 0.5) / 2, (20 - 0.5) / 1, (10 - 0.5) / 0.5
    np.testing.assert_array_equal(first[0, 1, 2], np.array([14.75, 19.5, 19.0], np.float16))


def test_gray_and_resize(tmp_path):
    _image(80, mode="L", size=(12, 8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((5, 5, 3), 255, np.uint8)).save(tmp_path / "w.jpg")
    spec = [InputSpec("img", F32, ("N", 1, 2, 3))]
    pre = ImagePreprocess(size=(2, 3), color="GRAY", scale=1.0)
    batches = [b["img"] for b in open_dataset(tmp_path, spec, preprocess=pre, limit=2)]
    assert [b.shape for b in batches] == [(1, 1, 2, 3)] * 2
    assert batches[1].min() >= 250  # a white JPEG stays white through resizing
    assert batches[0][0, 0, 1, 2] == 80.0  # a uniform region survives bilinear downsampling


@pytest.mark.parametrize("spec, message", [
    ([InputSpec("img", F32, ("N", 3, 5, 6))], r"preprocessing makes samples of shape \[1, 3, 4, 6\]"),
    ([InputSpec("img", F32, ("N", 4, 6, 3))], r"shape \[1, 3, 4, 6\] \(size=\(4, 6\), layout=NCHW"),
    ([InputSpec("img", np.dtype(np.uint8), ("N", 3, 4, 6))], "images become floating-point samples"),
    ([InputSpec("a", F32, ("N", 3, 4, 6)), InputSpec("b", F32, ("N", 1))], "feeds single-input models only"),
])
def test_model_mismatch_fails_before_any_image_is_read(tmp_path, spec, message):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=message) as info:
        open_dataset(tmp_path, spec, preprocess=ImagePreprocess(size=(4, 6)))
    assert str(info.value).endswith("; the model expects " + ", ".join(s.describe() for s in spec))


def test_unreadable_image_and_empty_folder(folder, tmp_path_factory):
    (folder / "z.png").write_bytes(b"not a png")
    spec = [InputSpec("img", F32, ("N", 3, 4, 6))]
    data = open_dataset(folder, spec, preprocess=ImagePreprocess(size=(4, 6)), batch_size=8)
    with pytest.raises(DataError, match=r"^cannot read image .*z.png: ") as info:
        list(data)
    assert "\n" not in str(info.value)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="holds no samples"):
        open_dataset(empty, spec, preprocess=ImagePreprocess(size=(4, 6)))
    with pytest.raises(ConfigError, match="is a folder of images: pass preprocess"):
        open_dataset(empty, spec)


@pytest.mark.parametrize("options", [
    {"size": (0, 4)}, {"size": (4,)}, {"size": (4.0, 4)}, {"layout": "CHW"}, {"color": "RGBA"},
    {"mean": (0.1, 0.2)}, {"std": (1.0, 0.0, 1.0)}, {"std": (float("nan"),)}, {"scale": -1.0}, {"scale": "1/255"},
    {"color": "GRAY", "mean": (0.1, 0.2, 0.3)},
])
def test_preprocess_rejects_bad_values(options):
    with pytest.raises(ConfigError, match="ImagePreprocess"):
        ImagePreprocess(**{"size": (4, 6), **options})


def test_preprocess_is_frozen_and_keyword_only():
    pre = ImagePreprocess(size=[4, 6], mean=0.5)
    assert pre.size == (4, 6) and pre.mean == (0.5,) and pre.sample_shape() == (3, 4, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.layout = "NHWC"
    with pytest.raises(TypeError):
        ImagePreprocess((4, 6))
