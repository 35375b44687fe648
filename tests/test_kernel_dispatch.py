"""The CUDA dispatcher's decisions (cpp/src/kernel_dispatch.h), driven with made-up measurements
through the test bindings, so they hold without a GPU: which kernels tune() accepts (the correctness
check before any timing), which GEMV kernel per linear (mma_min_rows), which GEMM per bit-width and
where the GEMM takes over; how a table is applied to the linears; what a GPU refuses. On a GPU,
tests/test_engine_cuda.py runs the same code with real measurements.
"""
from __future__ import annotations

import math

import pytest

import flexquant_rt._core as core
from flexquant_rt import Engine, FlexquantError

BITS = range(2, 9)
OK = 1e-6  # a correct kernel's row error (fp32 rounding)


def group(**kw):
    g = dict(n=4096, k=4096, int8=True, mma_ok=True, wgmma_ok=True, bits_min=2, bits_max=8, max_m=256,
             odd_rows=300, all_rows=4096)
    g.update(kw)
    return g


class Probe:
    """error(group, kernel, bits, m) and time(groups, kernel, bits, m) from tables; records every call
    as (what, kernel, bits, m, groups)."""

    def __init__(self, errors=None, times=None):
        self.errors = errors or {}
        self.times = times
        self.calls = []

    def error(self, g, kernel, bits, m):
        self.calls.append(("error", kernel, bits, m, (g,)))
        e = self.errors.get(kernel, OK)
        return e(bits, m) if callable(e) else e

    def time(self, gs, kernel, bits, m):
        self.calls.append(("time", kernel, bits, m, tuple(gs)))
        return self.times(kernel, bits, m)

    def args(self):
        return self.error, self.time

    def timed(self, kernel):
        return [c for c in self.calls if c[0] == "time" and c[1] == kernel]


def choose(*groups, probe):
    return core._dispatch_choose(list(groups), *probe.args())


def gemv_time(kernel, bits, m):
    """TC's cost grows with the rows (launches of 8), MMA's hardly does: MMA wins from 8 rows."""
    per_launch = {"tc": 10.0 + 2.0 * min(m, 8), "mma": 22.0}[kernel]
    rows = {"tc": 8, "mma": 16}[kernel]
    return bits * per_launch * math.ceil(m / rows)


def times_a(kernel, bits, m):
    if kernel in ("tc", "mma", "mma_a16"):
        return gemv_time("mma" if kernel == "mma_a16" else kernel, bits, m)
    # the GEMMs: a fixed unpack cost plus a little per row; a8_wg faster below 5 bits
    base = {"a8": 300.0, "a8_wg": 280.0 if bits < 5 else 320.0, "a16": 500.0}[kernel]
    return base + 0.5 * m


def test_choose_accepts_correct_kernels_and_picks_the_fastest():
    p = Probe(times=times_a)
    table = choose(group(), probe=p)
    assert [d["bits"] for d in table] == list(BITS)
    for d in table:
        assert (d["n"], d["k"], d["act_bits"], d["rejected"]) == (4096, 4096, 8, "")
        assert d["mma_min_rows"] == 8  # per bit: MMA 22 a launch; TC 26 at 8 rows, 18 at 4
        assert d["gemm"] == ("a8_wg" if d["bits"] < 5 else "a8")
        # the GEMV (MMA, 16 rows a launch) against the GEMM at 32, 64, 128, 256 rows: the last m
        # the GEMV won (16 at 8 bits, 64 at 2)
        want = 16
        for m in (32, 64, 128, 256):
            if times_a(d["gemm"], d["bits"], m) < gemv_time("mma", d["bits"], m):
                break
            want = m
        assert d["decode_max_m"] == want, d
    assert {d["decode_max_m"] for d in table} == {16, 32, 64}
    # every candidate was checked at every bit-width before it was timed: MMA on every launch size
    # (1..16 rows), the GEMMs on max_m rows and on odd_rows
    checked = [(c[1], c[2], c[3]) for c in p.calls if c[0] == "error"]
    assert sorted(checked) == sorted([("mma", b, m) for b in BITS for m in range(1, 17)] +
                                     [(k, b, m) for k in ("a8", "a8_wg") for b in BITS for m in (256, 300)])
    first_timing = min(i for i, c in enumerate(p.calls) if c[0] != "error")
    assert max(i for i, c in enumerate(p.calls) if c[0] == "error" and c[1] == "mma") < first_timing
    assert max(i for i, c in enumerate(p.calls) if c[0] == "error") < \
        min(i for i, c in enumerate(p.calls) if c[0] == "time" and c[1].startswith("a8"))
    # the GEMV kernel: tc against mma at 16, 8, 4 (it stops at the first loss); all on this group
    assert {c[3] for c in p.calls if c[0] == "time" and c[3] <= 16} == {16, 8, 4}
    assert {c[4] for c in p.calls} == {(0,)}
    assert {c[1] for c in p.calls if c[0] == "time" and c[3] > 16} == {"a8", "a8_wg", "mma"}


