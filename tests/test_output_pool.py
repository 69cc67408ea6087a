"""The CPU output pool (locdiff.set_output_cache): large outputs reuse the blocks of dropped
ones, never memory still in use, with the same values as torch-allocated outputs."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import locdiff
from locdiff.ops import output_pool

DEGREE = 64
ROWS = (8 << 20) // (8 * (DEGREE + 1) ** 2)  # 8 MB float64 outputs: whole 2 MiB blocks


@pytest.fixture
def pool():
    previous = locdiff.set_output_cache(1 << 30)
    yield
    locdiff.set_output_cache(previous)


def unpooled(xyz, degree):
    previous = locdiff.set_output_cache(0)
    try:
        return locdiff.spherical_harmonics(xyz, degree)
    finally:
        locdiff.set_output_cache(previous)


def test_a_dropped_output_is_reused_with_the_same_values(pool, rng):
    xyz = torch.tensor(rng.normal(size=(ROWS, 3)))
    first = locdiff.spherical_harmonics(xyz, DEGREE)
    address = first.data_ptr()
    assert address % (2 << 20) == 0  # whole huge pages
    expected = unpooled(xyz, DEGREE)
    assert torch.equal(first, expected)
    del first
    assert locdiff.output_cache_bytes() >= expected.nbytes
    other = torch.tensor(rng.normal(size=(ROWS, 3)))
    second = locdiff.spherical_harmonics(other, DEGREE)
    assert second.data_ptr() == address
    assert torch.equal(second, unpooled(other, DEGREE))


def test_memory_in_use_is_never_handed_out_again(pool, rng):
    xyz = torch.tensor(rng.normal(size=(ROWS, 3)))
    y = locdiff.spherical_harmonics(xyz, DEGREE)
    view = y[1:]  # a view keeps the whole block
    keep_np = locdiff.spherical_harmonics(xyz.numpy(), DEGREE)  # numpy out: its base keeps it
    saved, saved_np = view.clone(), keep_np.copy()
    del y
    outs = [locdiff.spherical_harmonics(torch.tensor(rng.normal(size=(ROWS, 3))), DEGREE) for _ in range(3)]
    held = {view.untyped_storage().data_ptr(), keep_np.ctypes.data}
    assert not held & {o.data_ptr() for o in outs}
    assert torch.equal(view, saved) and np.array_equal(keep_np, saved_np)
    assert keep_np.flags.writeable


def test_small_outputs_and_a_zero_limit_bypass_the_pool(pool, rng):
    small = locdiff.spherical_harmonics(torch.tensor(rng.normal(size=(10, 3))), DEGREE)
    assert small.data_ptr() % (2 << 20) != 0  # torch's own allocation (pool blocks are 2 MiB aligned)
    y = locdiff.spherical_harmonics(torch.tensor(rng.normal(size=(ROWS, 3))), DEGREE)
    locdiff.set_output_cache(0)
    assert locdiff.output_cache_bytes() == 0
    del y  # in use when the limit dropped: unmapped on release, not cached
    assert locdiff.output_cache_bytes() == 0
    xyz = torch.tensor(rng.normal(size=(ROWS, 3)))
    off = locdiff.spherical_harmonics(xyz, DEGREE)
    assert off.data_ptr() % (2 << 20) != 0
    locdiff.set_output_cache(1 << 30)
    assert torch.equal(off, locdiff.spherical_harmonics(xyz, DEGREE))
    locdiff.set_output_cache(0)
    del off
    assert locdiff.output_cache_bytes() == 0


def test_the_limit_evicts_the_oldest_blocks(pool, rng):
    xyz = torch.tensor(rng.normal(size=(ROWS, 3)))
    outs = [locdiff.spherical_harmonics(xyz, DEGREE) for _ in range(3)]
    addresses = [o.data_ptr() for o in outs]
    capacity = -(-outs[0].nbytes // (2 << 20)) * (2 << 20)  # whole 2 MiB pages
    locdiff.set_output_cache(2 * capacity + capacity // 2)
    while outs:  # released first to last: the first leaves the cache when the third arrives
        del outs[0]
    assert locdiff.output_cache_bytes() == 2 * capacity
    again = [locdiff.spherical_harmonics(xyz, DEGREE) for _ in range(2)]
    assert {a.data_ptr() for a in again} == set(addresses[1:])


def test_the_last_released_block_is_reused_first(pool, rng):
    # A loop that makes and drops one output at a time must keep writing the same block
    # (still in cache), not cycle through every cached block of that size.
    locdiff.set_output_cache(0)
    locdiff.set_output_cache(1 << 30)
    xyz = torch.tensor(rng.normal(size=(ROWS, 3)))
    first, second = locdiff.spherical_harmonics(xyz, DEGREE), locdiff.spherical_harmonics(xyz, DEGREE)
    newest = second.data_ptr()
    del first, second  # both cached, second released last
    for _ in range(3):
        y = locdiff.spherical_harmonics(xyz, DEGREE)
        assert y.data_ptr() == newest
        del y


def test_threads_get_their_own_blocks(pool, rng):
    inputs = [torch.tensor(rng.normal(size=(ROWS, 3))) for _ in range(4)]
    expected = [unpooled(x, DEGREE) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            results[i] = locdiff.spherical_harmonics(inputs[i], DEGREE)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_outputs_of_a_megabyte_take_page_sized_blocks(pool, rng):
    # Between POOL_MIN_BYTES and 2 MiB a block is whole 4 KiB pages, not a 2 MiB huge page.
    degree = 16
    rows = (3 * output_pool.POOL_MIN_BYTES // 2) // (8 * (degree + 1) ** 2) + 1  # about 1.5 MB
    locdiff.set_output_cache(0)
    locdiff.set_output_cache(1 << 30)
    xyz = torch.tensor(rng.normal(size=(rows, 3)))
    first = locdiff.spherical_harmonics(xyz, degree)
    address, nbytes = first.data_ptr(), first.nbytes
    assert address % 4096 == 0 and output_pool.POOL_MIN_BYTES <= nbytes < 2 << 20
    assert torch.equal(first, unpooled(xyz, degree))
    del first
    assert locdiff.output_cache_bytes() == -(-nbytes // 4096) * 4096
    other = torch.tensor(rng.normal(size=(rows, 3)))
    second = locdiff.spherical_harmonics(other, degree)
    assert second.data_ptr() == address
    assert torch.equal(second, unpooled(other, degree))
    below = locdiff.spherical_harmonics(torch.tensor(rng.normal(size=(rows // 2, 3))), degree)
    assert below.nbytes < output_pool.POOL_MIN_BYTES and locdiff.output_cache_bytes() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limits_name_the_value(bad):
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 0"):
        locdiff.set_output_cache(bad)


@pytest.mark.parametrize("value,expect", [("0", "0"), ("1.5", str(3 << 19)), ("lots", "must be a number of MB")])
def test_the_environment_sets_the_limit(value, expect):
    code = "import locdiff; print(locdiff.set_output_cache(0))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LOCDIFF_OUTPUT_CACHE_MB": value})
    assert expect in (run.stdout if run.returncode == 0 else run.stderr)


def _child_harmonics(xyz):
    # One thread, as torch's DataLoader workers run: GNU OpenMP cannot start a team in a
    # child forked after the parent used one (torch's own ops hang there too).
    torch.set_num_threads(1)
    return locdiff.spherical_harmonics(xyz, DEGREE).numpy().copy()


def test_a_forked_child_uses_its_own_pool(pool, rng):
    import multiprocessing

    xyz = torch.tensor(rng.normal(size=(ROWS, 3)))
    expected = unpooled(xyz, DEGREE).numpy()
    held = locdiff.spherical_harmonics(xyz, DEGREE)  # a block in use in the parent
    del held  # ... and one cached: the child inherits both states
    with multiprocessing.get_context("fork").Pool(1) as workers:
        assert np.array_equal(workers.apply(_child_harmonics, (xyz,)), expected)


def test_the_default_limit_is_1_gib_or_a_sixteenth_of_memory():
    env = {k: v for k, v in os.environ.items() if k != "LOCDIFF_OUTPUT_CACHE_MB"}
    run = subprocess.run([sys.executable, "-c", "import locdiff; print(locdiff.set_output_cache(0))"],
                         capture_output=True, text=True, env=env, check=True)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert int(run.stdout) == min(1 << 30, physical // 16)
