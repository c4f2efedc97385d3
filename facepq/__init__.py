"""facepq: distributed face search over OPQN product-quantization codes."""

__version__ = "0.1.0"