def test_choose_tables_pass_the_engine_checks(tiny_fq):
    """Whatever choose() makes, Engine.set_kernel_table accepts (both backends check the fields)."""
    with Engine(tiny_fq, threads=1, kernel_table=None) as eng:
        n, k = int(eng._linear_shapes()[0]["n"]), int(eng._linear_shapes()[0]["k"])
        tables = []
        # (one shape per case: the cases differ in mma_min_rows, which one shape must not)
        for i, (kw, errors) in enumerate(((dict(), {}), (dict(int8=False), {}),
                                          (dict(mma_ok=False, wgmma_ok=False), {"a8": math.inf}),
                                          (dict(), {"mma": 0.5, "a8_wg": math.nan}))):
            p = Probe(errors=errors, times=times_a)
            tables += choose(group(n=n + i, k=k, **kw), probe=p)
        eng._eng.set_kernel_table(tables)
        assert eng.kernel_table() == tables


def test_choose_the_mma_rows_need_a_win_at_every_larger_measured_m():
    def times(order):
        def t(kernel, bits, m):
            if kernel == "mma":  # (past 16 rows, in the crossover search: as at 16)
                return 1.0 if order[min(m, 16)] else 3.0
            return 2.0 if kernel == "tc" else 1e9  # (the GEMMs never win)
        return t

    for wins, want in (({16: 1, 8: 1, 4: 0, 2: 1, 1: 1}, 8),   # a win at 2 after a loss at 4: from 8
                       ({16: 0, 8: 1, 4: 1, 2: 1, 1: 1}, 0),   # lost at 16: never
                       ({16: 1, 8: 1, 4: 1, 2: 1, 1: 1}, 1),   # the decode step too
                       ({16: 1, 8: 0, 4: 0, 2: 0, 1: 0}, 9)):  # 9..15 rows: two TC launches
        p = Probe(times=times(wins))
        table = choose(group(wgmma_ok=False), probe=p)
        assert {d["mma_min_rows"] for d in table} == {want}, wins
        # with the GEMM never winning, the GEMV keeps every measured m (up to max_m)
        assert {d["decode_max_m"] for d in table} == {256}
    # ties go to TC (the reference)
    p = Probe(times=lambda kernel, bits, m: 1.0 if kernel in ("tc", "mma") else 1e9)
    assert {d["mma_min_rows"] for d in choose(group(), probe=p)} == {0}


