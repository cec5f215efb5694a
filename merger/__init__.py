"""merger: declarative, recipe-driven merging of neural-network weights."""

__version__ = "0.1.0"
