#!/usr/bin/env python3
"""Calibrate a model's precision sensitivity: same as `flexquant-rt calibrate [MODEL]`."""
import sys

from flexquant_rt.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