def test_choose_leaves_out_a_kernel_that_disagrees_and_never_times_it():
    lim = core.DISPATCH_MAX_ROW_ERROR
    # MMA off by 0.3 at 5 bits only: no MMA at any bit-width (one choice per linear), never timed
    p = Probe(errors={"mma": lambda bits, m: 0.3 if bits == 5 else OK}, times=times_a)
    table = choose(group(), probe=p)
    assert {d["mma_min_rows"] for d in table} == {0}
    assert not p.timed("mma")
    assert {d["rejected"] for d in table} == {f"mma: row error 0.3 > {lim:g} at 5 bits, 16 rows"}
    # the GEMV is then TC, 8 rows a launch: it is timed only in the crossover search, from 16 rows
    assert min(c[3] for c in p.timed("tc")) == 16
    # a8 wrong, a8_wg right: a8_wg everywhere, a8 never timed
    p = Probe(errors={"a8": 2e-3}, times=times_a)
    table = choose(group(), probe=p)
    assert {d["gemm"] for d in table} == {"a8_wg"} and not p.timed("a8")
    assert all(d["rejected"].startswith("a8: row error 0.002 > ") for d in table)
    # both GEMMs wrong (one with a NaN: an unwritten element): every pass on the GEMV
    p = Probe(errors={"a8": math.inf, "a8_wg": math.nan}, times=times_a)
    table = choose(group(all_rows=4096), probe=p)
    for d in table:
        assert (d["gemm"], d["decode_max_m"]) == ("", 4096)
        assert d["rejected"] == f"a8: row error inf > {lim:g} at 2 bits, 256 rows; " \
                                f"a8_wg: row error nan > {lim:g} at 2 bits, 256 rows"
    assert not p.timed("a8") and not p.timed("a8_wg")
    # an error exactly at the limit is accepted
    p = Probe(errors={"a8": lim}, times=times_a)
    assert all(d["rejected"] == "" for d in choose(group(), probe=p))


def test_choose_offers_only_the_kernels_that_can_run():
    # no MMA (group size), no wgmma (GPU): TC and a8, nothing checked or timed besides them
    p = Probe(times=times_a)
    table = choose(group(mma_ok=False, wgmma_ok=False), probe=p)
    assert {c[1] for c in p.calls} == {"a8", "tc"}
    assert {(d["gemm"], d["mma_min_rows"]) for d in table} == {("a8", 0)}
    # fp16 activations: the A16 GEMM against the MMA_A16 GEMV (16 rows a launch), no mma_min_rows
    p = Probe(times=times_a)
    table = choose(group(int8=False), probe=p)
    assert {c[1] for c in p.calls} == {"a16", "mma_a16"}
    assert {(d["act_bits"], d["gemm"], d["mma_min_rows"]) for d in table} == {(16, "a16", -1)}
    assert min(c[3] for c in p.timed("mma_a16")) == 32  # the search starts past one launch
    # bit-widths as asked; max_m below two launches: one comparison at max_m
    p = Probe(times=lambda kernel, bits, m: 1.0 if kernel.startswith("a") else 2.0)
    table = choose(group(bits_min=3, bits_max=5, max_m=16, mma_ok=False), probe=p)
    assert [d["bits"] for d in table] == [3, 4, 5]
    assert {d["decode_max_m"] for d in table} == {8}  # the GEMM wins at 16: the GEMV keeps one launch
    # a tie is no win: the GEMV keeps every m
    p = Probe(times=lambda kernel, bits, m: 1.0)
    assert {d["decode_max_m"] for d in choose(group(mma_ok=False), probe=p)} == {256}


def slot(n, k, act=8, wg=True, layer=True):
    return dict(n=n, k=k, act_bits=act, wgmma_ok=wg, layer=layer)


