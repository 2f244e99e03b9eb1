"""Training core for sarkit: datasets, schedules, engines (PyTorch / DeepSpeed), checkpoints.

Heavy libraries are imported inside functions; ``sarkit.train.plugin`` is the built-in
``sarkit_pretrain`` implementation.
"""
