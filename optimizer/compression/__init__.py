"""Pruning, distillation, PyTorch export and ``dlopt.compress``."""
