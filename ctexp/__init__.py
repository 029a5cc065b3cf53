"""ctexp: decode CODI continuous thoughts into CoT tokens with tuned lenses, as an experiment registry."""

__version__ = "0.1.0"
