"""The caption teacher of train.distill: WordLlama (`pip install 'miniclip[distill]'`), a sentence-embedding
model whose weights ship inside its PyPI wheel, so it loads offline. It averages 256-d token embeddings
distilled from Llama 2's; on Flickr8k's dev captions a caption's nearest neighbour among the other 4,999 is
one of its own image's captions 56% of the time, which is the knowledge the text tower is taught."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

INSTALL = "pip install 'miniclip[distill]'"


class CaptionTeacher:
    """Unit-length caption embeddings: teacher(captions) -> n x `dim` float32 tensor."""

    dim = 256

    def __init__(self):
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            import wordllama
        except ImportError:
            raise ConfigError(f"train.distill and train.teacher_tokens need the WordLlama caption teacher: {INSTALL}, "
                              "or set train.distill=0 and train.teacher_tokens=false") from None
        finally:  # wordllama's import calls logging.basicConfig; the CLI's output stays ours
            root.handlers[:], root.level = handlers, level
        from safetensors import safe_open
        from tokenizers import Tokenizer

        # WordLlama.load() looks for the tokenizer in a folder the wheel does not have and then downloads it;
        # the wheel's own files are read directly instead, so no network is needed.
        package = Path(wordllama.__file__).parent
        tokenizer_file = package / "tokenizers" / "l2_supercat_tokenizer_config.json"
        weights_file = package / "weights" / f"l2_supercat_{self.dim}.safetensors"
        for path in (tokenizer_file, weights_file):
            if not path.is_file():
                raise ConfigError(f"{path}: missing from the installed wordllama; reinstall it ({INSTALL}) "
                                  "or set train.distill=0 and train.teacher_tokens=false")
        with safe_open(str(weights_file), framework="np") as f:
            embedding = f.get_tensor("embedding.weight")
        self.model = wordllama.WordLlamaInference(embedding, Tokenizer.from_file(str(tokenizer_file)))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.model.embed(list(captions), norm=True))

    def start_tokens(self, embedding: nn.Embedding, tokens: list[str]) -> int:
        """Overwrite each row of `embedding` (vocab x width) with the teacher's embedding of that token's text,
        cut to the first min(width, dim) dimensions (WordLlama is trained so that its embeddings can be cut short)
        at the row norm of the model's random start, 0.02 per dimension. Rows of tokens it cannot embed (the
        specials, whose text is empty) keep their random start. Returns how many rows were set."""
        with np.errstate(invalid="ignore", divide="ignore"):  # an empty text embeds as 0 / 0
            rows = self(tokens)
        k = min(embedding.weight.shape[1], self.dim)
        rows = rows[:, :k]
        known = torch.isfinite(rows).all(-1) & (rows.norm(dim=-1) > 1e-3)
        rows = nn.functional.normalize(rows[known], dim=-1) * 0.02 * k**0.5
        with torch.no_grad():
            embedding.weight[known.to(embedding.weight.device), :k] = rows.to(embedding.weight)
        return int(known.sum())
