"""The CUDA code run on the CPU stand-in for CUDA (tests/cuda_host/simt): the CUDA sources compiled
as C++, each block's threads as fibers, the tensor-core instructions computed from the PTX ISA's
fragment layouts (tests/cuda_host/simt/cuda_runtime.h and mma.h say what is modelled and what is not).

- `build` + `SimtOps`: the ops (attention, RMSNorm, RoPE, SwiGLU, the step signals, every GEMV path,
  the a8/a16/b1 GEMMs) through tests/cuda_host/simt_ops.cpp, with the signatures of the
  `_core.*_cuda` test entry points, so the op tests run on a GPU and, in CI, here (about 15 s to build).
- `build_package`: the whole package with the stand-in as its CUDA backend (tests/test_simt_engine.py;
  about a minute to build on 2 cores).
- `build(..., race_check=True)` + `SimtOps(exe, race_check=True)`: the same ops under ThreadSanitizer,
  each fiber a thread to it, so races between a block's threads are reported (`RaceReport`;
  tests/test_simt_racecheck.py).
- `build(..., traffic=True)` + `SimtOps(exe, traffic=True)`, `build_package(..., traffic=True)`: the
  kernels' memory traffic, launch by launch (`Traffic`; tests/cuda_host/simt/traffic.cpp,
  tests/test_simt_traffic.py, tools/kernel_traffic.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import flexquant_rt._core as core

ROOT = Path(__file__).resolve().parents[1]
# cuda/<stem>.cu for the op driver: the plain kernels, the GEMV and the GEMMs, whose tensor-core
# instructions have a FLEXQUANT_SIMT branch (tests/cuda_host/simt/mma.h computes them from the PTX
# ISA's fragment layouts)
SOURCES = ("device", "rms_norm", "rope", "swiglu", "sampling", "attention", "bitplane_matmul", "bitplane_matmul_gemm")
PATHS = {"auto": 0, "tc": 1, "fp32": 2, "mma": 3, "mma_a16": 4}  # BitplaneCudaPath
KINDS = {"a8": 1, "a16": 2, "b1": 3, "a8_wg": 4}  # BitplaneGemmKind
# extern __shared__ T name[];  ->  the stand-in's dynamic shared memory of the running block
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\((\d+)\)\s+)?(\w+)\s+(\w+)\[\];")
# kernel<<<grid, block, smem, stream>>>(  ->  simt_launch(kernel, grid, block, smem, stream)(
_TRIPLE_CHEVRON = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


# __shared__ [__align__(n)] T a[N]..., b...;  ->  T (&a)[N]... = ::simt::static_shared<T[N]...>(key, n); ...
_STATIC_SHARED = re.compile(r"(?<![\w])__shared__\s+(?:__align__\((\d+)\)\s+)?([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s+([^;()]+);")
_DECLARATOR = re.compile(r"\s*([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)*)$")


def _static_shared(m: re.Match, name: str) -> str:
    """One __shared__ declaration (of one or more variables) as references into the block's static
    shared memory (cuda_runtime.h, static_shared). The key: the declaration's place."""
    import zlib

    line = m.string.count("\n", 0, m.start()) + 1
    out = []
    for i, decl in enumerate(m[3].split(",")):
        d = _DECLARATOR.match(decl)
        if d is None:
            raise ValueError(f"{name}:{line}: a __shared__ declaration the stand-in's builder cannot read: {m[0]!r}")
        dims = d[2].replace(" ", "")
        key = zlib.crc32(f"{name}:{line}:{i}".encode()) & 0x7FFFFFFF
        ref = f"(&{d[1]}){dims}" if dims else f"&{d[1]}"
        out.append(f"{m[2]} {ref} = ::simt::static_shared<{m[2]}{dims}>(__PRETTY_FUNCTION__, {key}u, {m[1] or 0});")
    return " ".join(out)


