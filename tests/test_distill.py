"""train.distill and train.teacher_tokens: the caption-similarity loss, the WordLlama teacher, the token embeddings
it starts, and training with them."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from miniclip_cli.config import RunConfig, apply_overrides, load_run_config
from miniclip_cli.errors import ConfigError
from miniclip_cli.loss import distill_loss
from miniclip_cli.tokenizer import train_tokenizer

from .conftest import json_of, run_cli


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_distill_loss_matches_a_hand_computation():
    student, teacher, t = _unit(5, 8, seed=0), _unit(5, 12, seed=1), 0.1
    want = 0.0
    for i in range(5):
        others = [j for j in range(5) if j != i]
        s = [math.exp(float(student[i] @ student[j]) / t) for j in others]
        p = [math.exp(float(teacher[i] @ teacher[j]) / t) for j in others]
        s, p = [v / sum(s) for v in s], [v / sum(p) for v in p]
        want += sum(pj * math.log(pj / sj) for pj, sj in zip(p, s))
    assert distill_loss(student, teacher, t).item() == pytest.approx(want / 5, rel=1e-4)


def test_distill_loss_matches_similarities_not_coordinates():
    student = _unit(6, 8, seed=2)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
    teacher = F.pad(student, (0, 8)) @ rotation  # same cosines, another width and basis
    assert distill_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert distill_loss(student, _unit(6, 16, seed=4)).item() > 0.1
    one = _unit(1, 8, seed=5)  # a batch of one caption has no neighbours: nothing to match, no nan
    assert distill_loss(one, _unit(1, 16, seed=6)).item() == 0.0


def test_distill_weight_is_checked():
    with pytest.raises(ConfigError, match="train.distill"):
        apply_overrides(RunConfig(), ["train.distill=-1"])
    assert RunConfig().train.distill == 0.0  # off by default: the default recipe needs no teacher


def test_caption_teacher_puts_paraphrases_together():
    pytest.importorskip("wordllama")
    from miniclip_cli.teacher import CaptionTeacher

    vectors = CaptionTeacher()(["a dog runs on the grass", "a brown dog running across a lawn",
                                "two men play guitars on a stage"])
    assert vectors.shape == (3, 256) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2 and similarity[0, 1] > similarity[1, 2] + 0.2


def test_train_with_distillation(runner, tiny_dataset, tmp_path):
    pytest.importorskip("wordllama")
    common = ("train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8,
              "--workers", 0, "--vocab-size", 300, "--seed", 0, "--json")
    plain = json_of(run_cli(runner, *common, "--out", tmp_path / "plain"))
    taught = json_of(run_cli(runner, *common, "--out", tmp_path / "taught", "--set", "train.distill=1"))
    assert taught["steps"] == plain["steps"] > 0
    # same seed and data: the reported loss is the contrastive one plus the (positive) distillation term
    assert taught["last"]["train_loss"] != plain["last"]["train_loss"] and math.isfinite(taught["last"]["train_loss"])
    result = json_of(run_cli(runner, "eval", tmp_path / "taught", "--split", "all", "--json"))
    assert 0.0 <= result["match3_top1"] <= 100.0


def test_missing_teacher_is_one_line_exit_3(runner, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wordllama", None)  # import wordllama now raises ImportError
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--preset", "tiny",
                     "--epochs", 1, "--workers", 0, "--vocab-size", 300, "--set", "train.distill=1", code=3)
    assert "pip install 'miniclip[distill]'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("width", [32, 300])
def test_teacher_tokens_start_alike_words_alike(width):
    pytest.importorskip("wordllama")
    from miniclip_cli.teacher import CaptionTeacher

    words = ("dog", "puppy", "guitar")
    tokenizer = train_tokenizer([f"a {w} on the {w}" for w in words] * 20, vocab_size=300)
    ids = [tokenizer.hf.token_to_id(f"\u0120{w}") for w in words]  # byte-level BPE spells the leading space as \u0120
    assert None not in ids
    embedding = torch.nn.Embedding(tokenizer.vocab_size, width)
    torch.nn.init.normal_(embedding.weight, std=0.02)
    before = embedding.weight.detach().clone()
    assert CaptionTeacher().start_tokens(embedding, tokenizer.texts()) == tokenizer.vocab_size - 3
    after = embedding.weight.detach()
    k = min(width, 256)
    rows = F.normalize(after[ids, :k], dim=-1)
    assert rows[0] @ rows[1] > rows[0] @ rows[2] + 0.2  # dog starts nearer puppy than guitar; at random, ~0 both
    taught = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    taught[[tokenizer.hf.token_to_id(t) for t in ("<pad>", "<start>", "<end>")]] = False
    assert torch.equal(after[~taught], before[~taught])  # the specials have no text: their random start stays
    assert torch.allclose(after[taught, :k].norm(dim=-1), torch.full((int(taught.sum()),), 0.02 * k**0.5), atol=1e-5)
    assert torch.equal(after[:, k:], before[:, k:])  # past the teacher's 256 dimensions, the random start stays


def test_train_with_teacher_tokens(runner, tiny_dataset, tmp_path):
    pytest.importorskip("wordllama")
    out = tmp_path / "run"
    result = json_of(run_cli(runner, "train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 1,
                             "--batch-size", 8, "--workers", 0, "--vocab-size", 300, "--out", out, "--json",
                             "--set", "train.teacher_tokens=true"))
    assert result["steps"] > 0 and math.isfinite(result["last"]["train_loss"])
    assert load_run_config(out).train.teacher_tokens


def test_teacher_tokens_are_refused_with_a_teacher_run():
    with pytest.raises(ConfigError, match="teacher_tokens"):
        apply_overrides(RunConfig(), ["train.teacher_tokens=true", "train.teacher=runs/lit", "train.image_teacher=1"])


def test_teacher_tokens_without_wordllama_is_one_line_exit_3(runner, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wordllama", None)
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--preset", "tiny",
                     "--epochs", 1, "--workers", 0, "--vocab-size", 300, "--set", "train.teacher_tokens=true", code=3)
    assert "pip install 'miniclip[distill]'" in result.output and "Traceback" not in result.output
