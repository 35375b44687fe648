"""flexquant_rt: LLM inference on a bit-plane weight store, one file for every precision.

    import flexquant_rt
    with flexquant_rt.Engine("model.fq") as eng:      # or Engine() for the default model
        print(eng.generate("The capital of France is", max_new_tokens=16))
"""
from __future__ import annotations

__version__ = "0.1.0"

from .model_file import FORMAT_VERSION, ModelFileError  # noqa: F401
from . import _core  # noqa: F401  (the C++ extension)
from ._core import FlexquantError  # noqa: F401
from .engine import Engine, GenerationStats, StepInfo  # noqa: F401
