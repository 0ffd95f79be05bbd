"""The Mamba block and the seed models (the PyTorch originals that hsiedge exports)."""

from hsiedge.models.mamba import Mamba, ResidualMamba
from hsiedge.models.mambahsi import MambaHSI
from hsiedge.models.md2f_mamba import MD2FMamba
from hsiedge.models.registry import MODELS, ModelSpec, build_model, count_parameters
from hsiedge.models.spectralmamba import SpectralMamba

__all__ = [
           "MODELS",
           "MD2FMamba",
           "Mamba",
           "MambaHSI",
           "ModelSpec",
           "ResidualMamba",
           "SpectralMamba",
           "build_model",
           "count_parameters",
]
