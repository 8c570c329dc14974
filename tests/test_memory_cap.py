"""The cgroup a bench puts its verifier in: limits that hold, a peak that is read back, page
cache dropped, and a plain error where the machine cannot make one."""

import os
import subprocess
import sys

import pytest

from specexec.launch.memory_cap import CapOptions, CapUnavailable, MemoryCap, drop_from_page_cache, parse_size


def test_sizes_parse_as_powers_of_1024_and_bad_ones_are_named():
    assert parse_size("1800M") == 1800 * 2**20
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512") == 512
    with pytest.raises(ValueError, match="'lots' is not a size"):
        parse_size("lots")


def _cap(tmp_path, memory="96M"):
    try:
        return MemoryCap.create(CapOptions(memory, paths=(str(tmp_path),)))
    except CapUnavailable as err:
        pytest.skip(f"no memory cgroup here: {err}")


def _run_inside(cap, code):
    return subprocess.run([sys.executable, "-c", code], preexec_fn=lambda: cap.add(os.getpid()))


def test_a_process_inside_is_held_to_the_limit_and_its_peak_is_read(tmp_path):
    cap = _cap(tmp_path)
    try:
        ok = _run_inside(cap, "x = bytearray(40 * 2**20); x[::4096] = b'1' * len(x[::4096])")
        assert ok.returncode == 0
        assert 40 * 2**20 <= cap.peak_bytes() <= 96 * 2**20
        over = _run_inside(cap, "x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096])")
        assert over.returncode != 0  # killed by the cgroup's OOM handling, not allowed past it
    finally:
        cap.close()


def test_dropping_a_folder_from_the_page_cache_visits_every_file(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 10)
    assert drop_from_page_cache(str(tmp_path)) == 2
