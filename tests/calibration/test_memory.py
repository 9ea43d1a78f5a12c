"""PeakRSS measures what a block allocates, and streaming an .npz keeps that far below the file size."""

import gc

import numpy as np

from dlopt.calibration import NpzDataset, PeakRSS
from dlopt.core.specs import InputSpec

MB = 1 << 20


def test_peak_rss_sees_an_allocation_freed_inside_the_block():
    with PeakRSS() as rss:
        block = np.ones(200 * MB // 4, np.float32)  # touched: resident
        block.sum()
        del block
    assert rss.start_bytes > 0 and rss.peak_bytes >= rss.start_bytes
    assert 180 * MB < rss.delta_bytes < 400 * MB, rss.delta_bytes / MB


def test_streaming_a_400_mb_npz_stays_far_below_its_size(tmp_path, capsys):
    rows, width = 102_400, 1024  # 400 MiB of float32
    path = tmp_path / "big.npz"
    x = np.random.default_rng(0).random((rows, width), dtype=np.float32)
    column_sum = float(x[:, 7].sum(dtype=np.float64))
    np.savez(path, x=x)
    del x
    gc.collect()
    size = path.stat().st_size
    assert size > 400 * MB

    data = NpzDataset(path, [InputSpec("x", np.dtype(np.float32), ("N", width))], batch_size=16)
    streamed_rows, streamed_sum, batches = 0, 0.0, 0
    with PeakRSS() as rss:
        for feed in data:
            streamed_rows += len(feed["x"])
            streamed_sum += float(feed["x"][:, 7].sum(dtype=np.float64))
            batches += 1
    assert (streamed_rows, batches) == (rows, rows // 16)
    assert abs(streamed_sum - column_sum) <= 1e-9 * column_sum
    assert rss.delta_bytes < 100 * MB, rss.delta_bytes / MB
    with capsys.disabled():
        print(f"\n  streamed {size / MB:.0f} MiB .npz in batches of 16: peak RSS +{rss.delta_bytes / MB:.1f} MiB")

    with PeakRSS() as loaded:  # the control: loading the array whole costs its size
        with np.load(path) as npz:
            whole = npz["x"]
        del whole
    assert loaded.delta_bytes > 0.9 * size
