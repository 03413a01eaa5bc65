"""A zero-shot image folder: `<root>/<class>/<image>`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DataError
from .pixels import IMAGE_SUFFIXES


@dataclass
class ImageFolder:
    """A zero-shot set: `<root>/CLASS/IMAGE`; class names from folder names, underscores as spaces."""

    root: Path
    class_names: list[str]
    paths: list[Path]
    labels: list[int]

    @classmethod
    def scan(cls, root: str | Path) -> ImageFolder:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: no such folder; --zero-shot takes a folder of CLASS/IMAGE subfolders")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        paths, labels, names = [], [], []
        for folder in folders:
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if images:
                labels += [len(names)] * len(images)
                paths += images
                names.append(folder.name.replace("_", " "))
        if len(names) < 2:
            raise DataError(f"{root}: found {len(names)} class folder(s) with images; zero-shot needs at least two "
                            "subfolders such as cat/ and dog/ holding images")
        return cls(root, names, paths, labels)

    def without(self, paths: set[Path]) -> ImageFolder:
        """The same classes (so labels keep their meaning) without the images in `paths`."""
        keep = [i for i, path in enumerate(self.paths) if path not in paths]
        return replace(self, paths=[self.paths[i] for i in keep], labels=[self.labels[i] for i in keep])
