"""Pretraining building blocks in plain PyTorch (no Ray): config, optimizer, batches, gradient cache, plots.

`pipelines/pretrain.py` wires them into Ray Train + DeepSpeed.
"""
