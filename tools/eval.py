#!/usr/bin/env python3
"""Evaluate precision policies on held-out text: same as `flexquant-rt eval [MODEL]`."""
import sys

from flexquant_rt.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
