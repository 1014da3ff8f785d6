"""grefine-hooks: score every diffusers image as it is generated and refine only the bad ones."""

__version__ = "0.1.0"