def test_apply_sets_each_linear_from_its_entries():
    big = 2 ** 63 - 1
    slots = [slot(64, 64), slot(64, 64, act=16), slot(64, 64, act=0), slot(128, 64, wg=False),
             slot(64, 64, layer=False), slot(128, 64, act=0)]
    # the defaults
    for gmr, wgd, mma in ((64, False, 0), (0, True, 3)):
        got = core._dispatch_apply([], slots, gmr, wgd, mma)
        for j, d in enumerate(got):
            assert d["gemv_max"] == [gmr - 1 if gmr else big] * 9
            assert d["gemm_wg"] == [wgd and slots[j]["wgmma_ok"]] * 9
            assert d["mma_from"] == mma
    table = [dict(n=64, k=64, bits=4, decode_max_m=32, act_bits=8, mma_min_rows=2, gemm="a8_wg"),
             dict(n=64, k=64, bits=5, decode_max_m=16, act_bits=8, mma_min_rows=2, gemm="a8"),
             dict(n=64, k=64, bits=4, decode_max_m=48, act_bits=16, mma_min_rows=-1, gemm="a16"),
             dict(n=128, k=64, bits=4, decode_max_m=8, act_bits=0),
             dict(n=128, k=64, bits=4, decode_max_m=24, act_bits=0)]  # a later entry wins
    got = core._dispatch_apply(table, slots, 64, True, 0)
    int8, fp16, fp32, other, head, other_fp32 = got
    assert int8["gemv_max"][4] == 32 and int8["gemv_max"][5] == 16 and int8["gemv_max"][6] == 63
    assert int8["gemm_wg"][4] and not int8["gemm_wg"][5] and int8["gemm_wg"][6]  # 6: the default (wgmma_default)
    assert int8["mma_from"] == 2
    assert fp16["gemv_max"][4] == 48 and fp16["mma_from"] == 0  # (mma is for int8 linears)
    assert fp32["gemv_max"] == [63] * 9  # fp32 activations: no entry applies
    assert other["gemv_max"][4] == 24 and other["gemm_wg"] == [False] * 9  # a8_wg cannot run it
    assert head["gemv_max"] == [63] * 9 and head["mma_from"] == 0  # the LM head keeps the defaults
    assert other_fp32["gemv_max"] == [63] * 9  # act_bits 0 means int8 and fp16, never fp32


def test_refusal_names_the_linear_and_the_cause():
    slots = [slot(64, 64), slot(128, 64, wg=False), slot(128, 64, act=16, wg=False), slot(64, 64, layer=False, wg=False)]
    wg = dict(n=128, k=64, bits=4, decode_max_m=8, act_bits=8, mma_min_rows=0, gemm="a8_wg")
    assert core._dispatch_refusal([dict(wg, n=64)], slots, [128] * 4) == ""  # the head does not count
    assert core._dispatch_refusal([dict(wg, gemm="a8")], slots, [128] * 4) == ""
    assert core._dispatch_refusal([dict(wg, n=64), wg], slots, [128, 64, 64, 128]) == \
        "kernel table entry 1: gemm 'a8_wg' cannot run linear 1 (128 x 64): its group size 64 is not a multiple of 128"
    assert core._dispatch_refusal([wg], slots, [128] * 4) == \
        "kernel table entry 0: gemm 'a8_wg' cannot run linear 1 (128 x 64): this GPU or build has no sm_90a wgmma"


def test_a_kernel_that_cannot_run_is_left_out_and_other_errors_pass_through():
    # a check refused before the kernel ran (FlexquantError from error(): no TMA entry point in the
    # driver, say) leaves that kernel out with the message; the others stay
    def refuse(which, rows):
        def error(g, kernel, bits, m):
            if kernel == which and m in rows:
                raise FlexquantError(f"{kernel} cannot start")
            return OK
        return error

    p = Probe(times=times_a)
    table = core._dispatch_choose([group()], refuse("a8_wg", (256,)), p.time)
    assert {d["gemm"] for d in table} == {"a8"} and not p.timed("a8_wg")
    assert {d["rejected"] for d in table} == {"a8_wg: a8_wg cannot start at 2 bits, 256 rows"}
    # the MMA GEMV refused at one launch size only: left out, never timed
    p = Probe(times=times_a)
    table = core._dispatch_choose([group()], refuse("mma", (3,)), p.time)
    assert {d["mma_min_rows"] for d in table} == {0} and not p.timed("mma")
    assert {d["rejected"] for d in table} == {"mma: mma cannot start at 2 bits, 3 rows"}

    # any other failure, of a check or of a timing, ends choose() with it
    def lost(*args):
        raise RuntimeError("device lost")

    for error, time in ((lost, Probe(times=times_a).time), (Probe().error, lost)):
        with pytest.raises(FlexquantError, match="device lost"):
            core._dispatch_choose([group()], error, time)


