"""Foreign weight formats in and out (llama2.c, GGUF, Hugging Face, the hub), lmlab checkpoints, and load_model."""
