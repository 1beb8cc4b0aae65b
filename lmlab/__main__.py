"""`python -m lmlab ...` (and `torchrun -m lmlab ...`) runs the CLI."""

from lmlab.cli import main

if __name__ == "__main__":
    main()
