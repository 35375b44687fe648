"""Batched decode: several sequences in one engine (n_seq), one step of all of them per pass.

References: transformers on the exported k-bit view (each sequence alone), the engine's own
single-sequence path, and generate() run prompt by prompt.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import flexquant_rt._core as core
from conftest import make_hf_llama, rel_err
from flexquant_rt import Engine, FlexquantError, GenerationStats
from flexquant_rt.batch import Batch

LOGIT_RTOL = 1e-4  # fp32 engine vs fp32 transformers on the same view (test_engine.py)


@pytest.fixture(scope="module")
def gqa_pair(tmp_path_factory):
    """(converted .fq, transformers model of its 8-bit and 4-bit views)."""
    import torch
    from transformers import LlamaForCausalLM

    from flexquant_rt.convert import HFSource, convert, export_hf

    d = tmp_path_factory.mktemp("batch_gqa")
    src = make_hf_llama(d / "hf", seed=3, hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, vocab=320)
    fq = d / "m.fq"
    convert(HFSource(src), fq, progress=False, group_size=64)
    refs = {}
    for bits in (8, 4):
        export_hf(fq, d / f"hf{bits}", bits, progress=False)
        refs[bits] = LlamaForCausalLM.from_pretrained(d / f"hf{bits}", dtype=torch.float32).eval()
    return fq, refs


def _hf_last(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "q8"])
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_batch_matches_transformers_per_sequence(gqa_pair, bits, kv_dtype):
    """Sequences of different lengths, stepped in changing subsets and orders (batch sizes 1..6, so
    both kernel regimes, decode m <= 4 and gemm m > 4, run): every row's logits are what
    transformers gives that sequence alone."""
    fq, refs = gqa_pair
    rng = np.random.default_rng(bits)
    with Engine(fq, threads=2, n_seq=6, kv_dtype=kv_dtype, cpu_activations="f32") as eng:
        eng.set_layer_bits(bits, lm_head_bits=bits)
        V = eng.config["vocab"]
        seqs = [rng.integers(0, V, size=int(n)).tolist() for n in (3, 17, 1, 40, 9, 25)]
        for s, ids in enumerate(seqs):
            eng._eng.eval_seq(s, np.asarray(ids, dtype=np.int32))
            assert eng._eng.n_past_seq(s) == len(ids)
        tol = {"f32": LOGIT_RTOL, "f16": 3e-3, "q8": 1.5e-2}[kv_dtype]  # q8: 4.9e-3 at most, measured
        for step, subset in enumerate([[0, 1, 2, 3, 4, 5], [5, 3, 1], [2], [4, 0, 2, 1, 3], [1, 0]]):
            toks = rng.integers(0, V, size=len(subset))
            logits, ent, top1 = eng._eng.decode_batch(np.asarray(subset, np.int32), toks.astype(np.int32))
            assert logits.shape == (len(subset), V) and ent.shape == top1.shape == (len(subset),)
            for i, s in enumerate(subset):
                seqs[s].append(int(toks[i]))
                assert eng._eng.n_past_seq(s) == len(seqs[s])
                ref = _hf_last(refs[bits], seqs[s])
                assert rel_err(logits[i], ref) < tol, (step, s)
                p = np.exp(logits[i].astype(np.float64) - logits[i].max())
                p /= p.sum()
                assert abs(top1[i] - p.max()) < 1e-5
                assert abs(ent[i] - float(-(p * np.log(p)).sum())) < 1e-4
            # the step ran at the mask; a batch reads each weight once
            assert (eng._eng.last_bits() == bits).all()


def test_batched_rows_equal_the_single_sequence_path(tiny_fq):
    """decode_batch row i equals a decode step of that sequence alone in an n_seq=1 engine, to fp32
    rounding (the batched GEMV sums in the same order per row up to 4 rows)."""
    rng = np.random.default_rng(0)
    with Engine(tiny_fq, n_seq=4) as eng, Engine(tiny_fq) as solo:
        V = eng.config["vocab"]
        prompts = [rng.integers(0, V, size=n).tolist() for n in (5, 12, 2, 30)]
        for s, ids in enumerate(prompts):
            eng._eng.eval_seq(s, np.asarray(ids, dtype=np.int32))
        toks = rng.integers(0, V, size=4).astype(np.int32)
        logits, _, _ = eng._eng.decode_batch(np.arange(4, dtype=np.int32), toks)
        for s, ids in enumerate(prompts):
            solo.forward(ids)
            ref = solo.decode(int(toks[s]))
            assert rel_err(logits[s], ref) < 1e-6


@pytest.mark.parametrize("act", ["i16", "f32"])
def test_built_in_rule_decodes_batches_up_to_its_crossover(tiny_fq, act):
    """With no kernel table a batched step of up to 6 rows runs the decode kernels where the integer
    decode is AVX-512 or AVX2 + GFNI (int16 activations), of up to 4 rows otherwise (fp32
    activations, other CPUs), and one row more the GEMM; and each row of a batch the decode kernels
    run is the bits of that sequence's step alone."""
    f = set(core.ops.cpu_features_in_use())
    crossover = 6 if act == "i16" and ("avx512" in f or {"avx2", "gfni"} <= f) else 4
    rng = np.random.default_rng(5)
    n = crossover + 1
    with Engine(tiny_fq, n_seq=n, kernel_table=None, cpu_activations=act) as eng, \
            Engine(tiny_fq, kernel_table=None, cpu_activations=act) as solo:
        V = eng.config["vocab"]
        prompts = [rng.integers(0, V, size=int(rng.integers(2, 20))).tolist() for _ in range(n)]
        for s, ids in enumerate(prompts):
            eng._eng.eval_seq(s, np.asarray(ids, dtype=np.int32))
        toks = rng.integers(0, V, size=n).astype(np.int32)
        logits, _, _ = eng._eng.decode_batch(np.arange(crossover, dtype=np.int32), toks[:crossover])
        assert core.ops.last_bitplane_kernel().startswith("decode_"), core.ops.last_bitplane_kernel()
        for s in range(crossover):
            solo.forward(prompts[s])
            np.testing.assert_array_equal(logits[s], solo.decode(int(toks[s])), err_msg=f"sequence {s}")
        eng._eng.decode_batch(np.arange(n, dtype=np.int32), toks)
        assert core.ops.last_bitplane_kernel().startswith("gemm_"), core.ops.last_bitplane_kernel()


