"""miniclip: a compact CLIP toolkit: train, evaluate and use a small image-text dual encoder.

The search API, for notebooks and scripts (no CLI, and no PyTorch with backend="onnx"):

    import miniclip_cli as mc
    model = mc.load("artifacts/runs/f30k", backend="onnx")   # an Encoder
    vectors = model.encode_texts(["a dog on the beach"])      # unit rows, n d float32
    index, stats = mc.index_folder("~/Pictures", model)       # builds or updates ~/Pictures/.miniclip/index-f30k.npz
    for hit in mc.search(index, model, "a dog on the beach", top=5):
        print(hit.rank, f"{hit.score:.4f}", hit.path)
    index = mc.load_index(mc.find_index("~/Pictures"))        # later, without re-scanning
"""

__version__ = "0.1.0"

# Resolved on first use (PEP 562), so `import miniclip_cli` stays cheap: no NumPy, PIL or onnxruntime until
# a name below is asked for, and never torch.
_API = {"load": "index", "index_folder": "index", "load_index": "index", "find_index": "index", "search": "index",
        "query_vector": "index", "scan_folder": "index", "Index": "index", "Hit": "index", "IndexStats": "index",
        "Encoder": "runtime", "open_encoder": "runtime"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'miniclip_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
