#!/usr/bin/env python3
"""Convert a Hugging Face Llama directory or a llama GGUF file to a flexquant model file.

    python tools/convert.py SRC OUT.fq [--group-size G] [--max-bits B]
    python tools/convert.py --synthetic llama2-7b OUT.fq
    python tools/convert.py MODEL.fq --export-hf DIR --bits 4

Same as `flexquant-rt convert`; see `python -m flexquant_rt.convert --help`.
"""
import sys

from flexquant_rt.convert import main

if __name__ == "__main__":
    sys.exit(main())
