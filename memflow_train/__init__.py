"""memflow-train: fine-tune memory-aware streaming video generators with PyTorch Lightning."""

import logging

__version__ = "0.1.0"

# DeepSpeed is imported by third-party packages (accelerate, through diffusers) even when no DeepSpeed
# strategy runs, and then warns on every CPU run that it found no GPU: nothing a user can act on. Its
# logger is created by name at import, so a filter on that name set up front stays in place.
logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