def test_bad_batches_name_the_value_and_change_nothing(tiny_fq):
    with Engine(tiny_fq, n_seq=3, n_ctx=8) as eng:
        e = eng._eng
        e.eval_seq(0, np.asarray([1, 2, 3], np.int32))
        e.eval_seq(1, np.asarray([4, 5, 6, 7, 8, 9, 10, 11], np.int32))  # full
        V = eng.config["vocab"]
        cases = [
            (([0, 3], [1, 1]), "seqs[1] = 3 is outside 0..2"),
            (([0, -1], [1, 1]), "seqs[1] = -1"),
            (([0, 0], [1, 1]), "sequence 0 appears twice"),
            (([0, 2], [1, V]), f"token id {V}"),
            (([0, 1], [1, 1]), "sequence 1 holds 8 tokens = n_ctx"),
            (([0, 2], [1]), "2 sequences but 1 tokens"),
            (([], []), "no sequences"),
            (([0, 1, 2, 0], [1, 1, 1, 1]), "4 rows for 3 sequences"),
        ]
        for (seqs, toks), msg in cases:
            with pytest.raises(FlexquantError, match=re.escape(msg)):
                e.decode_batch(np.asarray(seqs, np.int32), np.asarray(toks, np.int32))
            assert [e.n_past_seq(s) for s in range(3)] == [3, 8, 0]
        with pytest.raises(FlexquantError, match="sequence 3 is outside 0..2"):
            e.eval_seq(3, np.asarray([1], np.int32))
        with pytest.raises(FlexquantError, match="sequence 1"):
            e.eval_seq(1, np.asarray([1], np.int32))
        with pytest.raises(FlexquantError, match="outside 0..2"):
            e.n_past_seq(-1)
        with pytest.raises(FlexquantError, match="47 bit-widths given"):
            e.bytes_per_token_at(np.full(47, 8, np.int32))
        n_bits = eng.n_layers * 7 + 1
        with pytest.raises(FlexquantError, match=r"bits\[0\] = 9"):
            e.bytes_per_token_at(np.full(n_bits, 9, np.int32))
        assert e.bytes_per_token_at(np.full(n_bits, 8, np.int32)) == eng.bytes_per_token()
        # a batch after the errors still works, and reset_seq frees a full sequence
        e.reset_seq(1)
        logits, _, _ = e.decode_batch(np.asarray([1, 0], np.int32), np.asarray([3, 4], np.int32))
        assert np.isfinite(logits).all() and [e.n_past_seq(s) for s in range(3)] == [4, 1, 0]
        eng.close()
        with pytest.raises(FlexquantError, match="closed"):
            e.decode_batch(np.asarray([0], np.int32), np.asarray([1], np.int32))
    for bad in (0, -1, 4097, 1.5, True):
        with pytest.raises(ValueError, match="n_seq"):
            Engine(tiny_fq, n_seq=bad)


