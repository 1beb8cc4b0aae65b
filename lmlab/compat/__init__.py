"""Entry points that accept other projects' command lines unchanged (e.g. the minllama `run_llama.py`)."""
