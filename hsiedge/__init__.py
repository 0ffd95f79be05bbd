"""hsiedge: Mamba hyperspectral classifiers from PyTorch to edge hardware, with proof of parity."""

__version__ = "0.2.0"