def test_default_context_shares_the_cache_budget(tiny_fq):
    with Engine(tiny_fq) as one, Engine(tiny_fq, n_seq=4) as four:
        assert four.n_seq == 4 and one.n_seq == 1
        assert four.n_ctx <= one.n_ctx  # the tiny model's context fits 4x in the budget


@pytest.mark.skipif(core.cuda_available(), reason="a CUDA device is present: tests/test_engine_cuda.py runs the batch there")
def test_cuda_asked_with_several_sequences_falls_back_without_a_gpu(tiny_fq):
    with pytest.warns(RuntimeWarning, match="no CUDA"):
        with Engine(tiny_fq, backend="cuda", n_seq=2) as eng:
            assert eng.backend == "cpu"
            assert len(eng.generate_batch([[1, 2, 3], [4, 5]], max_new_tokens=3)) == 2


def _solo(eng, prompts, **kw):
    out, stats = [], []
    for p in prompts:
        st = GenerationStats()
        out.append(eng.generate(p, stats=st, **kw))
        stats.append(st)
    return out, stats


@pytest.mark.parametrize("kw", [dict(max_new_tokens=12),
                                dict(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.9, seed=5,
                                     repetition_penalty=1.2),
                                dict(max_new_tokens=9, bits=5, ignore_eos=True),
                                dict(max_new_tokens=0)])
def test_generate_batch_equals_generate_prompt_by_prompt(tiny_fq, kw):
    """5 prompts through 2 slots (continuous refill): same texts and stats as one by one."""
    prompts = ["the cat", "hello world", [5, 9, 11, 40], "a", "count me in"]
    with Engine(tiny_fq, n_seq=2) as eng, Engine(tiny_fq) as solo:
        ref, ref_stats = _solo(solo, prompts, **kw)
        stats = [GenerationStats() for _ in prompts]
        got = eng.generate_batch(prompts, stats=stats, **kw)
        assert got == ref
        for a, b in zip(stats, ref_stats):
            assert (a.prompt_tokens, a.completion_tokens, a.finish_reason, a.steps, a.bytes_read) == \
                   (b.prompt_tokens, b.completion_tokens, b.finish_reason, b.steps, b.bytes_read)
            assert a.mean_bits == pytest.approx(b.mean_bits)
        assert [eng._eng.n_past_seq(s) for s in range(2)] == [0, 0]  # the slots are free again


