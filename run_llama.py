"""The minllama assignment's entry point, so its commands run unchanged from the repository root:
`python run_llama.py --option generate|prompt|finetune|lora ...` (see lmlab/compat/run_llama.py)."""

import sys

from lmlab.compat.run_llama import main

if __name__ == "__main__":
    sys.exit(main())
