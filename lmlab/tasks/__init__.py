"""Downstream tasks built on the core, each a thin setup around the one training loop:
classification (classify.py: zero-shot, full and LoRA fine-tuning with a head), instruction tuning
(sft.py), QA adapters (qa.py, task_eval.py). Import the module you need; nothing is loaded here.
"""
