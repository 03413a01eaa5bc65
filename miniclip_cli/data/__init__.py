"""Caption-file layouts, image datasets and transforms, and the built-in default dataset."""