def test_generate_batch_stops_and_context_limit(tiny_fq):
    with Engine(tiny_fq, n_seq=3, n_ctx=24) as eng, Engine(tiny_fq, n_ctx=24) as solo:
        full = solo.generate("abc", max_new_tokens=30)
        stop = full[3:5]
        prompts = ["abc", "abc", list(range(1, 20))]
        kw = dict(max_new_tokens=30, stop=[stop])
        ref, ref_stats = _solo(solo, prompts, **kw)
        stats = [GenerationStats() for _ in prompts]
        assert eng.generate_batch(prompts, stats=stats, **kw) == ref
        assert [s.finish_reason for s in stats] == [s.finish_reason for s in ref_stats]
        assert stats[0].finish_reason == "stop"
        with pytest.raises(ValueError, match="prompt 1 has 24 tokens"):
            eng.generate_batch(["a", list(range(1, 25))])
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            eng.generate_batch([[]])
        with pytest.raises(ValueError, match="one entry per prompt"):
            eng.generate_batch(["a", "b"], stats=[GenerationStats()])
        with pytest.raises(ValueError, match="one per prompt"):
            eng.generate_batch(["a", "b"], seed=[1])
        assert eng.generate_batch([]) == []


def test_generate_batch_streams_and_validates_prompts(tiny_fq):
    prompts = ["the cat", [5, 9, 11], "hello world"]
    with Engine(tiny_fq, n_seq=2) as eng:
        whole = eng.generate_batch(prompts, max_new_tokens=10, ignore_eos=True)
        got = ["", "", ""]
        order = []
        for i, piece in eng.generate_batch(prompts, max_new_tokens=10, ignore_eos=True, stream=True):
            got[i] += piece
            order.append(i)
        assert got == whole and set(order) == {0, 1, 2}
        assert order != sorted(order)  # interleaved: the prompts decode together
        # a consumer that stops early frees the slots
        it = eng.generate_batch(prompts, max_new_tokens=10, ignore_eos=True, stream=True)
        next(it)
        it.close()
        assert [eng._eng.n_past_seq(s) for s in range(2)] == [0, 0]
        with pytest.raises(ValueError, match="list of prompts"):
            eng.generate_batch("one prompt")
        with pytest.raises(ValueError, match="prompt 1: tokens must be integers"):
            eng.generate_batch(["a", [1.5, 2.0]])
        with pytest.raises(FlexquantError, match="token id 999"):
            eng.generate_batch(["a", [1, 999]], max_new_tokens=2)
        assert [eng._eng.n_past_seq(s) for s in range(2)] == [0, 0]
        assert eng.generate_batch(["a"], max_new_tokens=3) == [eng.generate("a", max_new_tokens=3)]


