"""open_dataset picks the reader by what the source is and refuses options that do not apply."""

import numpy as np
import pytest

from dlopt.calibration import ImagePreprocess, NpzDataset, StreamDataset, open_dataset
from dlopt.calibration.images import ImageFolderDataset
from dlopt.core.errors import ConfigError, DataError
from dlopt.core.specs import InputSpec

SPECS = [InputSpec("x", np.dtype(np.float32), ("N", 3, 2, 2))]


def test_dispatch_by_source_type(tmp_path):
    pytest.importorskip("PIL")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 2, 2), np.float32))
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (2, 2)).save(tmp_path / "images" / "a.png")
    assert type(open_dataset(tmp_path / "d.npz", SPECS)) is NpzDataset
    assert type(open_dataset(str(tmp_path / "d.npz"), SPECS)) is NpzDataset
    folder = open_dataset(tmp_path / "images", SPECS, preprocess=ImagePreprocess(size=(2, 2)))
    assert type(folder) is ImageFolderDataset
    stream = open_dataset(np.zeros((5, 3, 2, 2), np.float32), SPECS, batch_size=2)
    assert type(stream) is StreamDataset and [len(f["x"]) for f in stream] == [2, 2, 1]
    assert open_dataset(stream, SPECS) is stream


def test_options_that_do_not_apply(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 2, 2), np.float32))
    with pytest.raises(ConfigError, match="preprocess applies to image folders"):
        open_dataset(tmp_path / "d.npz", SPECS, preprocess=ImagePreprocess(size=(2, 2)))
    with pytest.raises(ConfigError, match="preprocess applies to image folders only"):
        open_dataset([], SPECS, preprocess=ImagePreprocess(size=(2, 2)))
    with pytest.raises(ConfigError, match="not to an already opened CalibrationDataset"):
        open_dataset(open_dataset([], SPECS), SPECS, limit=3)
    with pytest.raises(DataError, match="data file not found"):
        open_dataset(tmp_path / "absent.npz", SPECS)
    with pytest.raises(DataError, match="cannot read calibration data from a bytes"):
        open_dataset(b"\x00", SPECS)
