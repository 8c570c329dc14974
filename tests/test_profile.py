import copy
import os

import pytest

from specexec.verifier.disk_streamer import attach
from specexec.verifier.profile import disk_limit, read_bandwidth
from tiny_models import tiny_lm


@pytest.mark.parametrize("size", [4096 * 5, 4096 * 5 + 123])  # an unaligned tail under O_DIRECT
def test_read_bandwidth_reads_whole_files(tmp_path, size):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    gbps, direct = read_bandwidth([str(path)], chunk=8192)
    assert gbps > 0 and isinstance(direct, bool)


def test_disk_limit_is_streamed_bytes_over_bandwidth(tmp_path):
    model = copy.deepcopy(tiny_lm("llama", layers=4, seed=4))
    streamer = attach(model, str(tmp_path), budget=0, resident=1)
    try:
        limit = disk_limit(streamer)
        assert limit.bytes_per_pass == 3 * streamer.store.layers[0].size and limit.gbps > 0
        assert limit.limit_s == pytest.approx(limit.bytes_per_pass / limit.gbps / 1e9)
        assert "GB read per pass" in limit.describe()
    finally:
        streamer.close()


def test_curve_against_the_disk_limit():
    from specexec.verifier.profile import DiskLimit, against_limit
    limit = DiskLimit(bytes_per_pass=2 * 10**9, gbps=0.5, direct_io=True)
    assert limit.limit_s == 4.0
    assert against_limit({64: 4.6, 1: 4.0}, limit) == "1: 4.00 s = 1.00x, 64: 4.60 s = 1.15x"


def test_forward_curve_of_a_disk_streamed_target(tmp_path):
    from specexec.verifier.profile import forward_curve
    from specexec.verifier.target_model import TargetModel
    model = copy.deepcopy(tiny_lm("llama", layers=4, seed=4))
    streamer = attach(model, str(tmp_path), budget=0, resident=1)
    try:
        curve = forward_curve(TargetModel(model), sizes=(1, 4), prefix=16, trials=1)
        assert set(curve) == {1, 4} and all(t > 0 for t in curve.values())
        stats = streamer.snapshot()
        assert stats.passes == 4 and stats.bytes_read >= 4 * 3 * streamer.store.layers[0].size
    finally:
        streamer.close()
