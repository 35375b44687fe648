"""View-aware GPTQ (python/flexquant_rt/nested_gptq.py, cpp/src/ops/nested_gptq.cpp): the C++ block
against its numpy twin, the reductions to known quantizers, and the output error of every view on
held-out activations against nested round-to-nearest."""
from __future__ import annotations

import numpy as np
import pytest

from flexquant_rt import bitplane, nested_gptq
from flexquant_rt._core import ops


def _block_inputs(rng, n=37, b=24, k_groups=4, views=(3, 4, 5, 6, 7, 8), use=None, group=32):
    """Random targets around min-max groups and a random SPD H's factor (never zeros)."""
    w = rng.standard_normal((n, b * k_groups)).astype(np.float32) * 0.05
    _, qp = bitplane.quantize(w, 8, group)
    x = rng.standard_normal((4 * b, b)) @ rng.standard_normal((b, b))  # correlated inputs
    u = nested_gptq.inverse_hessian_factor(x.T @ x / len(x))
    group_of = (rng.permutation(b * k_groups)[:b] // group).astype(np.int32)
    vs, lam = nested_gptq.view_weights(use or {k: 1.0 for k in views}, 8)
    wv = np.repeat(w[:, :b][None], len(vs), 0).copy()
    wv += rng.standard_normal(wv.shape).astype(np.float32) * 0.003  # the views' targets differ
    return wv, u, np.ascontiguousarray(qp[..., 0].astype(np.float32)), \
        np.ascontiguousarray(qp[..., 1].astype(np.float32)), group_of, vs, lam


def _block_matches_numpy(wv, u, s, m, g, vs, lam):
    """Runs the C++ block and its numpy twin on the same inputs; returns the codes."""
    w_ref = wv.copy()
    codes, err = ops.nested_gptq_block(wv, u, s, m, g, vs, lam)
    codes_ref, err_ref = nested_gptq.block_reference(w_ref, u, s, m, g, vs, lam)
    np.testing.assert_array_equal(codes, codes_ref)
    np.testing.assert_allclose(err, err_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wv, w_ref, rtol=1e-5, atol=1e-5)
    return codes


@pytest.mark.parametrize("view", [2, 4, 8])
def test_one_view_block_matches_numpy_exactly(view):
    """With one view the argmin is the nearest code: codes, errors and updated targets equal the
    numpy twin's."""
    codes = _block_matches_numpy(*_block_inputs(np.random.default_rng(view), views=(view,)))
    # only the top `view` bits carry information; the rest are the first (zero) on ties
    assert np.all(codes & ((1 << (8 - view)) - 1) == 0) or view == 8


@pytest.mark.parametrize("noise", [0.0, 0.003, 0.02])
def test_multi_view_block_matches_numpy(noise):
    """Several views whose targets disagree (by `noise`): the C++ tree search finds the exhaustive
    argmin, so codes, errors and updated targets equal the numpy twin's."""
    rng = np.random.default_rng(1)
    wv, u, s, m, g, vs, lam = _block_inputs(rng, n=200, b=32, use={3: 0.3, 4: 1, 5: 0.3, 6: 0.3, 7: 0.3, 8: 0.3})
    wv += rng.standard_normal(wv.shape).astype(np.float32) * noise
    _block_matches_numpy(wv, u, s, m, g, vs, lam)


def test_results_do_not_depend_on_threads():
    rng = np.random.default_rng(2)
    wv, u, s, m, g, vs, lam = _block_inputs(rng, n=300)
    a = wv.copy()
    c1, e1 = ops.nested_gptq_block(a, u, s, m, g, vs, lam, threaded=True)
    c2, e2 = ops.nested_gptq_block(wv, u, s, m, g, vs, lam, threaded=False)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(a, wv)


def test_diagonal_hessian_and_eight_bit_view_is_round_to_nearest():
    """Uncorrelated inputs (H diagonal) leave nothing to compensate: with only the 8-bit view the
    codes are the min-max round-to-nearest codes of bitplane.quantize."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, 256))
    codes, qp = nested_gptq.quantize(w, h, 8, 64, use={8: 1.0})
    rc, rq = bitplane.quantize(w, 8, 64)
    np.testing.assert_array_equal(qp, rq)
    assert np.mean(codes == rc) > 0.999  # ties of float32 vs float64 division aside
    assert np.all(np.abs(codes.astype(int) - rc) <= 1)


def _correlated(rng, tokens, a):
    """Activations as in real LLMs: a strong low-rank part (rank 32: channels move together) plus
    heavy-tailed per-channel noise, channel scales spread over e^±0.5."""
    k = a.shape[1]
    x = 0.3 * rng.standard_t(4, (tokens, k)) + rng.standard_normal((tokens, a.shape[0])) @ a
    return (x * np.exp(0.5 * np.linspace(-1, 1, k))).astype(np.float32)


@pytest.mark.parametrize("group", [64, 128])
def test_every_view_beats_nested_round_to_nearest_on_held_out_inputs(group):
    """The output error ||(W_k − W) x|| of every view 3..8 on held-out activations is below that of
    the min-max nested views, and the 4-bit view's clearly so."""
    rng = np.random.default_rng(4)
    n, k = 192, 512
    a = 2.0 * rng.standard_normal((32, k))
    w = (0.02 * rng.standard_normal((n, k))).astype(np.float32)
    w[:, rng.choice(k, 4, replace=False)] *= 8
    x_cal, x_ev = _correlated(rng, 4096, a), _correlated(rng, 4096, a)
    codes, qp = nested_gptq.quantize(w, x_cal.T.astype(np.float64) @ x_cal / len(x_cal), 8, group)
    rc, rq = bitplane.quantize(w, 8, group)
    y = x_ev @ w.T

    def err(c, q, bits):
        return float(np.linalg.norm(x_ev @ bitplane.dequantize(c, q, bits, 8, group).T - y) / np.linalg.norm(y))
    ratios = {b: err(codes, qp, b) / err(rc, rq, b) for b in range(3, 9)}
    assert all(r < 1.0 for r in ratios.values()), ratios
    assert ratios[4] < 0.85, ratios
    # every view is still a view of the same group grid: inside [min, max] of its group
    lo = rq[..., 1].astype(np.float32)[:, np.arange(k) // group]
    hi = lo + 255 * rq[..., 0].astype(np.float32)[:, np.arange(k) // group]
    for b in range(3, 9):
        v = bitplane.dequantize(codes, qp, b, 8, group)
        assert np.all((v >= lo - 1e-6) & (v <= hi + 1e-6))


def test_max_bits_below_eight_uses_only_its_views():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((256, 64)) @ rng.standard_normal((64, 64))
    codes, qp = nested_gptq.quantize(w, x.T @ x / 256, 4, 32)
    assert codes.max() <= 15
    np.testing.assert_array_equal(qp, bitplane.quantize(w, 4, 32)[1])
    vs, lam = nested_gptq.view_weights(nested_gptq.VIEW_USE, 4)
    assert vs.tolist() == [3, 4] and lam[1] == 1.0


def test_dead_columns_and_bad_input():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = rng.standard_normal((256, 64))
    x[:, 5] = 0.0  # an input no calibration token reached
    codes, _ = nested_gptq.quantize(w, x.T @ x / 256, 8, 32)
    assert codes.shape == (8, 64)
    with pytest.raises(ValueError, match=r"hessian: expected shape \(64, 64\)"):
        nested_gptq.quantize(w, np.eye(32), 8, 32)
    with pytest.raises(ValueError, match="inf or nan"):
        nested_gptq.quantize(w, np.full((64, 64), np.nan), 8, 32)
    not_psd = np.full((64, 64), 50.0)  # eigenvalues -49 (x63): beyond any dampening
    not_psd[np.diag_indices(64)] = 1.0
    with pytest.raises(ValueError, match="not positive definite"):
        nested_gptq.quantize(w, not_psd, 8, 32)
    with pytest.raises(ValueError, match="diagonal entry 3 is negative"):
        nested_gptq.quantize(w, np.diag(np.r_[1.0, 1.0, 1.0, -1.0, np.ones(60)]), 8, 32)
    with pytest.raises(ValueError, match="positive weight"):
        nested_gptq.quantize(w, np.eye(64), 8, 32, use={9: 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        nested_gptq.view_weights({4: -1.0, 8: 1.0}, 8)


def test_block_binding_rejects_bad_arrays():
    rng = np.random.default_rng(7)
    wv, u, s, m, g, vs, lam = _block_inputs(rng)
    with pytest.raises(TypeError, match="w: expected dtype float32"):
        ops.nested_gptq_block(wv.astype(np.float64), u, s, m, g, vs, lam)
    with pytest.raises(ValueError, match=r"u: expected shape \(24, 24\)"):
        ops.nested_gptq_block(wv, u[:3, :3].copy(), s, m, g, vs, lam)
    with pytest.raises(ValueError, match=r"views: expected shape \(6,\)"):
        ops.nested_gptq_block(wv, u, s, m, g, vs[:2].copy(), lam)
    bad = g.copy()
    bad[3] = 99
    with pytest.raises(ValueError, match="group index 99 of column 3"):
        ops.nested_gptq_block(wv, u, s, m, bad, vs, lam)
    with pytest.raises(ValueError, match="view 5 is outside 1..4"):
        ops.nested_gptq_block(wv, u, s, m, g, vs, lam, max_bits=4)
    u0 = u.copy()
    u0[2, 2] = 0.0
    with pytest.raises(ValueError, match=r"U\[2,2\] must be positive"):
        ops.nested_gptq_block(wv, u0, s, m, g, vs, lam)
    ro = wv.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        ops.nested_gptq_block(ro, u, s, m, g, vs, lam)