def _rewrite_text(text: str, name: str) -> str:
    """CUDA source as C++ for the stand-in: extern __shared__ (the dynamic shared memory), __shared__
    (the static one: GCC ignores a section attribute on a template's static) and <<<>>> launches
    rewritten, every line kept where it was."""
    lines = text.count("\n")
    text = _EXTERN_SHARED.sub(lambda m: f"{m[2]}* const {m[3]} = reinterpret_cast<{m[2]}*>(::simt::dynamic_smem({m[1] or 16}));",
                              text)
    text = _STATIC_SHARED.sub(lambda m: _static_shared(m, name), text)
    text = _TRIPLE_CHEVRON.sub(lambda m: f"simt_launch({m.group(1)}, {m.group(2)})(", text)
    # a declaration the patterns missed would fall back to a plain static (not poisoned in a template)
    left = [i + 1 for i, ln in enumerate(text.splitlines()) if re.search(r"\b__shared__\b", ln.split("//")[0])]
    if left or text.count("\n") != lines:
        raise ValueError(f"{name}: the stand-in's builder left __shared__ at lines {left} or moved lines")
    return text


def _rewrite(sources: list[str], out_dir: Path) -> list[Path]:
    """The sources (paths under the repository) as C++ for the stand-in (_rewrite_text) in out_dir, and
    cpp/src/cuda_backend.h, whose device helpers declare __shared__ too (out_dir comes first on the
    include path) -> the rewritten sources."""
    out = []
    for rel in ["cpp/src/cuda_backend.h", *sources]:
        name = Path(rel).name
        dst = out_dir / (name + ".cpp" if name.endswith(".cu") else name)
        dst.write_text(f'#line 1 "{rel}"\n' + _rewrite_text((ROOT / rel).read_text(), rel))
        out.append(dst)
    return out[1:]


def _compile_all(jobs, what: str) -> None:
    """jobs: [(command, source name)], compiled in parallel; raises naming the first that failed."""
    def one(job):
        cmd, name = job
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"compiling {name} for {what} failed:\n{r.stderr[-4000:]}")

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        list(pool.map(one, jobs))


def _simt_flags(out_dir: Path, extra=()) -> list[str]:
    # out_dir first: its rewritten cuda_backend.h (_rewrite) before cpp/src's
    inc = ["-I", str(out_dir), "-I", str(ROOT / "tests/cuda_host/simt"), "-I", str(ROOT / "tests/cuda_host"),
           "-I", str(ROOT / "cpp/include"), "-I", str(ROOT / "cpp/src"), "-I", str(ROOT / "cuda")]
    # -ffp-contract=off: the kernels' separate multiplies and adds stay separate, as nvcc's _rn
    # intrinsics and the CPU ops keep them; -fno-strict-aliasing: kernels read registers through
    # other types, as nvcc allows
    return ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Werror", "-Wno-unknown-pragmas",
            "-Wno-psabi", "-DFLEXQUANT_SIMT", *inc, "-include", "cuda_runtime.h", *extra]


ENGINE_SOURCES = ("model_file", "engine", "ops/dequantize", "thread_pool", "cpu_features", "ops/bitplane_matmul",
                  "ops/bitplane_matmul_avx2", "ops/bitplane_matmul_avx2_i16", "ops/bitplane_matmul_avx512",
                  "ops/bitplane_matmul_vec128",
                  "ops/rms_norm", "ops/rope", "ops/attention", "ops/swiglu", "ops/sampling",
                  "ops/quantize_activations", "ops/nested_gptq", "tokenizer", "chat_template", "text_engine")
BINDING_SOURCES = ("bindings", "bind_engine", "bind_ops", "bind_text", "bind_cuda_ops")
CUDA_SOURCES = ("device", "dequantize", "bitplane_matmul", "bitplane_matmul_gemm", "rms_norm", "rope", "attention",
                "swiglu", "sampling", "forward")


