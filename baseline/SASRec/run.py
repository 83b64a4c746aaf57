"""Train the SASRec baseline: ``python run.py [--config=PATH ...] [--key=value ...]``
(settings: config.yaml)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from pipeline.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(model="SASRec")
