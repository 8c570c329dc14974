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
