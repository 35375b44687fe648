"""ThreadPool::parallel_for's scheduling (cpp/src/thread_pool.cpp), through ops.parallel_for_trace.

Each thread owns a contiguous share of the chunks and runs it from the front; a thread done with its
own takes chunks from the back of the others' (the decode kernels stream weights faster when a
thread's chunks are adjacent). These tests check what holds whatever the timing: every index once,
chunks of `grain`, and per thread and share, a run from the share's front in order (its owner) or
claims from the back (a thief). The caller always owns share 0.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest

import flexquant_rt._core as core
from conftest import host_cxx
from flexquant_rt import bitplane

trace = core.ops.parallel_for_trace


def shares(n: int, grain: int, threads: int) -> list[tuple[int, int]]:
    """The chunk ranges [c0, c1) of each thread's share, as parallel_for splits them."""
    c = -(-n // grain)
    return [(c * t // threads, c * (t + 1) // threads) for t in range(threads)]


def check_trace(rows: np.ndarray, n: int, grain: int, threads: int) -> None:
    begin, end, thread, order = rows.T
    # every index exactly once, in chunks of grain (the last one shorter)
    idx = np.argsort(begin)
    assert begin[idx].tolist() == list(range(0, n, grain))
    assert end[idx].tolist() == [min(b + grain, n) for b in range(0, n, grain)]
    assert sorted(order.tolist()) == list(range(len(rows)))
    if threads == 1 or n <= grain:
        assert (thread == 0).all()  # serial on the caller, in order
        assert np.array_equal(order[idx], np.arange(len(rows)))
        return
    chunk = begin // grain
    for s, (c0, c1) in enumerate(shares(n, grain, threads)):
        in_share = (chunk >= c0) & (chunk < c1)
        if c0 == c1:
            continue
        # the share's owner ran a prefix of it in order, the others (each from the back) the rest;
        # the thread that ran its front chunk is the owner unless that one never came (then thieves
        # took it all, the last from the front)
        first = thread[in_share & (chunk == c0)]
        assert len(first) == 1
        runs = in_share & (thread == first[0])
        seq = chunk[runs][np.argsort(order[runs])]
        if seq.tolist() == list(range(c0, c0 + len(seq))):
            assert (chunk[in_share & (thread != first[0])] > seq.max()).all()
        for t in np.unique(thread[in_share]):
            mine = in_share & (thread == t)
            seq = chunk[mine][np.argsort(order[mine])]  # this thread's chunks of share s, as it ran them
            front = seq.tolist() == list(range(c0, c0 + len(seq)))
            back = bool(np.all(np.diff(seq) < 0))
            if t == 0 and s == 0:
                assert front, f"the caller ran its share out of order: {seq.tolist()}"
            elif t == 0:
                assert back, f"the caller took share {s}'s chunks {seq.tolist()}, not from the back"
            else:
                # a worker's own share from the front, or another's from the back
                assert front or back, f"thread {t} ran share {s}'s chunks as {seq.tolist()}"
            if s == 0 and t != 0:
                assert back, f"thread {t} took the caller's chunks {seq.tolist()}, not from the back"


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("n,grain", [(1, 1), (7, 1), (7, 3), (100, 1), (100, 7), (1000, 64), (64, 64), (65, 64)])
@pytest.mark.parametrize("chunk_us", [0.0, 30.0])
def test_parallel_for_covers_every_index_once_in_owned_shares(threads, n, grain, chunk_us):
    for _ in range(3):
        check_trace(trace(n, grain, threads, chunk_us=chunk_us), n, grain, threads)


def test_parallel_for_shares_work_when_chunks_are_slow():
    # 2 threads, 40 chunks of 2 ms (sleeps: the caller leaves its core free): the worker must have run
    # some of them, from the front of its share, chunk 20 (a pool that left all to the caller would
    # pass the coverage checks)
    rows = trace(40, 1, 2, chunk_us=2000.0)
    check_trace(rows, 40, 1, 2)
    worker = rows[rows[:, 2] != 0]
    assert len(worker) >= 1
    assert worker[np.argmin(worker[:, 3]), 0] == 20


@pytest.mark.parametrize("n,grain,threads", [(30, 1, 3), (100, 7, 4)])
def test_parallel_for_shares_split_as_documented(n, grain, threads):
    # chunks of 3 ms (sleeps): the caller starts on the front of share 0, and some worker on the front
    # of another share (its own, unless it started so late that a thief had emptied that), at the
    # boundaries `shares` computes
    assert shares(10, 1, 3) == [(0, 3), (3, 6), (6, 10)]
    rows = trace(n, grain, threads, chunk_us=3000.0)
    check_trace(rows, n, grain, threads)
    first = {int(t): int(rows[rows[:, 2] == t][np.argmin(rows[rows[:, 2] == t][:, 3]), 0]) for t in np.unique(rows[:, 2])}
    assert first.get(0) == 0
    own_fronts = {c0 * grain for c0, c1 in shares(n, grain, threads)[1:]}
    assert any(b in own_fronts for t, b in first.items() if t != 0), first


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("fail_at", [0, 57, 99])
def test_parallel_for_rethrows_the_chunks_exception(threads, fail_at):
    with pytest.raises(RuntimeError, match=rf"chunk \[{fail_at // 10 * 10}, {fail_at // 10 * 10 + 10}\) failed"):
        trace(100, 10, threads, fail_at=fail_at)
    check_trace(trace(100, 10, threads), 100, 10, threads)  # a new pool runs normally after it


def test_parallel_for_trace_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"threads must be in 1\.\.256, got 0"):
        trace(10, 1, 0)
    with pytest.raises(ValueError, match=r"chunk_us must be in \[0, 1e6\], got -1"):
        trace(10, 1, 2, chunk_us=-1.0)


def test_set_num_threads_while_ops_run_on_other_threads():
    # the ops release the GIL: set_num_threads from one thread while others run ops on the same pool
    # waits for the running call instead of replacing its workers under it
    import threading

    rng = np.random.default_rng(7)
    n, k = 1024, 1536
    w = rng.standard_normal((n, k)).astype(np.float32)
    planes, qparams = bitplane.quantize_to_planes(w, 8, 128)
    x = rng.standard_normal((3, k)).astype(np.float32)
    ref = core.ops.bitplane_matmul(planes, qparams, n, k, 8, 128, 6, x, "decode")
    before = core.ops.get_num_threads()
    errors = []

    def run():
        try:
            for _ in range(180):
                y = core.ops.bitplane_matmul(planes, qparams, n, k, 8, 128, 6, x, "decode")
                assert np.array_equal(y, ref)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=run) for _ in range(2)]
    for t in workers:
        t.start()
    try:
        i = 0
        while any(t.is_alive() for t in workers):  # resize the pool for as long as the ops run
            core.ops.set_num_threads(2 + i % 3)
            i += 1
        for t in workers:
            t.join()
    finally:
        core.ops.set_num_threads(before)
    assert not errors


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(platform.system() != "Linux", reason="ThreadSanitizer build: Linux only here")
def test_thread_pool_under_thread_sanitizer(tmp_path):
    """tests/cpu_host/thread_pool_stress.cpp with -fsanitize=thread: parallel_fors of every size and
    grain with exceptions, a second caller, and the pool resized all along. (The pool before the
    shares, with set_num_threads not waiting, gave a ThreadSanitizer data race report here.)"""
    cxx = host_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "stress"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread", f"-I{REPO / 'cpp' / 'src'}",
                            str(REPO / "tests" / "cpu_host" / "thread_pool_stress.cpp"),
                            str(REPO / "cpp" / "src" / "thread_pool.cpp"), "-o", str(exe), "-pthread"],
                           capture_output=True, text=True)
    if build.returncode:
        pytest.skip(f"{cxx} cannot build with -fsanitize=thread here: {build.stderr[-300:]}")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    if run.returncode and "ThreadSanitizer" in run.stderr and "FATAL" in run.stderr:
        pytest.skip(f"ThreadSanitizer does not run here: {run.stderr[-300:]}")
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert run.stdout.startswith("bad 0 caught 31 of 31"), run.stdout
