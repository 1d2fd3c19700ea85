"""The science: models, attribution methods and metrics in pure PyTorch/NumPy (no Ray below this package)."""
