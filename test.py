"""Evaluate a checkpoint: ``python test.py --checkpoint=PATH [--allow-pickle]
[--key=value ...]``."""

from pipeline.cli import test_main

if __name__ == "__main__":
    test_main()
