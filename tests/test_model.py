import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from miniclip_cli.config import ModelConfig, tiny_model_config
from miniclip_cli.loss import clip_loss, siglip_loss
from miniclip_cli.metrics import match3_top1, retrieval_metrics, zero_shot_metrics
from miniclip_cli.model import MiniCLIP, count_parameters


def test_default_model_is_the_reference_size():
    model = MiniCLIP(ModelConfig(vocab_size=10_000))
    # about 9.2 M parameters with a 10,000-token vocabulary
    assert 9.1e6 < count_parameters(model) < 9.3e6
    assert model.visual.positions.shape == (65, 256)  # 8 x 8 patches + a class token


def test_shapes_and_unit_norm():
    torch.manual_seed(0)
    model = MiniCLIP(tiny_model_config(100)).eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(3, 100, (3, 7))
    image_features, text_features, scale = model(images, tokens, torch.tensor([7, 5, 3]))
    assert image_features.shape == text_features.shape == (3, 32)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert math.isclose(scale.item(), 1 / model.config.init_temperature, rel_tol=1e-5)


def test_padding_does_not_change_text_features():
    torch.manual_seed(0)
    model = MiniCLIP(tiny_model_config(100)).eval()
    tokens = torch.randint(3, 100, (2, 6))
    lengths = torch.tensor([6, 4])
    padded = torch.cat([tokens, torch.zeros(2, 26, dtype=torch.long)], dim=1)  # full 32-token context
    short = model.encode_text(tokens, lengths)
    full = model.encode_text(padded, lengths)
    assert torch.allclose(short, full, atol=1e-6)


def test_length_groups_give_the_same_text_features_and_gradients():
    torch.manual_seed(0)
    model = MiniCLIP(tiny_model_config(100)).eval()
    lengths = torch.tensor([9, 3, 12, 4, 7, 3, 5, 11, 6])
    tokens = torch.randint(3, 100, (9, 12)) * (torch.arange(12) < lengths[:, None])  # <pad> (0) after each end
    features = {}
    for groups in (1, 3):
        model.zero_grad()
        features[groups] = model.encode_text(tokens, lengths, groups=groups)
        features[groups].sum().backward()
        features[groups] = features[groups].detach(), model.text.token_embed.weight.grad.clone()
    assert torch.allclose(features[1][0], features[3][0], atol=1e-5)
    assert torch.allclose(features[1][1], features[3][1], atol=1e-5)


def reference_loss(image_features, text_features, scale):
    """The CLIP paper's pseudo-code, written out loop by loop."""
    n = image_features.shape[0]
    logits = [[scale * float(image_features[i] @ text_features[j]) for j in range(n)] for i in range(n)]
    image_terms = [-(logits[i][i] - math.log(sum(math.exp(v) for v in logits[i]))) for i in range(n)]
    columns = [[logits[i][j] for i in range(n)] for j in range(n)]
    text_terms = [-(columns[j][j] - math.log(sum(math.exp(v) for v in columns[j]))) for j in range(n)]
    return (sum(image_terms) / n + sum(text_terms) / n) / 2


def test_loss_matches_hand_written_reference():
    torch.manual_seed(1)
    image_features = F.normalize(torch.randn(5, 8), dim=-1)
    text_features = F.normalize(torch.randn(5, 8), dim=-1)
    got = clip_loss(image_features, text_features, torch.tensor(10.0)).item()
    assert math.isclose(got, reference_loss(image_features, text_features, 10.0), rel_tol=1e-5)


def test_sigmoid_loss_hand_computed():
    torch.manual_seed(4)
    b, scale, bias = 3, 10.0, -4.0
    image_features = F.normalize(torch.randn(b, 8), dim=-1)
    text_features = F.normalize(torch.randn(b, 8), dim=-1)
    total = 0.0
    for i in range(b):
        for t in range(b):
            logit = scale * float(image_features[i] @ text_features[t]) + bias
            label = 1.0 if t == i else 0.0  # caption t belongs to image t
            p = 1 / (1 + math.exp(-logit))
            total -= label * math.log(p) + (1 - label) * math.log(1 - p)
    got = siglip_loss(image_features, text_features, torch.tensor(scale), torch.tensor(bias))
    assert math.isclose(got.item(), total / b, rel_tol=1e-5)


def test_loss_is_low_for_matching_pairs():
    features = F.normalize(torch.eye(4), dim=-1)
    assert clip_loss(features, features, torch.tensor(100.0)).item() < 1e-3


def test_retrieval_metrics_hand_computed():
    # 3 images, 4 captions: caption 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2.
    similarity = torch.tensor([
        [0.1, 0.9, 0.2, 0.0],   # image 0: best caption is caption 1 (its own) -> rank 1
        [0.8, 0.1, 0.3, 0.2],   # image 1: own caption 2 has only 0.8 above it -> rank 2
        [0.5, 0.4, 0.3, 0.1],   # image 2: own caption 3 is last -> rank 4
    ])
    # Features whose dot products are exactly `similarity`: images as rows, captions as identity columns.
    image_features = similarity
    text_features = torch.eye(4)
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(image_features, text_features, owner)
    # image->text ranks: 1, 2, 4
    assert m["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert m["image_to_text_R@5"] == 100.0
    assert m["image_to_text_mean_rank"] == pytest.approx((1 + 2 + 4) / 3)
    # text->image: caption 0 column [0.1,0.8,0.5] -> own image 0 rank 3; caption 1 [0.9,0.1,0.4] -> 1;
    # caption 2 [0.2,0.3,0.3]: own image 1 scores 0.3, nothing strictly higher -> 1; caption 3 [0,0.2,0.1] -> 2.
    assert m["text_to_image_R@1"] == 50.0
    assert m["text_to_image_mean_rank"] == (3 + 1 + 1 + 2) / 4
    assert m["text_to_image_median_rank"] == 1.0  # the lower median of [1, 1, 2, 3], as torch takes it
    recalls = [m[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert m["mean_recall"] == pytest.approx(sum(recalls) / 6)


def test_match3_hand_computed():
    # 2 images x 2 captions, so both distractors always come from the other image.
    similarity = np.array([
        [0.9, 0.05, 0.3, 0.4],  # image 0: own caption 0 beats the others (hit); own caption 1 loses (miss)
        [0.1, 0.2, 0.8, 0.0],   # image 1: own caption 2 wins (hit); own caption 3 is lowest (miss)
    ])
    owner = np.array([0, 0, 1, 1])
    assert match3_top1(similarity, owner) == 50.0
    assert match3_top1(similarity, owner, seed=1) == 50.0
    # Ties count against the image: equal scores are not a pick.
    assert match3_top1(np.ones((2, 4)), owner) == 0.0


def test_match3_distractors_come_from_other_images():
    # Each image scores its own captions 1 and every other caption 0: a distractor drawn from the image's
    # own captions would tie at 1 and count as a miss.
    owner = np.repeat(np.arange(50), 5)
    similarity = (owner[None, :] == np.arange(50)[:, None]).astype(np.float32)
    assert match3_top1(similarity, owner) == 100.0
    assert retrieval_metrics(similarity, np.eye(250, dtype=np.float32), owner)["match3_top1"] == 100.0


def test_zero_shot_metrics_hand_computed():
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1, 1])
    m = zero_shot_metrics(logits, labels, ["cat", "dog"])
    assert m["top1"] == 50.0
    assert m["top5"] == 100.0
    assert m["per_class"] == pytest.approx({"cat": 100.0, "dog": 100 / 3})
    assert m["mean_per_class_recall"] == pytest.approx((100 + 100 / 3) / 2)