def test_choose_times_the_gemv_kernel_once_for_the_linears_that_share_an_input():
    """q (4096 x 4096) and k/v (1024 x 4096) read the same input and share GEMV launches: one
    mma_min_rows for both, timed over both; down (4096 x 11008) reads another and is timed alone.
    When the MMA check fails for one shape of a k, none of that k uses it."""
    q, kv, down = group(n=4096, k=4096), group(n=1024, k=4096), group(n=4096, k=11008)
    fp16 = group(n=4096, k=4096, int8=False)
    p = Probe(times=times_a)
    table = core._dispatch_choose([q, kv, down, fp16], *p.args())
    gemv_sets = {c[4] for c in p.calls if c[0] == "time" and c[1] in ("tc", "mma") and c[3] <= 16}
    assert gemv_sets == {(0, 1), (2,)}  # (the fp16 group has no GEMV choice)
    by_shape = {}
    for d in table:
        by_shape.setdefault((d["n"], d["k"], d["act_bits"]), set()).add(d["mma_min_rows"])
    assert by_shape == {(4096, 4096, 8): {8}, (1024, 4096, 8): {8}, (4096, 11008, 8): {8},
                        (4096, 4096, 16): {-1}}
    # the MMA check of k/v fails: q keeps TC too (with a note), down is unaffected
    p = Probe(errors={"mma": lambda bits, m: 0.5 if p.calls[-1][4] == (1,) else OK}, times=times_a)
    table = core._dispatch_choose([q, kv, down], *p.args())
    got = {(d["n"], d["k"]): (d["mma_min_rows"], d["rejected"]) for d in table}
    assert got[(4096, 4096)][0] == 0 and got[(1024, 4096)][0] == 0 and got[(4096, 11008)][0] == 8
    assert got[(4096, 4096)][1] == "mma: not used, as for every linear of k = 4096 (they share launches): " \
                                   "another shape cannot run it or was left out"
    assert got[(1024, 4096)][1].startswith("mma: row error 0.5 > ")
    assert got[(4096, 11008)][1] == ""
    # one shape of a k whose group size the MMA kernel lacks: none of that k uses it either
    table = core._dispatch_choose([q, group(n=1024, k=4096, mma_ok=False)], *Probe(times=times_a).args())
    assert {d["mma_min_rows"] for d in table} == {0}


def test_choose_with_max_m_of_one_mma_launch():
    """max_m = 16 with MMA chosen: no crossover to search, the GEMV takes the 16 rows; the GEMM is
    still chosen (for longer passes)."""
    p = Probe(times=times_a)
    table = choose(group(max_m=16, odd_rows=40), probe=p)
    assert {(d["mma_min_rows"], d["decode_max_m"]) for d in table} == {(8, 16)}
    assert {d["gemm"] for d in table} == {"a8", "a8_wg"}
    assert {c[3] for c in p.calls if c[0] == "error" and c[1].startswith("a8")} == {16, 40}


def test_numpy_integers_are_table_fields(tiny_fq):
    import numpy as np

    with Engine(tiny_fq, threads=1, kernel_table=None) as eng:
        d = eng._linear_shapes()[0]
        t = [dict(n=np.int64(d["n"]), k=np.int32(d["k"]), bits=np.int8(8), decode_max_m=np.uint16(3))]
        eng._eng.set_kernel_table(t)
        assert eng.kernel_table() == [dict(n=int(d["n"]), k=int(d["k"]), bits=8, decode_max_m=3)]