def build_package(cxx: str, out_dir: Path, traffic: bool = False) -> Path:
    """The whole package with the stand-in as its CUDA backend: the engine and the bindings compiled
    as CMakeLists.txt compiles them (FLEXQUANT_HAVE_CUDA), cuda/*.cu on the stand-in, linked into
    out_dir/flexquant_rt/_core beside a copy of python/flexquant_rt. With out_dir on PYTHONPATH,
    `Engine(path, backend="cuda")` runs the CUDA forward pass (cuda/forward.cu: graphs, GEMV and GEMM
    dispatch, batches, tune) on the CPU. Needs pybind11 and the Python headers; ICU if present.
    traffic: the kernels measure their memory traffic (tests/cuda_host/simt/traffic.cpp): each launch's
    record goes to $SIMT_TRAFFIC_OUT, and `traffic_mark(text)` writes a line of the caller's between them."""
    import shutil
    import sysconfig

    import pybind11

    pkg = out_dir / "flexquant_rt"
    shutil.copytree(ROOT / "python" / "flexquant_rt", pkg, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    objs, jobs = [], []
    pic = ["-fPIC"]
    kernel_flags = [*pic, *TRAFFIC_FLAGS] if traffic else pic
    runtime_flags = [*pic, "-DSIMT_TRAFFIC", "-g"] if traffic else pic
    for stem, src in zip(CUDA_SOURCES, _rewrite([f"cuda/{stem}.cu" for stem in CUDA_SOURCES], out_dir)):
        objs.append(out_dir / f"{stem}.cu.o")
        jobs.append(([cxx, *_simt_flags(out_dir, kernel_flags), "-c", str(src), "-o", str(objs[-1])], f"cuda/{stem}.cu"))
    for stem in ("simt", "traffic") if traffic else ("simt",):
        objs.append(out_dir / f"{stem}.o")
        jobs.append(([cxx, *_simt_flags(out_dir, runtime_flags), "-c", str(ROOT / f"tests/cuda_host/simt/{stem}.cpp"), "-o",
                      str(objs[-1])], f"{stem}.cpp"))
    icu = subprocess.run(["pkg-config", "--libs", "icu-uc", "icu-i18n"], capture_output=True, text=True) \
        if shutil.which("pkg-config") else None
    have_icu = icu is not None and icu.returncode == 0
    engine_flags = ["-std=c++17", "-O2", "-DNDEBUG", *pic, "-DFLEXQUANT_HAVE_CUDA=1",
                    *(["-DFLEXQUANT_HAVE_ICU=1"] if have_icu else []),
                    "-I", str(ROOT / "cpp/include"), "-I", str(ROOT / "cpp/src")]
    for stem in ENGINE_SOURCES:
        objs.append(out_dir / (stem.replace("/", "_") + ".o"))
        jobs.append(([cxx, *engine_flags, "-c", str(ROOT / "cpp/src" / f"{stem}.cpp"), "-o", str(objs[-1])],
                     f"cpp/src/{stem}.cpp"))
    py_inc = ["-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]
    for stem in BINDING_SOURCES:
        objs.append(out_dir / f"py_{stem}.o")
        jobs.append(([cxx, *engine_flags, *py_inc, "-fvisibility=hidden", "-c", str(ROOT / "cpp/python" / f"{stem}.cpp"),
                      "-o", str(objs[-1])], f"cpp/python/{stem}.cpp"))
    _compile_all(jobs, "the engine on the CUDA stand-in")
    so = pkg / ("_core" + sysconfig.get_config_var("EXT_SUFFIX"))
    libs = icu.stdout.split() if have_icu else []
    subprocess.run([cxx, "-shared", *map(str, objs), "-o", str(so), *libs, "-lpthread"], check=True)
    return out_dir


# The race-checking build: ThreadSanitizer over the fibers (cuda_runtime.h says which orderings the
# stand-in declares); a report stops the run (exit status 66).
RACE_FLAGS = ("-fsanitize=thread", "-g")
TSAN_OPTIONS = "halt_on_error=1:exitcode=66:history_size=4"
# The traffic-measuring build: the compiler's ThreadSanitizer hooks at every access, answered by
# tests/cuda_host/simt/traffic.cpp instead of ThreadSanitizer (which is not linked). No SRA and no
# vectorizing, so that a load of the source stays one access of its size (a uint4: 16 bytes).
TRAFFIC_FLAGS = ("-fsanitize=thread", "-DSIMT_TRAFFIC", "-fno-tree-sra", "-fno-tree-vectorize",
                 "-fno-tree-loop-distribute-patterns", "-g")  # (the last: no loop turned into a memcpy the hooks miss)


def build(cxx: str, out_dir: Path, race_check: bool = False, traffic: bool = False) -> Path:
    """Compile the CUDA sources, the fiber scheduler and the driver (tests/cuda_host/simt_ops.cpp);
    race_check: with ThreadSanitizer (tests/test_simt_racecheck.py); traffic: measuring each launch's
    memory traffic (tests/test_simt_traffic.py, `Traffic`)."""
    assert not (race_check and traffic)
    extra = RACE_FLAGS if race_check else TRAFFIC_FLAGS if traffic else ()
    units = _rewrite([f"cuda/{stem}.cu" for stem in SOURCES] + ["tests/cuda_host/simt_ops.cpp"], out_dir)
    jobs = [([cxx, *_simt_flags(out_dir, extra), "-c", str(src), "-o", str(out_dir / (src.name + ".o"))], src.name) for src in units]
    # the scheduler and the traffic hooks themselves are not instrumented
    plain = ["-DSIMT_TRAFFIC", "-g"] if traffic else list(extra)
    runtime = [ROOT / "tests/cuda_host/simt/simt.cpp"] + ([ROOT / "tests/cuda_host/simt/traffic.cpp"] if traffic else [])
    jobs += [([cxx, *_simt_flags(out_dir, plain), "-c", str(src), "-o", str(out_dir / (src.name + ".o"))], src.name) for src in runtime]
    _compile_all(jobs, "the CUDA stand-in")
    exe = out_dir / "simt_ops"
    link = [] if traffic else list(extra)
    subprocess.run([cxx, *link, *(str(out_dir / (src.name + ".o")) for src in units + runtime), "-o", str(exe)], check=True)
    return exe


class RaceReport(RuntimeError):
    """ThreadSanitizer reported a race in a kernel run on the race-checking build."""


@dataclass
class AllocTraffic:
    """One allocation's traffic in one launch (tests/cuda_host/simt/traffic.cpp says how it is counted)."""
    id: int
    host: bool           # cudaMallocHost memory (read over the bus), else device memory
    size: int            # bytes
    read_sectors: int    # distinct 32-byte sectors read (each fetched once: a DRAM lower bound)
    written_sectors: int
    requests: int        # warp requests (and TMA copies) that touched it
    req_bytes: int       # the distinct bytes those requests asked for, request by request
    req_sectors: int     # the sectors they touched, request by request (L1/L2 transactions)
    read_ranges: list    # [(first sector, end sector)] read
    written_ranges: list

    @property
    def efficiency(self) -> float:
        """Bytes asked for / bytes of the sectors the requests touched (1.0: fully coalesced)."""
        return self.req_bytes / (32 * self.req_sectors) if self.req_sectors else 1.0


@dataclass
class SiteTraffic:
    """One access site (a load or store of the source, in one call context) in one launch."""
    pc: int
    callers: tuple       # the two innermost call sites (0: none)
    stack: int
    space: str           # "g" global, "s" shared, "c" a TMA copy (all of a launch's together)
    write: bool
    requests: int
    bytes: int           # asked for by the lanes (a broadcast counts once per lane)
    distinct: int        # global: the distinct bytes, request by request
    units: int           # global: sectors touched, request by request; shared: wavefronts
    ideal: int           # shared: the wavefronts without bank conflicts (one per phase)
    where: str = ""      # file:line (Traffic.symbolize)

    @property
    def efficiency(self) -> float:
        """global: distinct bytes / bytes of the sectors touched (1.0: fully coalesced)."""
        return self.distinct / (32 * self.units) if self.units else 1.0


@dataclass
class Launch:
    kernel_addr: int
    grid: tuple
    block: tuple
    mixed: int = 0       # lanes grouped into a request across a barrier: the grouping's self-check (0)
    allocs: dict = field(default_factory=dict)   # id -> AllocTraffic
    sites: list = field(default_factory=list)
    kernel: str = ""

    def dram_bytes(self, write: bool = False) -> int:
        """Bytes of the distinct sectors read (written) in device memory."""
        return 32 * sum(a.written_sectors if write else a.read_sectors for a in self.allocs.values() if not a.host)

    def bank_conflict_factor(self, sites=None) -> float:
        """Shared-memory wavefronts / the conflict-free ones (1.0: no bank conflicts)."""
        sh = [s for s in (sites if sites is not None else self.sites) if s.space == "s" and s.ideal]
        return sum(s.units for s in sh) / sum(s.ideal for s in sh) if sh else 1.0


def _strip_parameters(name: str) -> str:
    """f<(Kind)1>(int, float*) -> f<(Kind)1>: the demangled name without its parameter list."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


class Traffic:
    """The launches of one run of the traffic-measuring build, parsed from $SIMT_TRAFFIC_OUT."""

    def __init__(self, path: Path):
        self.launches: list[Launch] = []
        self.marks: list[tuple[int, str]] = []  # (launches before it, text): traffic_mark's lines
        self.object = ""
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        for i, line in enumerate(lines):
            try:
                self._parse(line)
            except (ValueError, IndexError, AttributeError) as e:
                raise ValueError(f"{path}:{i + 1}: a traffic record this parser cannot read ({e}): {line[:200]!r}") from e
        self.symbolize()

    def _parse(self, line: str) -> None:
        f = line.split()
        cur = self.launches[-1] if self.launches else None
        if f[0] == "object":
            self.object = line[len("object "):]
        elif f[0] == "mark":
            self.marks.append((len(self.launches), line[len("mark "):]))
        elif f[0] == "launch":
            self.launches.append(Launch(int(f[1], 16), tuple(map(int, f[2:5])), tuple(map(int, f[5:8])), int(f[8])))
        elif f[0] == "alloc":
            r, w = f.index("R"), f.index("W")
            rng = lambda xs: [tuple(map(int, x.split("-"))) for x in xs]  # noqa: E731
            a = AllocTraffic(int(f[1]), f[2] == "host", *map(int, f[3:9]), rng(f[r + 1:w]), rng(f[w + 1:]))
            cur.allocs[a.id] = a
        elif f[0] == "site":
            cur.sites.append(SiteTraffic(int(f[1], 16), (int(f[2], 16), int(f[3], 16)), int(f[4], 16), f[5],
                                         f[6] == "w", *map(int, f[7:12])))
        elif f[0] != "end":
            raise ValueError(f"unknown record {f[0]!r}")

    def symbolize(self) -> None:
        """Kernel names and the source lines of the sites (addr2line on the object's debug info): the
        innermost frame in cuda/ of the site, else of its call sites (a helper not inlined), else the
        site's own."""
        import shutil

        pcs = {la.kernel_addr for la in self.launches}
        for la in self.launches:
            for s in la.sites:
                pcs |= {a - 1 for a in (s.pc, *s.callers) if a}
        if not pcs:
            return
        if not self.object or shutil.which("addr2line") is None:
            raise RuntimeError("Traffic: the kernels cannot be named " +
                               ("(no addr2line: binutils)" if self.object else "(the record names no object)"))
        out = subprocess.run(["addr2line", "-a", "-f", "-C", "-i", "-e", self.object, *map(hex, sorted(pcs))],
                             capture_output=True, text=True).stdout.splitlines()
        frames: dict[int, list] = {}  # address -> [(function, file:line)], innermost first
        cur = None
        for line in out:
            if line.startswith("0x") and all(c in "0123456789abcdefx" for c in line):
                cur = frames.setdefault(int(line, 16), [])
            elif cur is not None:
                if cur and cur[-1][1] is None:
                    cur[-1] = (cur[-1][0], line.split(" (")[0])
                else:
                    cur.append((line, None))

        def ours(addr):
            return [f for _, f in frames.get(addr - 1, []) if f and "/cuda/" in f and "cuda_host" not in f]

        for la in self.launches:
            fr = frames.get(la.kernel_addr, [])
            if not fr:
                raise RuntimeError(f"Traffic: addr2line found no function at {hex(la.kernel_addr)} in {self.object}")
            name = fr[0][0].replace("(anonymous namespace)::", "").replace("flexquant::", "")
            la.kernel = _strip_parameters(name.removeprefix("void "))  # e.g. bitplane_matmul_tc_kernel<8, 2>
            for s in la.sites:
                if not s.pc:
                    s.where = "TMA"
                    continue
                chain = ours(s.pc) + [f for c in s.callers if c for f in ours(c)]
                chain = [c for i, c in enumerate(chain) if c not in chain[:i]][:2]
                own = [f for _, f in frames.get(s.pc - 1, []) if f]
                if not chain:
                    s.where = own[0] if own else "?"
                    continue
                short = ["cuda/" + c.rsplit("/cuda/", 1)[1] for c in chain]
                # the innermost line in cuda/, and the one it is called from (a helper's caller)
                s.where = short[0] + (f" < {short[1].split(':')[-1] if short[1].split(':')[0] == short[0].split(':')[0] else short[1]}"
                                      if len(short) > 1 else "")

    def after_mark(self, text: str) -> list[Launch]:
        """The launches between the mark `text` and the next mark (or the end)."""
        for i, (at, t) in enumerate(self.marks):
            if t == text:
                end = self.marks[i + 1][0] if i + 1 < len(self.marks) else len(self.launches)
                return self.launches[at:end]
        raise KeyError(f"no mark {text!r} (marks: {[t for _, t in self.marks]})")


def traffic_mark(text: str) -> None:
    """A mark between the launches' records, from a process running the traffic-measuring package."""
    import ctypes

    ctypes.CDLL(core.__file__).simt_traffic_mark(text.encode())


class SimtOps:
    """The `_core.*_cuda` op entry points, run on the CPU stand-in for CUDA."""

    name = "simt"

    def __init__(self, exe: Path, race_check: bool = False, traffic: bool = False):
        self.exe = exe
        self.env = dict(os.environ, TSAN_OPTIONS=TSAN_OPTIONS) if race_check else None
        self.measure_traffic = traffic
        self.traffic: Traffic | None = None  # the last op's launches (a traffic-measuring build)

    def _exec(self, d: Path, what: str, timeout: int = 600) -> subprocess.CompletedProcess:
        env = dict(os.environ, SIMT_TRAFFIC_OUT=str(d / "traffic.txt")) if self.measure_traffic else self.env
        r = subprocess.run([str(self.exe), str(d)], capture_output=True, text=True, timeout=timeout, env=env)
        if self.measure_traffic:
            self.traffic = Traffic(d / "traffic.txt")
        if "WARNING: ThreadSanitizer" in r.stderr:  # the report's head: the two accesses and their stacks
            raise RaceReport(f"simt_ops {what}: {r.stderr.strip()[:6000]}")
        return r

    def _run(self, op: str, nums, inputs: dict, outputs: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="simt_") as d:
            d = Path(d)
            (d / "meta.txt").write_text(op + " " + " ".join(str(int(v)) for v in nums))
            for name, arr in inputs.items():
                np.ascontiguousarray(arr).tofile(d / f"{name}.bin")
            r = self._exec(d, op)
            if r.returncode == 2 and r.stderr.startswith("error: "):
                raise core.FlexquantError(r.stderr[len("error: "):].strip())
            if r.returncode:
                raise RuntimeError(f"simt_ops {op} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
            return {name: np.fromfile(d / f"{name}.out", dtype=dt).reshape(shape)
                    for name, (dt, shape) in outputs.items()}

    def rms_norm_cuda(self, x, w, eps):
        m, d = x.shape
        eps_bits = np.array([eps], np.float32).view(np.uint32)[0]
        return self._run("rms_norm", (m, d, eps_bits), {"x": x, "w": w}, {"y": (np.float32, (m, d))})["y"]

    def rope_cuda(self, inv_freq, q, k, positions):
        m, H, d = q.shape
        Hkv = k.shape[1]
        r = self._run("rope", (m, H, Hkv, d), {"inv": inv_freq, "q": q, "k": k, "pos": positions.astype(np.int64)},
                      {"q": (np.float32, q.shape), "k": (np.float32, k.shape)})
        return r["q"], r["k"]

    def rope_kv_store(self, inv_freq, q, k, v, positions, bases, k_cache, v_cache):
        """rope_kv_store_launch, the engine's fused RoPE + cache write: -> q, k rotated, the caches."""
        m, H, d = q.shape
        Hkv = k.shape[1]
        f16 = k_cache.dtype == np.float16
        r = self._run("rope_kv", (m, H, Hkv, d, int(f16), k_cache.shape[0]),
                      {"inv": inv_freq, "q": q, "k": k, "v": v, "pos": positions.astype(np.int64),
                       "bases": bases.astype(np.int64), "kc": k_cache, "vc": v_cache},
                      {"q": (np.float32, q.shape), "k": (np.float32, k.shape), "kc": (k_cache.dtype, k_cache.shape),
                       "vc": (v_cache.dtype, v_cache.shape)})
        return r["q"], r["k"], r["kc"], r["vc"]

    def swiglu_cuda(self, gate, up):
        return self._run("swiglu", (gate.shape[0],), {"g": gate, "u": up}, {"out": (np.float32, gate.shape)})["out"]

    def attention_cuda(self, q, k_cache, v_cache, p0, n_splits=1, base=0, prefill=False):
        m, H, d = q.shape
        t_max, Hkv = k_cache.shape[:2]
        return self._run("attention", (k_cache.dtype == np.float16, t_max, m, p0, H, Hkv, d, n_splits, base, prefill),
                         {"q": q, "kc": k_cache, "vc": v_cache}, {"out": (np.float32, q.shape)})["out"]

    def step_signals(self, logits):
        """entropy_and_top1_launch over the rows of logits (rows, vocab): the batched step's signals."""
        rows, vocab = logits.shape
        dt = np.dtype([("entropy", np.float32), ("top1", np.float32), ("argmax", np.int32)])
        return self._run("signals", (rows, vocab), {"logits": logits}, {"out": (dt, (rows,))})["out"]

    def entropy_and_top1_cuda(self, logits):
        s = self.step_signals(logits.reshape(1, -1))[0]
        return float(s["entropy"]), float(s["top1"]), int(s["argmax"])

    def selftest(self, name: str):
        """Runs one of the driver's rule-breaking kernels: -> (exit status, stderr, out (64) f32 or None)."""
        return self.selftest_files(name)[:3]

    def selftest_files(self, name: str):
        """-> (exit status, stderr, out f32 or None (64; traffic: 12 x 32), {a, b, d} of the sm_90 tests
        (those written))."""
        with tempfile.TemporaryDirectory(prefix="simt_") as d:
            (Path(d) / "meta.txt").write_text(f"selftest {name}")  # (simt_ops.cpp's main lists the names)
            r = self._exec(Path(d), f"selftest {name}", timeout=60)
            out = Path(d) / "out.out"
            files = {n: np.fromfile(Path(d) / f"{n}.out", dtype=dt) for n, dt in (("a", np.int8), ("b", np.int8), ("d", np.int32))
                     if (Path(d) / f"{n}.out").exists()}
            return r.returncode, r.stderr, np.fromfile(out, dtype=np.float32) if out.exists() else None, files

    # ---- the bit-plane GEMV (cuda/bitplane_matmul.cu) ----

    @staticmethod
    def _linear(planes, qparams):
        return {"planes": np.ascontiguousarray(planes, np.uint8), "qparams": np.ascontiguousarray(qparams).view(np.uint16)}

    def bitplane_matmul_cuda(self, planes, qparams, n, k, max_bits, group_size, bits, x, path="auto", warps=0,
                             y0=None, prefetch=-1):
        x2 = np.atleast_2d(x)
        m = x2.shape[0]
        inputs = {**self._linear(planes, qparams), "x": x2}
        if y0 is not None:
            inputs["y0"] = np.atleast_2d(y0)
        y = self._run("gemv", (n, k, max_bits, group_size, bits, m, PATHS[path], warps, prefetch, planes.shape[0],
                               planes.shape[1], y0 is not None), inputs, {"y": (np.float32, (m, n))})["y"]
        return y[0] if x.ndim == 1 else y

    def bitplane_matmul_fused_cuda(self, planes, qparams, n, k, max_bits, group_size, bits, x, op, aux, eps=1e-5,
                                   path="tc"):
        m = x.shape[0]
        eps_bits = np.array([eps], np.float32).view(np.uint32)[0]
        r = self._run("fused", (n, k, max_bits, group_size, bits, m, {"rms_norm": 1, "swiglu": 2}[op], PATHS[path],
                                eps_bits, planes.shape[0], planes.shape[1]),
                      {**self._linear(planes, qparams), "x": x, "aux": aux},
                      {"y": (np.float32, (m, n)), "out": (np.float32, (m, k))})
        return r["y"], r["out"]

    def bitplane_matmul_multi_cuda(self, planes, qparams, ns, k, max_bits, group_size, bits, x, path="auto", warps=0,
                                   prefetch=-1):
        m = x.shape[0]
        nums = [len(ns), k, max_bits, group_size, m, PATHS[path], warps, prefetch]
        inputs = {"x": x}
        for i, (p, q, n, b) in enumerate(zip(planes, qparams, ns, bits)):
            nums += [n, b, p.shape[0], p.shape[1]]
            lin = self._linear(p, q)
            inputs[f"planes{i}"], inputs[f"qparams{i}"] = lin["planes"], lin["qparams"]
        r = self._run("multi", nums, inputs, {f"y{i}": (np.float32, (m, n)) for i, n in enumerate(ns)})
        return [r[f"y{i}"] for i in range(len(ns))]

    @staticmethod
    def bitplane_cuda_mma_supports(group_size):
        return group_size in (128, 256, 512)

    # ---- the tensor-core GEMMs (cuda/bitplane_matmul_gemm.cu: A8, A16, B1 and the wgmma A8_WG) ----

    def bitplane_gemm_cuda(self, planes, qparams, n, k, max_bits, group_size, bits, x, kind="a8", act_bits=0, y0=None):
        x2 = np.atleast_2d(x)
        m = x2.shape[0]
        if kind not in KINDS:
            raise ValueError(f"kind: expected 'a8', 'a16', 'b1' or 'a8_wg', got '{kind}'")
        inputs = {**self._linear(planes, qparams), "x": x2}
        if y0 is not None:
            inputs["y0"] = np.atleast_2d(y0)
        y = self._run("gemm", (n, k, max_bits, group_size, bits, m, KINDS[kind], act_bits, planes.shape[0],
                               planes.shape[1], y0 is not None), inputs, {"y": (np.float32, (m, n))})["y"]
        return y[0] if x.ndim == 1 else y

    def bitplane_unpack_codes_cuda(self, planes, qparams, n, k, max_bits, group_size, bits):
        k_pad = -(-k // 128) * 128
        return self._run("unpack", (n, k, max_bits, group_size, bits, planes.shape[0], planes.shape[1]),
                         self._linear(planes, qparams), {"codes": (np.int8, (n, k_pad))})["codes"]

    def bitplane_gemm_wgmma_supported(self, group_size):
        """The host code's answer (its probe kernel runs on the stand-in, whose hopper.h models wgmma)."""
        return bool(self._run("wgmma_supported", (group_size,), {}, {"out": (np.int32, (1,))})["out"][0])
