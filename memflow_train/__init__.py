"""memflow-train: fine-tune memory-aware streaming video generators with PyTorch Lightning."""

__version__ = "0.1.0"
