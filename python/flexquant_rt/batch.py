"""Continuous batching: several generations share each decode step (`Engine.generate_batch`).

Batch-1 decode is bound by the weight bytes each step reads; `_core.Engine.decode_batch` runs one
step of several sequences as one pass, so every weight is read once for all of them. `Batch` keeps
up to `engine.n_seq` generations in the engine's sequence slots: `add()` prefills a prompt into a
free slot (and samples its first token), `step()` feeds every live sequence's pending token in one
batched pass and samples each one's next token from its own row, and a finished sequence's slot is
free for the next prompt at once.

Long prompts: a prompt of more than `prefill_chunk` tokens (256) is prefilled a chunk per step, so
the sequences already decoding keep producing tokens while it is read (no head-of-line stall of
the whole prompt's prefill). A chunk is the same arithmetic as a one-shot prefill up to the
summation order inside attention (fp32 rounding).

Precision: a step runs at one mask. Each sequence keeps its own mask (the engine's mask when it was
added, then whatever its controller returns); the step runs at their elementwise maximum, so no
sequence runs below the precision it asked for. A controller's StepInfo describes its own mask
(mean_bits, bytes_read: what the sequence would read alone), so its budget logic behaves as in a
solo run. Controllers that set in-step rules on the engine (input_aware) adapt one engine-wide λ
and are refused here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine import Engine, GenerationStats, StepInfo, _Sequence


@dataclass
class _Slot:
    key: object
    seq: _Sequence
    controller: object | None
    bits: np.ndarray                  # (n_layers * 7 + 1,) this sequence's mask, the LM head last
    bytes_read: int = 0               # weight bytes a step reads at `bits` (kept with it: _set_bits)
    mean_bits: float = 0.0            # bits per weight at `bits`
    pending: int = -1                 # the sampled token the next step feeds
    prefill: list[int] = field(default_factory=list)  # prompt tokens not yet fed


class Batch:
    """Up to engine.n_seq generations decoding together (CPU or CUDA backend).

        batch = Batch(engine)
        batch.add("a", ids_a, max_new_tokens=64, sampler=_core.Sampler(...))
        while batch.active:
            for key, piece, done in batch.step(): ...
    """

    prefill_chunk = 256  # prompt tokens fed per step while other sequences decode

    def __init__(self, engine: Engine):
        self.engine = engine
        self._eng = engine._eng
        self._free = list(range(self._eng.n_seq - 1, -1, -1))
        self._slots: dict[int, _Slot] = {}
        self._base = self._mask_vector()  # the engine's mask: where a sequence without a controller runs

    @property
    def active(self) -> int:
        """Generations in progress."""
        return len(self._slots)

    @property
    def free(self) -> int:
        """Sequence slots available to add()."""
        return len(self._free)

    def add(self, key, ids, max_new_tokens: int, sampler, stop_strs=(), stop_ids=(), controller=None,
            stats: GenerationStats | None = None) -> list[tuple[object, str, bool]]:
        """Prefill `ids` into a free slot (its first `prefill_chunk` tokens; the rest over the next
        steps) and, once the prompt is read, sample the first token. Returns the events it
        produced, as step() does: [(key, text piece, done)] (done at once if the first token ends it)."""
        if not self._free:
            raise RuntimeError(f"all {self._eng.n_seq} sequence slots are busy (n_seq = {self._eng.n_seq})")
        ids = list(ids)
        self.engine._check_prompt(ids)
        seq = _Sequence(ids, max_new_tokens, sampler, list(stop_strs), set(stop_ids), self.engine.detokenize, stats)
        slot_id = self._free[-1]
        bits = self._base.copy()
        if controller is not None:
            self._attach(controller)
            try:
                bits = self._update(bits, controller.mask(None))
            except BaseException:
                self._detach(controller)
                raise
        slot = _Slot(key, seq, controller, bits)
        self._set_bits(slot, bits)
        self._apply(slot.bits)
        self._free.pop()
        self._eng.reset_seq(slot_id)
        if stats is not None:
            stats.prompt_tokens = len(ids)
        slot.prefill = ids
        events: list[tuple[object, str, bool]] = []
        self._slots[slot_id] = slot
        try:
            self._feed(slot_id, slot, events)
        except BaseException:
            if self._slots.pop(slot_id, None) is not None:
                self._release(slot_id, slot)
            raise
        return events

    def _feed(self, s: int, slot: _Slot, events) -> None:
        """Feed the next chunk of a slot's prompt; at its end, sample the first token."""
        chunk, slot.prefill = slot.prefill[:self.prefill_chunk], slot.prefill[self.prefill_chunk:]
        self._apply(slot.bits)
        self._eng.eval_seq(s, self.engine._ids(chunk))
        if slot.prefill:
            return
        seq = slot.seq
        self._count(seq.stats, slot)  # the prompt counts as one step, as in generate()
        if seq.done:  # max_new_tokens == 0
            self._finish(s, slot, "", events)
            return
        tok = seq.sampler.sample(self._eng, seq.history)
        e, p1 = self._eng.signals()
        self._take(s, slot, tok, e, p1, events)

    def step(self) -> list[tuple[object, str, bool]]:
        """One decode step of every generation past its prompt, and the next prompt chunk of the
        oldest one still reading its prompt. Returns [(key, text piece, done)] for the generations
        that produced text or ended (a finished one's slot is free again). A generation whose
        controller raised ends with (key, the exception, True); the others are unaffected."""
        events: list[tuple[object, str, bool]] = []
        reading = [s for s, slot in self._slots.items() if slot.prefill]
        decoding = [s for s, slot in self._slots.items() if not slot.prefill]
        if reading:
            self._feed(reading[0], self._slots[reading[0]], events)
        if not decoding:
            return events
        ids = np.asarray(decoding, dtype=np.int32)
        toks = np.asarray([self._slots[s].pending for s in decoding], dtype=np.int32)
        self._apply(np.max([self._slots[s].bits for s in decoding], axis=0))
        logits, ent, top1 = self._eng.decode_batch(ids, toks)
        for i, s in enumerate(decoding):
            slot = self._slots[s]
            self._count(slot.seq.stats, slot)
            tok = slot.seq.sampler.sample_logits(logits[i], slot.seq.history)
            self._take(s, slot, tok, float(ent[i]), float(top1[i]), events)
        return events

    def cancel(self, key) -> bool:
        """Abandon generation `key` (its slot is free at once). False if it is not running."""
        for s, slot in list(self._slots.items()):
            if slot.key == key:
                del self._slots[s]
                self._release(s, slot)
                return True
        return False

    # -- internals ------------------------------------------------------------------------------
    def _take(self, s: int, slot: _Slot, tok: int, entropy: float, top1: float, events) -> None:
        seq = slot.seq
        consumed = seq.history[-1]  # the token the step that produced these logits consumed
        piece = seq.accept(tok, context_full=self._eng.n_past_seq(s) >= self._eng.n_ctx)
        if seq.done:
            self._finish(s, slot, piece, events)
            return
        if piece:
            events.append((slot.key, piece, False))
        slot.pending = tok
        if slot.controller is not None:
            info = StepInfo(int(self._eng.n_past_seq(s)), int(consumed), entropy, top1,
                            slot.bytes_read, slot.mean_bits)
            try:
                bits = self._update(slot.bits, slot.controller.mask(info))
                if bits is not slot.bits:  # a new mask (None keeps the array)
                    self._set_bits(slot, bits)
            except Exception as e:  # this generation fails alone; the others go on
                self._slots.pop(s, None)
                self._release(s, slot)
                events.append((slot.key, e, True))

    def _finish(self, s: int, slot: _Slot, piece: str, events) -> None:
        events.append((slot.key, piece, True))
        self._slots.pop(s, None)
        self._release(s, slot)

    def _release(self, s: int, slot: _Slot) -> None:
        if slot.controller is not None:
            self._detach(slot.controller)
        self._eng.reset_seq(s)
        self._free.append(s)

    @staticmethod
    def _detach(controller) -> None:
        detach = getattr(controller, "detach", None)
        if detach is not None:
            detach()

    def _attach(self, controller) -> None:
        attach = getattr(controller, "attach", None)
        if attach is not None:
            attach(self.engine)
        if self._eng.has_precision_rules:
            self._detach(controller)
            self._eng.clear_precision_rules()
            raise ValueError("controllers with in-step rules (input_aware) steer one engine-wide lambda and cannot "
                             "run per sequence in a batch; use a mask policy (static, layerwise, linearwise, flexquant)")
        reset = getattr(controller, "reset", None)
        if reset is not None:
            reset()

    def _mask_vector(self) -> np.ndarray:
        return np.append(self._eng.layer_bits().reshape(-1), np.int32(self._eng.lm_head_bits)).astype(np.int32)

    def _apply(self, bits: np.ndarray) -> None:
        self._eng.set_layer_bits(np.ascontiguousarray(bits[:-1].reshape(self.engine.n_layers, 7)))
        self._eng.set_lm_head_bits(int(bits[-1]))

    def _update(self, bits: np.ndarray, mask) -> np.ndarray:
        """A sequence's mask after its controller returned `mask` (None keeps it; the forms are
        Engine.set_layer_bits's, checked by the engine)."""
        if mask is None:
            return bits
        self._apply(bits)
        self.engine._apply(mask)
        return self._mask_vector()

    def _set_bits(self, slot: _Slot, bits: np.ndarray) -> None:
        """A sequence's mask, with the bytes and mean bits a step reads at it (computed once per
        mask change, not per step)."""
        sizes = self.engine._sizes()
        slot.bits = bits
        slot.bytes_read = int(self._eng.bytes_per_token_at(bits))
        slot.mean_bits = float(bits.astype(np.float64) @ sizes / sizes.sum())

    def _count(self, stats: GenerationStats | None, slot: _Slot) -> None:
        if stats is not None:
            stats.steps += 1
            stats.bytes_read += slot.bytes_read
            stats.bits_sum += slot.mean_bits