def test_long_prompts_are_read_a_chunk_per_step(tiny_fq, monkeypatch):
    """A prompt longer than the chunk is prefilled over several steps while the others decode: the
    others' text arrives before its first piece, and every text is what generate() gives alone."""
    monkeypatch.setattr(Batch, "prefill_chunk", 8)
    long = list(range(3, 43))  # 40 tokens: 5 chunks
    prompts = [[9, 8, 7], long, [5, 6]]
    with Engine(tiny_fq, n_seq=3) as eng, Engine(tiny_fq) as solo:
        ref = [solo.generate(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
        stats = [GenerationStats() for _ in prompts]
        order = [i for i, _ in eng.generate_batch(prompts, max_new_tokens=12, ignore_eos=True, stream=True)]
        assert order.index(1) >= 2 and order[:2].count(1) == 0 and {0, 2} <= set(order[:order.index(1)])
        assert eng.generate_batch(prompts, max_new_tokens=12, ignore_eos=True, stats=stats) == ref
        assert stats[1].prompt_tokens == 40 and stats[1].steps == 12  # the prompt counts as one step
        # a prompt that is exactly a multiple of the chunk, and one of a single token
        assert eng.generate_batch([long[:16], [7]], max_new_tokens=5) == \
            [solo.generate(long[:16], max_new_tokens=5), solo.generate([7], max_new_tokens=5)]


def test_each_step_runs_at_the_elementwise_max_of_the_masks(tiny_fq):
    """Two sequences with their own controllers: the step runs at the max of their masks, and each
    controller sees (and its stats count) its own mask's bits."""
    from flexquant_rt import _core

    class Fixed:
        def __init__(self, layer_bits, head):
            self.m, self.head, self.infos = layer_bits, head, []

        def mask(self, info):
            self.infos.append(info)
            return (self.m, self.head) if info is None else None

    with Engine(tiny_fq, n_seq=2) as eng:
        L = eng.n_layers
        a_mask = np.full((L, 7), 3, np.int32)
        a_mask[0, 2] = 7
        b_mask = np.full((L, 7), 5, np.int32)
        a, b = Fixed(a_mask, 4), Fixed(b_mask, 3)
        batch = Batch(eng)
        sa, sb = GenerationStats(), GenerationStats()
        batch.add("a", [1, 2, 3], 6, _core.Sampler(), (), (), a, sa)
        batch.add("b", [4, 5], 6, _core.Sampler(), (), (), b, sb)
        batch.step()
        want = np.maximum(a_mask, b_mask).reshape(-1).tolist() + [4]
        assert eng._eng.last_bits().tolist() == want
        info = a.infos[-1]
        own = np.append(a_mask.reshape(-1), 4).astype(np.int32)
        assert info.bytes_read == eng._eng.bytes_per_token_at(own)
        assert sa.bytes_read == 2 * eng._eng.bytes_per_token_at(own)  # prefill + one step at its own mask
        assert sb.bytes_read == 2 * eng._eng.bytes_per_token_at(np.append(b_mask.reshape(-1), 3).astype(np.int32))
        assert sa.mean_bits < sb.mean_bits
        assert batch.cancel("a") and not batch.cancel("a")
        assert batch.free == 1 and batch.active == 1
        batch.step()
        assert eng._eng.last_bits().tolist() == b_mask.reshape(-1).tolist() + [3]


def test_a_controller_with_a_bad_mask_is_detached_and_frees_its_slot(tiny_fq):
    class Bad:
        detached = 0

        def mask(self, info):
            return 11  # above max_bits

        def detach(self):
            Bad.detached += 1

    with Engine(tiny_fq, n_seq=2) as eng:
        with pytest.raises(FlexquantError, match="11"):
            eng.generate_batch(["a"], controllers=[Bad()], max_new_tokens=3)
        assert Bad.detached == 1 and [eng._eng.n_past_seq(s) for s in range(2)] == [0, 0]
        assert eng.generate_batch(["a", "b"], max_new_tokens=3) == [eng.generate(p, max_new_tokens=3) for p in "ab"]


def test_a_controller_that_fails_mid_generation_ends_only_its_own(tiny_fq):
    from flexquant_rt import _core

    class Breaks:
        def __init__(self):
            self.calls = 0

        def mask(self, info):
            self.calls += 1
            if self.calls == 4:
                raise RuntimeError("controller broke")
            return None

    with Engine(tiny_fq, n_seq=2) as eng, Engine(tiny_fq) as solo:
        batch = Batch(eng)
        texts = {"ok": "", "bad": ""}
        done = {}
        for key, ids, ctl in (("ok", [5, 6, 7], None), ("bad", [9, 9], Breaks())):
            for k, piece, fin in batch.add(key, ids, 10, _core.Sampler(), (), (), ctl):
                texts[k] += piece
        while batch.active:
            for k, piece, fin in batch.step():
                if isinstance(piece, BaseException):
                    done[k] = piece
                    continue
                texts[k] += piece
                if fin:
                    done[k] = "finished"
        assert isinstance(done["bad"], RuntimeError) and done["ok"] == "finished"
        # no stop ids were given: the eos does not stop it, as with ignore_eos
        assert texts["ok"] == solo.generate([5, 6, 7], max_new_tokens=10, ignore_eos=True)
        assert batch.free == 2
        with pytest.raises(RuntimeError, match="controller broke"):
            eng.generate_batch(["a", "b"], controllers=[None, Breaks()], max_new_tokens=10, ignore_eos=True)
        assert [eng._eng.n_past_seq(s) for s in range(2)] == [0, 0]


def test_rule_controllers_are_refused_in_a_batch(tiny_fq):
    class Rules:
        def attach(self, engine):
            c = engine.config
            ks = [c["hidden"]] * 3 + [c["n_heads"] * c["head_dim"]] + [c["hidden"]] * 2 + [c["ffn"]]
            costs = [np.ones((2, k), np.float32) for _ in range(engine.n_layers) for k in ks]
            costs.append(np.ones((2, c["hidden"]), np.float32))
            engine._eng.set_precision_rules(3, 4, costs, 0.0)

        def mask(self, info):
            return None

    with Engine(tiny_fq, n_seq=2) as eng:
        with pytest.raises(ValueError, match="in-step rules"):
            eng.generate_batch(["a", "b"], controllers=[Rules(), Rules()], max_new_tokens=3)
        assert not eng._eng.has_precision_rules
        assert [eng._eng.n_past_seq(s) for s in range(2)] == [0, 0]
        assert eng.generate_batch(["a"], max_new_tokens=3) == [eng.generate("a", max_new_tokens=3)]


def test_smollm2_batch_answers_as_alone(smollm2_fq):
    """The real model: three chat prompts through two slots give the same greedy answers as one by one."""
    questions = ["What is the capital of Japan?", "Name a primary color.", "Write a haiku about the sea."]
    with Engine(smollm2_fq, n_seq=2, n_ctx=256) as eng, Engine(smollm2_fq, n_ctx=256) as solo:
        conversations = [[{"role": "user", "content": q}] for q in questions]
        ref = [solo.chat(c, max_new_tokens=24) for c in conversations]
        got = eng.chat_batch(conversations, max_new_tokens=24)
        assert got == ref
        assert all(len(t) > 0 for t in got) and "Tokyo" in got[0]
        with pytest.raises(ValueError, match="conversation 1 must be a list"):
            eng.chat_batch([conversations[0], "hi"])


# ---- CPU kernel dispatch: a measured table picks decode or GEMM per shape, bits and rows ----------

def test_kernel_table_decides_the_kernel_and_keeps_the_results(gqa_pair):
    """Forcing every product onto one family changes only the rounding (both match transformers),
    and the table is what decides: a 10-token prefill runs GEMM by default and decode under a
    table that says so (different rounding, same result)."""
    fq, refs = gqa_pair
    ids = list(range(7, 17))
    # the fp32 cache, as transformers': the kernels' rounding is what is compared
    with Engine(fq, threads=2, kernel_table=None, kv_dtype="f32", cpu_activations="f32") as eng:
        eng.set_layer_bits(8, lm_head_bits=8)
        shapes = {(int(d["n"]), int(d["k"])) for d in eng._linear_shapes()}
        base = eng.forward(ids)
        all_decode = [dict(n=n, k=k, bits=b, decode_max_m=1000) for n, k in shapes for b in range(2, 9)]
        eng._eng.set_kernel_table(all_decode)
        assert eng.kernel_table() == all_decode
        dec = eng.forward(ids)
        eng._eng.set_kernel_table([dict(d, decode_max_m=0) for d in all_decode])  # GEMM even for one row
        gemm_step = eng.forward(ids[:1])
        eng._eng.set_kernel_table([])
        assert eng.kernel_table() == []
        default_step = eng.forward(ids[:1])
    ref = np.stack([_hf_last(refs[8], ids[:i + 1]) for i in range(len(ids))])
    for got in (base, dec):
        assert rel_err(got, ref) < LOGIT_RTOL
    assert not np.array_equal(base, dec)  # the table took effect
    assert rel_err(gemm_step, ref[:1]) < LOGIT_RTOL and not np.array_equal(gemm_step, default_step)


def test_tune_kernels_measures_every_shape_and_bit_width(tiny_fq, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXQUANT_RT_CACHE", str(tmp_path))
    with Engine(tiny_fq, threads=1) as eng:
        assert eng.kernel_table() == []  # nothing saved in this cache yet
        table = eng.tune_kernels(max_m=6, repeats=1)
        shapes = {(int(d["n"]), int(d["k"])) for d in eng._linear_shapes()}
        assert {(d["n"], d["k"]) for d in table} == shapes
        assert sorted(d["bits"] for d in table) == sorted(list(range(2, 9)) * len(shapes))
        assert all(0 <= d["decode_max_m"] <= 6 for d in table)
        assert eng.kernel_table() == table
        want = eng.generate("the cat", max_new_tokens=8)
    with Engine(tiny_fq, threads=1) as again, Engine(tiny_fq, threads=1, kernel_table=None) as plain:
        assert again.kernel_table() == table  # saved for this machine, thread count and shapes
        assert plain.kernel_table() == []
        assert again.generate("the cat", max_new_tokens=8) == want
    with Engine(tiny_fq, threads=2) as other_threads:
        assert other_threads.kernel_table() == []
    if {"avx512", "gfni"} <= set(core.ops.cpu_kernels_available()) and core.ops.get_cpu_kernels() == "avx512":
        # the same family without GFNI runs other int16 kernels: the table is not theirs
        try:
            core.ops.set_cpu_kernels("avx512", gfni=False)
            with Engine(tiny_fq, threads=1) as no_gfni:
                assert no_gfni.kernel_table() == []
        finally:
            core.ops.set_cpu_kernels("avx512")
        with Engine(tiny_fq, threads=1) as back:
            assert back.kernel_table() == table
    # a table file that cannot be read, or holds bad entries, is ignored (with a warning), not fatal
    for p in (tmp_path / "kernels").iterdir():
        p.write_text("{not json")
    with Engine(tiny_fq, threads=1) as eng:
        assert eng.kernel_table() == []
    for p in (tmp_path / "kernels").iterdir():
        p.write_text('{"table": [{"n": 64, "k": 64, "bits": 12, "decode_max_m": 4}]}')
    with pytest.warns(RuntimeWarning, match="ignoring the saved kernel table"):
        with Engine(tiny_fq, threads=1) as eng:
            assert eng.kernel_table() == []


def test_bad_kernel_tables_are_refused_by_entry(tiny_fq):
    with Engine(tiny_fq, kernel_table=None) as eng:
        good = dict(n=64, k=64, bits=8, decode_max_m=4)
        for bad, msg in ((dict(good, bits=9), "entry 1: bits = 9"), (dict(good, decode_max_m=-1), "entry 1: decode_max_m = -1"),
                         (dict(good, n=0), "entry 1: shape 0 x 64"), ({"n": 1, "k": 1, "bits": 8}, "has no 'decode_max_m'")):
            with pytest.raises(FlexquantError, match=re.escape(msg)):
                eng._eng.set_kernel_table([good, bad])
            assert eng.kernel_table() == []
        with pytest.raises(FlexquantError, match="max_m = 0"):
            eng._eng.tune_kernels(0, 1)
        with pytest.raises(ValueError, match="kernel_table must be"):
            Engine(tiny_fq, kernel_table="fast")


def test_kernel_tables_with_cuda_kernel_fields(tiny_fq):
    """The fields that name the CUDA kernels (act_bits, mma_min_rows, gemm, rejected) are checked on
    every backend, so a table is valid or not wherever it is applied; the CPU keeps and returns them
    (a CUDA table never loads there: its key names the GPU) and runs as the decode_max_m say."""
    with Engine(tiny_fq, threads=1, kernel_table=None) as eng:
        shapes = sorted({(int(d["n"]), int(d["k"])) for d in eng._linear_shapes()})
        n, k = shapes[0]
        cuda_like = [dict(n=n, k=k, bits=b, decode_max_m=32, act_bits=8, mma_min_rows=4,
                          gemm="a8_wg" if b < 5 else "a8", rejected="") for b in range(2, 9)]
        cuda_like += [dict(n=n, k=k, bits=8, decode_max_m=16, act_bits=16, mma_min_rows=-1, gemm="a16",
                           rejected="mma: row error 0.3 > 0.0001 at 4 bits, 16 rows")]
        eng._eng.set_kernel_table(cuda_like)
        assert eng.kernel_table() == cuda_like
        # a table without the CUDA fields (as saved before them) is returned without them
        plain = [dict(n=n, k=k, bits=8, decode_max_m=2)]
        eng._eng.set_kernel_table(plain)
        assert eng.kernel_table() == plain
        good = dict(n=n, k=k, bits=8, decode_max_m=4, act_bits=8, mma_min_rows=2, gemm="a8")
        for bad, msg in (
                (dict(good, act_bits=4), "entry 1: act_bits = 4 is not 0, 8 or 16"),
                (dict(good, mma_min_rows=17), "entry 1: mma_min_rows = 17 is outside -1..16"),
                (dict(good, act_bits=16, gemm="a16"), "entry 1: mma_min_rows = 2 needs act_bits 8"),
                (dict(good, mma_min_rows=-1, act_bits=0), "entry 1: gemm 'a8' needs act_bits 8, got 0"),
                (dict(good, gemm="a16"), "entry 1: gemm 'a16' needs act_bits 16, got 8"),
                (dict(good, gemm="a4"), "entry 1: gemm = 'a4' is not one of 'a8', 'a8_wg', 'a16'"),
                (dict(good, bits=5, mma_min_rows=3),
                 f"entries 0 and 1 (shape {n} x {k}, act_bits 8) disagree on mma_min_rows (2, 3)"),
                (dict(good, gemm=8), "entry 1: 'gemm' must be a str, got 8"),
                (dict(good, mma_min_rows="2"), "entry 1: 'mma_min_rows' must be an int, got '2'"),
                (dict(good, act_bits=True), "entry 1: 'act_bits' must be an int, got True"),
                (dict(good, act_bits=2 ** 40), "entry 1: 'act_bits' = 1099511627776 is out of range")):
            with pytest.raises(FlexquantError, match=re.escape(msg)):
                eng._eng.set_kernel_table([good, bad])
            assert eng.kernel_table() == plain  # a bad table changes nothing
        # entries of other shapes or activation families may differ in mma_min_rows
        eng._eng.set_kernel_table([good, dict(good, act_bits=16, mma_min_rows=-1, gemm="a16"),
                                   dict(good, n=n + 1, mma_min_rows=9)])


def test_tune_command(tiny_fq, tmp_path, monkeypatch, capsys):
    """`flexquant-rt tune` measures and saves the CPU table; --backend cuda without a GPU stops with
    the engine's reason instead of tuning the CPU under a GPU key."""
    from flexquant_rt.cli import main

    monkeypatch.setenv("FLEXQUANT_RT_CACHE", str(tmp_path))
    assert main(["tune", str(tiny_fq), "--max-m", "3", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernel table" in out and "bits:rows" in out and "saved" in out
    assert len(list((tmp_path / "kernels").iterdir())) == 1
    # int8 activations have kernels of their own, so a table of their own, which their engines load
    with Engine(tiny_fq, backend="cpu", threads=1, cpu_activations="i8") as eng:
        assert eng.kernel_table() == []
    assert main(["tune", str(tiny_fq), "--max-m", "3", "--repeats", "1", "--threads", "1",
                 "--cpu-activations", "i8"]) == 0
    assert len(list((tmp_path / "kernels").iterdir())) == 2
    with Engine(tiny_fq, backend="cpu", threads=1, cpu_activations="i8") as eng:
        assert len(eng.kernel_table()) > 0
    if not core.cuda_available():
        with pytest.warns(RuntimeWarning), pytest.raises(SystemExit, match="--backend cuda: the engine runs on cpu"):
            main(["tune", str(tiny_fq), "--backend", "cuda", "--repeats", "1"])
