"""Data pipelines, one module per kind of data: raw corpora (corpus.py), pretraining token shards and
batches (pretrain.py), labelled sentences (classification.py), instruction records (instruct.py, qa.py,
tasks.py), and what a batch is (batch.py).

A training batch source is any callable `(step, micro) -> batch dict`; the loop never asks for more.
"""
