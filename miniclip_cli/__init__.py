"""miniclip: a compact CLIP toolkit: train, evaluate and use a small image-text dual encoder."""

__version__ = "0.1.0"
