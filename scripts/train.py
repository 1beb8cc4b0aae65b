"""Seed 004's train entry point, run by lmlab: `python scripts/train.py task=mcq ...` with the seed's Hydra
overrides (configs/; see lmlab/compat/qa_hydra.py and docs/configuration.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this repository's lmlab, even uninstalled

from lmlab.compat.qa_hydra import train_main

if __name__ == "__main__":
    sys.exit(train_main())
