"""Precision controllers: which bit-width each layer runs at, token by token.

A controller is any object with

    mask(info) -> mask or None   -- called before every step; info is None before the prompt,
                                    else the StepInfo of the step that just ran
    reset()                      -- optional: a new sequence starts
    attach(engine) / detach()    -- optional: around a generation (e.g. to push in-step rules)

where a mask is what Engine.set_layer_bits takes (an int, (n_layers,) or (n_layers, 7)), or a
tuple (mask, lm_head_bits). None keeps the current mask.

Provided:
- Static(bits): every linear at `bits`.
- LayerwiseStatic(profile, budget): a per-layer allocation that minimises the calibrated total
  sensitivity under a mean-bits budget (multiple-choice knapsack, solved by a Lagrangian sweep).
- LinearwiseStatic(profile, budget): the same knapsack per linear (q, k, v, o, gate, up, down
  of each layer), from a separable layer x type sensitivity model.
- FlexQuant(profile, budget): the paper's token-wise policy as its text allows: two precisions,
  switched on the previous step's output entropy with hysteresis, thresholds fitted on the
  calibration entropies so the expected mean bits meets the budget (plus a budget guard).
- InputAware(profile, budget): per-token, per-linear bits chosen by the engine inside the step
  from each linear's own input (rules pushed once; only a price λ is steered per token).
- SinkProtect(inner): the first position(s) at max bits, then `inner`.
What each achieves on SmolLM2 is measured in docs/controller.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

PROFILE_KEY = "flexquant.calibration.profile"
PROFILE_VERSION = 1


@dataclass
class Profile:
    """Calibrated sensitivity of a model (stored in the model file's calibration section).

    kl[u][j]: mean KL(max_bits model || model with only unit u at levels[j]) on the calibration
    text; units are the decoder layers 0..n_layers-1 (all 7 linears together) and the LM head
    (the last unit). weights[u]: the unit's weight count (n*k summed), for mean bits per weight.
    entropy_quantiles: quantiles 0, 0.01, .., 1 of the max_bits model's next-token entropy on
    the calibration text (the FlexQuant policy fits its thresholds on them).
    """

    max_bits: int
    levels: list[int]
    kl: list[list[float]]
    weights: list[int]
    entropy_quantiles: list[float]
    n_tokens: int
    text: str = "pydoc_data.topics, first half of the keys"
    seed: int = 0
    version: int = PROFILE_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.kl) - 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "Profile":
        d = json.loads(s)
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"calibration profile version {d.get('version')!r} is not {PROFILE_VERSION}")
        return cls(**d)

    def kl_at(self, unit: int, bits: int) -> float:
        """Sensitivity of a unit at `bits` (0 at max_bits; extrapolated x4 per bit below the
        lowest calibrated level: quantization error energy quadruples per bit removed)."""
        if bits >= self.max_bits:
            return 0.0
        if bits in self.levels:
            return self.kl[unit][self.levels.index(bits)]
        lo = min(self.levels)
        if bits < lo:
            return self.kl[unit][self.levels.index(lo)] * 4.0 ** (lo - bits)
        hi = min(b for b in self.levels if b > bits) if any(b > bits for b in self.levels) else self.max_bits
        k_hi = self.kl_at(unit, hi)
        return k_hi * 4.0 ** (hi - bits)


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------

def calibration_text(part: str = "calibration") -> str:
    """Real text shipped with every CPython: Python's own documentation topics. The keys are
    sorted; the first half is calibration text, the second half evaluation text (disjoint)."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    half = len(keys) // 2
    chosen = keys[:half] if part == "calibration" else keys[half:]
    return "\n\n".join(topics.topics[k] for k in chosen)


def text_chunks(engine, text: str, n_chunks: int, chunk_len: int, seed: int = 0) -> list[list[int]]:
    """n_chunks windows of chunk_len tokens at seeded random offsets of the tokenized text."""
    ids = engine.tokenize(text, add_special_tokens=False)
    if len(ids) < chunk_len + 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {chunk_len}")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(len(ids) - chunk_len, size=n_chunks, replace=False))
    return [ids[s:s + chunk_len] for s in starts]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_rows(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(ref || q) per row, from log-probabilities."""
    return (np.exp(ref_logp) * (ref_logp - logp)).sum(-1)


def unit_weights(engine) -> list[int]:
    """Weight count of each unit: the decoder layers (7 linears each), then the LM head."""
    sizes = linear_sizes(engine)
    return [int(x) for x in sizes[:-1].reshape(-1, 7).sum(1)] + [int(sizes[-1])]


def calibrate(engine, chunks: Sequence[Sequence[int]], levels: Sequence[int] = (3, 4, 5, 6, 7),
              progress: bool = True, seed: int = 0, activation_levels: Sequence[int] = (),
              input_energy: bool | None = None) -> Profile:
    """Per unit (layer or LM head) and level: the mean KL of the next-token distribution against
    the max_bits model when only that unit drops to the level. Teacher-forced prefill passes, with
    the activations the engine runs (on the CPU its cpu_activations, int16-rounded by default; int8
    on the GPU).

    activation_levels (e.g. (8, 6, 4)): also, per unit and width, the mean KL against fp32
    activations when only that unit's linears take their inputs as integers of that width (per
    weight group, Engine.set_activation_bits), weights at max_bits: profile.extra["act_levels"],
    ["act_kl"] (n_layers + 1, len). This measures which layers tolerate low-precision activations
    (FlexQ keeps 8-bit activations in sensitive layers by a fixed rule); 16 = fp16 activations. A
    CUDA engine measures 8 and 16 (its GEMVs have int8, fp16 or fp32 activations). The engine's
    activation bits are restored after.

    input_energy: also record each linear's input energy and the expected output error energy
    (profile.extra["e_mean"], for the in-step precision rules); the CPU backend only, which is the
    default (None: where the engine runs on the CPU)."""
    B = engine.max_bits
    levels = sorted(int(k) for k in levels if 2 <= k < B)
    if not levels:
        raise ValueError(f"no calibration level below max_bits = {B}")
    act_levels = sorted({int(b) for b in activation_levels}, reverse=True)
    on_gpu = engine.backend == "cuda"
    if on_gpu and any(b not in (8, 16) for b in act_levels):
        raise ValueError(f"activation levels {act_levels}: a CUDA engine runs int8 (8), fp16 (16) or fp32 "
                         "activations; measure other widths on the CPU backend")
    if input_energy is None:
        input_energy = not on_gpu
    saved_act = np.asarray(engine._eng.activation_bits, dtype=np.int32)
    try:
        return _calibrate(engine, chunks, levels, progress, seed, act_levels, input_energy, saved_act)
    finally:
        engine._eng.set_activation_bits(saved_act)  # what the engine ran before, on either backend


def _calibrate(engine, chunks, levels, progress, seed, act_levels, input_energy, saved_act) -> Profile:
    """calibrate()'s passes, with the arguments checked; saved_act: the engine's activation bits."""
    B, L = engine.max_bits, engine.n_layers
    full = np.full((L, 7), B, dtype=np.int32)

    def run(mask, head_bits):
        engine.set_layer_bits(mask, lm_head_bits=head_bits)
        return [log_softmax(engine.forward(c)) for c in chunks]

    if input_energy:
        engine._eng.collect_input_energy(True)
    ref = run(full, B)
    extra = {}
    if input_energy:
        energy = [(e / max(n, 1)) for e, n in engine._eng.input_energy()]  # E_t[h_i²] per linear input
        engine._eng.collect_input_energy(False)
        # expected output error energy of each linear at each level: Σ_i v_j[k][i] E[h_i²]
        v = column_error_energy(engine, levels)
        extra["e_mean"] = [[float(v_j[l] @ energy[j]) for l in range(len(levels))] for j, v_j in enumerate(v)]
    ent = np.concatenate([-(np.exp(r) * r).sum(-1) for r in ref])
    kl = np.zeros((L + 1, len(levels)))
    total = (L + 1 + 7) * len(levels) + (L + 1) * len(act_levels)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="calibrating", unit="pass")
    def mean_kl(mask, head, reference=ref):
        out = run(mask, head)
        if bar:
            bar.update(1)
        return float(np.mean(np.concatenate([kl_rows(r, o) for r, o in zip(reference, out)])))

    for u in range(L + 1):
        for j, k in enumerate(levels):
            mask = full.copy()
            head = B
            if u < L:
                mask[u, :] = k
            else:
                head = k
            kl[u, j] = mean_kl(mask, head)
    # per linear type (q, k, v, o, gate, up, down), all layers at once: how a layer's sensitivity
    # splits among its 7 linears (LinearwiseStatic)
    kl_type = np.zeros((7, len(levels)))
    for t in range(7):
        for j, k in enumerate(levels):
            mask = full.copy()
            mask[:, t] = k
            kl_type[t, j] = mean_kl(mask, B)
    act_kl = np.zeros((L + 1, len(act_levels)))
    if act_levels:
        # against activation bits 0 everywhere (fp32 on the GPU; on the CPU int16, within a KL of 4e-8
        # of fp32, or fp32 with cpu_activations "f32"); the engine's own reference already is, unless
        # it ran other activations (int8: the GPU's default, and cpu_activations "i8")
        engine.set_activation_bits(0)
        act_ref = ref if not saved_act.any() else run(full, B)
    for u in range(L + 1):
        for j, b in enumerate(act_levels):
            if u < L:
                act = np.zeros((L, 7), dtype=np.int32)
                act[u, :] = b
                engine.set_activation_bits(act, lm_head_bits=0)
            else:
                engine.set_activation_bits(0, lm_head_bits=b)
            act_kl[u, j] = mean_kl(full, B, act_ref)
    if bar:
        bar.close()
    engine.set_layer_bits(full, lm_head_bits=B)
    extra.update(kl_type=kl_type.tolist(), linear_sizes=[int(x) for x in linear_sizes(engine)])
    if act_levels:
        extra.update(act_levels=act_levels, act_kl=act_kl.tolist())
    return Profile(max_bits=B, levels=levels, kl=kl.tolist(), weights=unit_weights(engine),
                   entropy_quantiles=np.quantile(ent, np.linspace(0, 1, 101)).tolist(),
                   n_tokens=int(sum(len(c) for c in chunks)), seed=seed, extra=extra)


def linear_sizes(engine) -> np.ndarray:
    """Weight count n*K of every linear: n_layers * 7 (q k v o gate up down), then the LM head."""
    return np.asarray([int(i["n"]) * int(i["k"]) for i in engine._linear_shapes()], dtype=np.float64)


_V_CACHE: dict = {}


def column_error_energy(engine, levels: Sequence[int]) -> list[np.ndarray]:
    """v_j[l][i] = Σ_n (W_k - W_B)[n, i]² for k = levels[l] (W_B: the max_bits view): with an
    input h, the k-bit output error energy is ||(W_k - W_B) h||² ≈ Σ_i v_j[l][i] h_i² (errors of
    different columns are nearly uncorrelated). One (len(levels), K) float32 array per linear."""
    mf = engine._eng.model
    key = (mf.path, tuple(levels))
    if key in _V_CACHE:
        return _V_CACHE[key]
    B = engine.max_bits
    names = [f"blk.{l}.{n}" for l in range(engine.n_layers)
             for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")] + ["output"]
    out = []
    for name in names:
        ref = mf.dequantize(name, B)
        rows = []
        for k in levels:
            d = mf.dequantize(name, int(k)) - ref if k < B else np.zeros_like(ref)
            rows.append(np.einsum("nk,nk->k", d, d, dtype=np.float64).astype(np.float32))
        out.append(np.stack(rows))
    _V_CACHE[key] = out
    return out


def save_profile(model_path, profile: Profile) -> None:
    """Store the profile in the model file's calibration section (rewrites the file atomically)."""
    from .model_file import set_metadata
    set_metadata(model_path, {PROFILE_KEY: profile.to_json()})


def load_profile(engine_or_modelfile) -> Profile | None:
    mf = getattr(engine_or_modelfile, "_eng", None)
    mf = mf.model if mf is not None else engine_or_modelfile
    s = mf.meta(PROFILE_KEY)
    return None if s is None else Profile.from_json(s)


def sensitive_activation_units(profile: Profile, share: float = 0.5) -> list[int]:
    """The units (layers 0..L-1; L = the LM head) that keep fp32 activations while the others run
    int8 (the CUDA tensor-core GEMV's arithmetic): the most sensitive first, by the KL that int8
    activations in that unit alone cost (profile.extra["act_kl"], measured by calibrate(...,
    activation_levels) with 8 among them), the fewest units whose costs add up to `share` of the sum
    over all units. share 0: none. Measured on SmolLM2 (docs/activation_precision.md): the LM head
    and the last layer hold half of it."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in 0..1, got {share!r}")
    levels = profile.extra.get("act_levels") or []
    if 8 not in levels:
        raise ValueError("the calibration profile has no int8 activation measurements "
                         "(run: flexquant-rt calibrate MODEL --activations 8)")
    cost = np.maximum(np.asarray(profile.extra["act_kl"], dtype=np.float64)[:, levels.index(8)], 0.0)
    target = share * float(cost.sum()) * (1.0 - 1e-9)  # (a sum that reaches the share exactly counts)
    chosen, acc = [], 0.0
    for u in np.argsort(-cost, kind="stable"):
        if acc >= target or cost[u] <= 0.0:
            break
        chosen.append(int(u))
        acc += float(cost[u])
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------
# Allocation
# ----------------------------------------------------------------------------------------------

def mean_bits(weights: Sequence[int], bits: Sequence[float]) -> float:
    w = np.asarray(weights, dtype=np.float64)
    return float((w * np.asarray(bits, dtype=np.float64)).sum() / w.sum())


def allocate(profile: Profile, budget: float, bits_min: int | None = None) -> list[int]:
    """Bits per unit (layers..., LM head) minimising Σ kl_u(b_u) subject to mean bits <= budget.

    Multiple-choice knapsack by Lagrangian relaxation: for a price λ each unit independently
    picks argmin kl_u(b) + λ·w_u·b; λ is bisected to the cheapest allocation within budget, then
    the remaining budget is spent greedily on the best KL saved per bit.
    """
    B = profile.max_bits
    lo_bits = bits_min if bits_min is not None else min(profile.levels)
    if not lo_bits <= budget <= B:
        raise ValueError(f"budget = {budget} mean bits is outside {lo_bits}..{B}")
    choices = list(range(lo_bits, B + 1))
    W = np.asarray(profile.weights, dtype=np.float64)
    W = W / W.sum()
    kl = np.array([[profile.kl_at(u, b) for b in choices] for u in range(len(W))])

    def pick(lam):
        cost = kl + lam * W[:, None] * np.array(choices)[None, :]
        return np.array(choices)[cost.argmin(1)]

    lo, hi = 0.0, 1.0
    while mean_bits(W, pick(hi)) > budget and hi < 1e12:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean_bits(W, pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    bits = pick(hi).astype(int)
    # spend what is left: upgrade the unit with the best KL saved per weight-bit that still fits
    while True:
        best, gain = None, 0.0
        for u in range(len(W)):
            if bits[u] < B:
                saved = profile.kl_at(u, bits[u]) - profile.kl_at(u, bits[u] + 1)
                if mean_bits(W, bits) + W[u] <= budget + 1e-12 and saved / W[u] > gain:
                    best, gain = u, saved / W[u]
        if best is None:
            break
        bits[best] += 1
    return bits.tolist()


# ----------------------------------------------------------------------------------------------
# Controllers
# ----------------------------------------------------------------------------------------------

class Controller:
    """Base class: override mask(); reset() is called when a sequence starts."""

    def reset(self) -> None:
        pass

    def mask(self, info):
        return None


class Static(Controller):
    """Every linear (and the LM head) at `bits`."""

    def __init__(self, bits: int):
        self.bits = int(bits)

    def mask(self, info):
        return (self.bits, self.bits) if info is None else None


class LayerwiseStatic(Controller):
    """Per-layer bits from the calibrated profile, fixed for the whole sequence."""

    def __init__(self, profile: Profile, budget: float):
        self.profile = profile
        self.budget = budget
        self.bits = allocate(profile, budget)
        self.mean_bits = mean_bits(profile.weights, self.bits)

    def mask(self, info):
        if info is not None:
            return None
        return np.asarray(self.bits[:-1], dtype=np.int32), int(self.bits[-1])


class LinearwiseStatic(Controller):
    """Bits per linear (q, k, v, o, gate, up, down of every layer, and the LM head), fixed for
    the sequence: the knapsack of LayerwiseStatic over 7x the units, with a separable sensitivity
    model KL_{layer,type}(k) = KL_layer(k) * KL_type(k) / Σ_types KL_type(k) from the per-layer
    and the per-type calibration passes (no per-linear passes: 7 + 1 units' worth instead of 210).
    On SmolLM2 v_proj and down_proj are 4-6x as sensitive as q, k, o, so moving bits between
    linear types is where a static allocation gains (docs/controller.md).
    """

    def __init__(self, profile: Profile, budget: float):
        kt = profile.extra.get("kl_type")
        if kt is None:
            raise ValueError("this calibration profile has no per-type sensitivities (recalibrate)")
        kt = np.asarray(kt)
        share = kt / kt.sum(0, keepdims=True)  # (7, levels)
        L = profile.n_layers
        per_layer = np.asarray(profile.kl)
        sizes = profile.extra.get("linear_sizes")
        if sizes is None:
            raise ValueError("this calibration profile has no linear sizes (recalibrate)")
        units = [(per_layer[l] * share[t]).tolist() for l in range(L) for t in range(7)] + [per_layer[L].tolist()]
        sub = Profile(max_bits=profile.max_bits, levels=profile.levels, kl=units, weights=[int(x) for x in sizes],
                      entropy_quantiles=profile.entropy_quantiles, n_tokens=profile.n_tokens)
        self.budget = budget
        self.bits = allocate(sub, budget)
        self.mean_bits = mean_bits(sub.weights, self.bits)
        self.n_layers = L

    def mask(self, info):
        if info is not None:
            return None
        return np.asarray(self.bits[:-1], dtype=np.int32).reshape(self.n_layers, 7), int(self.bits[-1])


class FlexQuant(Controller):
    """Token-wise switching between two precisions on the previous step's output entropy.

    High entropy (an uncertain next token) -> high precision; low -> low. Hysteresis: switch up
    above τ + h/2, down below τ - h/2, where τ is the calibration entropy quantile that puts the
    expected share of low-precision tokens at (hi - budget) / (hi - lo), and h a fraction of the
    entropy's interquartile range. The paper switches 8 <-> 4 bits; `levels` may narrow that.
    Budget guard (ours, not the paper's): generated text can have other entropies than the
    calibration text, so τ is nudged every token by the running mean bits' excess over the
    budget, which keeps a long generation within budget.
    """

    def __init__(self, profile: Profile, budget: float, levels: tuple[int, int] = (4, 8), hysteresis: float = 0.1,
                 gain: float = 0.5):
        lo, hi = levels
        if not lo < hi or not lo <= budget <= hi:
            raise ValueError(f"FlexQuant needs levels lo < hi around the budget, got {levels} for {budget}")
        self.lo, self.hi = lo, hi
        self.budget = budget
        frac_lo = (hi - budget) / (hi - lo)
        q = np.asarray(profile.entropy_quantiles)
        self.tau = float(np.interp(frac_lo, np.linspace(0, 1, len(q)), q))
        iqr = float(np.interp(0.75, np.linspace(0, 1, len(q)), q) - np.interp(0.25, np.linspace(0, 1, len(q)), q))
        self.h = hysteresis * iqr
        self.iqr = max(iqr, 1e-6)
        self.tau0 = self.tau
        self.gain = gain
        self.reset()

    def reset(self) -> None:
        self.state = self.hi
        self.tau = self.tau0
        self.sum_bits = 0.0
        self.steps = 0

    def mask(self, info):
        if info is None:
            self.state = self.hi
            return self.hi, self.hi
        self.sum_bits += info.mean_bits
        self.steps += 1
        self.tau += self.gain * self.iqr * (self.sum_bits / self.steps - self.budget) / (self.hi - self.lo)
        e = info.entropy
        new = self.state
        if self.state == self.hi and e < self.tau - self.h / 2:
            new = self.lo
        elif self.state == self.lo and e > self.tau + self.h / 2:
            new = self.hi
        if new == self.state:
            return None
        self.state = new
        return new, new


class SinkProtect(Controller):
    """Runs the first `n_sink` positions of a sequence at max_bits, then defers to `inner`.

    Every later token attends to the first one (the "attention sink"), so the precision of its
    keys and values weighs on the whole sequence: on SmolLM2, computing the first token at 8 bits
    instead of 5 cuts the KL of the next 255 tokens by 15% for +0.012 mean bits (measured with
    tools/eval.py). In generation the prompt is prefilled before the first decision, so the
    whole prompt runs at max_bits and the budget applies to the generated tokens.
    """

    def __init__(self, inner: Controller, max_bits: int = 8, n_sink: int = 1):
        if n_sink < 1:
            raise ValueError(f"n_sink must be >= 1, got {n_sink}")
        self.inner = inner
        self.max_bits = max_bits
        self.n_sink = n_sink
        self.budget = getattr(inner, "budget", None)
        self.t = 0

    def attach(self, engine) -> None:
        self.max_bits = engine.max_bits
        if hasattr(self.inner, "attach"):
            self.inner.attach(engine)
        if engine._eng.has_precision_rules:
            self.detach()
            raise ValueError("SinkProtect needs a mask-driven inner controller (in-step rules ignore masks)")

    def detach(self) -> None:
        if hasattr(self.inner, "detach"):
            self.inner.detach()

    def reset(self) -> None:
        self.t = 0
        if hasattr(self.inner, "reset"):
            self.inner.reset()

    def mask(self, info):
        if info is None:
            self.t = 0
            return self.max_bits, self.max_bits
        self.t += 1
        if self.t < self.n_sink:
            return None
        if self.t == self.n_sink:
            return self.inner.mask(None)  # the sequence proper starts: the inner policy's first mask
        return self.inner.mask(info)


class InputAware(Controller):
    """Per-token, per-linear bit-widths chosen inside the step from each linear's own input.

    For linear j of unit u (a layer or the LM head) with input h at this token, the engine
    predicts the loss of running it at k bits as α_u(k) Σ_i v_j[k][i] h_i², where v_j[k] is the
    column error energy of the k-bit view (from the weights) and α_u(k) the calibrated KL per
    unit of expected error energy (profile: KL_u(k) / Σ_{j∈u} E[e_j(k)]), and picks
    k = argmin predicted loss + λ · (weights of j) · k. So bits go where this token's activations
    meet this layer's large quantization errors. λ starts from the budget's Lagrangian on the
    calibration means and is then steered every token (multiplicatively, on the running mean
    bits) so that the generated tokens' mean bits stays at the budget. No host round trip inside
    a step: the controller only pushes λ between steps.
    """

    def __init__(self, profile: Profile, budget: float, gain: float = 2.0):
        if profile.extra.get("e_mean") is None:
            raise ValueError("this calibration profile has no input-energy statistics (recalibrate on the CPU "
                             "backend: flexquant-rt calibrate)")
        self.profile = profile
        self.budget = float(budget)
        self.bits_min = min(profile.levels)
        if not self.bits_min <= self.budget <= profile.max_bits:
            raise ValueError(f"budget = {budget} mean bits is outside {self.bits_min}..{profile.max_bits}")
        self.gain = gain
        self.engine = None

    def attach(self, engine) -> None:
        """Push the rule tables into the engine (called by Engine.generate / the evaluation)."""
        p = self.profile
        B = p.max_bits
        levels = list(range(self.bits_min, B + 1))
        if any(k not in p.levels for k in levels[:-1]):
            raise ValueError(f"the profile is calibrated at {p.levels}; InputAware needs every level "
                             f"{self.bits_min}..{B - 1}")
        L = engine.n_layers
        v = column_error_energy(engine, levels)
        e_mean = np.asarray(p.extra["e_mean"])  # (n_lin, len(p.levels)) expected error energy
        unit = np.array([j // 7 for j in range(7 * L)] + [L])
        alpha = np.zeros((L + 1, len(levels)))  # α_u(k); 0 at max_bits (no error)
        exp_loss = np.zeros((len(v), len(levels)))
        for li, k in enumerate(levels[:-1]):
            e_k = e_mean[:, p.levels.index(k)]
            for u in range(L + 1):
                denom = e_k[unit == u].sum()
                alpha[u, li] = p.kl_at(u, k) / denom if denom > 0 else 0.0
            exp_loss[:, li] = alpha[unit, li] * e_k
        cost = [(alpha[unit[j]][:, None] * v[j]).astype(np.float32) for j in range(len(v))]
        self.sizes = linear_sizes(engine)
        self.lambda0 = self._fit_lambda(exp_loss, self.sizes, np.asarray(levels, dtype=np.float64))
        self.engine = engine
        engine._eng.set_precision_rules(self.bits_min, B, cost, self.lambda0)
        self.reset()

    def _fit_lambda(self, exp_loss, sizes, levels) -> float:
        def mean_for(lam):
            k = levels[(exp_loss + lam * sizes[:, None] * levels[None, :]).argmin(1)]
            return float((k * sizes).sum() / sizes.sum())
        lo, hi = 1e-30, 1.0
        while mean_for(hi) > self.budget and hi < 1e30:
            hi *= 10
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if mean_for(mid) > self.budget:
                lo = mid
            else:
                hi = mid
        return hi

    def detach(self) -> None:
        if self.engine is not None and not self.engine._eng.closed:
            self.engine._eng.clear_precision_rules()
        self.engine = None

    def reset(self) -> None:
        self.lam = self.lambda0
        self.sum_bits = 0.0
        self.steps = 0
        if self.engine is not None:
            self.engine._eng.set_rule_lambda(self.lam)

    def mask(self, info):
        if info is None or self.engine is None:
            return None
        self.sum_bits += info.mean_bits
        self.steps += 1
        running = self.sum_bits / self.steps
        # steer λ on the running mean: over budget -> bits cost more
        self.lam *= math.exp(self.gain * (running - self.budget))
        self.lam = min(max(self.lam, self.lambda0 * 1e-4), self.lambda0 * 1e4)
        self.engine._eng.set_rule_lambda(self.lam)
        return None


# ----------------------------------------------------------------------------------------------
# One policy spec -> a controller (the CLI's --policy and the server's "flexquant" field)
# ----------------------------------------------------------------------------------------------

POLICIES = ("static", "layerwise", "linearwise", "flexquant", "input_aware")


def make_controller(engine, policy: str | None = None, budget_bits: float | None = None, bits: int | None = None,
                    levels: Sequence[int] | None = None, sink_protect: bool = False,
                    profile: Profile | None = None) -> Controller:
    """The controller a policy spec names, for `engine` (raises ValueError with a readable reason).

    policy None or "static": every linear at `bits` (default: the model's max_bits).
    "layerwise" | "linearwise" | "flexquant" | "input_aware": the calibrated policies at a mean-bits
    `budget_bits` (needs the calibration profile in the model file: `flexquant-rt calibrate`);
    `levels` = (lo, hi) for "flexquant" (default (4, max_bits)). sink_protect: the first position
    at max_bits, then the policy. `profile` skips reading it from the model file.
    """
    B = engine.max_bits
    policy = "static" if policy is None else policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (expected one of {', '.join(POLICIES)})")
    if levels is not None and policy != "flexquant":
        raise ValueError("levels applies to the flexquant policy only")
    if sink_protect and policy == "input_aware":
        raise ValueError("sink_protect needs a mask-driven policy; input_aware chooses bits inside the step")
    if policy == "static":
        if budget_bits is not None:
            raise ValueError("budget_bits needs a calibrated policy (layerwise, linearwise, flexquant, input_aware); "
                             "the static policy takes bits")
        b = B if bits is None else bits
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 2 <= b <= B:
            raise ValueError(f"bits must be an integer in 2..{B}, got {bits!r}")
        ctl: Controller = Static(int(b))
    else:
        if bits is not None:
            raise ValueError(f"bits applies to the static policy; the {policy} policy takes budget_bits")
        if budget_bits is None:
            raise ValueError(f"the {policy} policy needs budget_bits (mean bits per weight)")
        if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, float)) or not math.isfinite(budget_bits):
            raise ValueError(f"budget_bits must be a number, got {budget_bits!r}")
        if profile is None:
            profile = load_profile(engine)
        if profile is None:
            raise ValueError(f"the {policy} policy needs a calibration profile and this model file has none "
                             f"(run: flexquant-rt calibrate MODEL)")
        lo_bits = min(profile.levels)
        if not lo_bits <= budget_bits <= B:
            raise ValueError(f"budget_bits must be in {lo_bits}..{B} for this model, got {budget_bits}")
        budget = float(budget_bits)
        if policy == "layerwise":
            ctl = LayerwiseStatic(profile, budget)
        elif policy == "linearwise":
            ctl = LinearwiseStatic(profile, budget)
        elif policy == "input_aware":
            ctl = InputAware(profile, budget)
        else:
            lv = (min(4, int(math.floor(budget))), B) if levels is None else tuple(int(x) for x in levels)
            if len(lv) != 2 or not 2 <= lv[0] < lv[1] <= B:
                raise ValueError(f"levels must be two bit-widths lo < hi in 2..{B}, got {levels!r}")
            ctl = FlexQuant(profile, budget, levels=lv)
    return SinkProtect(ctl, B) if sink_protect else ctl


__all__ = ["Profile", "calibrate", "allocate", "Controller", "Static", "LayerwiseStatic", "FlexQuant", "InputAware", "SinkProtect", "LinearwiseStatic",
           "save_profile", "load_profile", "calibration_text", "text_chunks", "mean_bits", "POLICIES", "make_controller"]
