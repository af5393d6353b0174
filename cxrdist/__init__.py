"""cxrdist: distributed multilabel chest X-ray training."""

__version__ = "0.1.0"
