"""The caption teacher of train.distill: WordLlama (`pip install 'miniclip[distill]'`), a sentence-embedding
model whose weights ship inside its PyPI wheel, so it loads offline. It averages 256-d token embeddings
distilled from Llama 2's; on Flickr8k's dev captions a caption's nearest neighbour among the other 4,999 is
one of its own image's captions 56% of the time, which is the knowledge the text tower is taught."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

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
            raise ConfigError(f"train.distill needs the WordLlama caption teacher: {INSTALL}, or set "
                              "train.distill=0") from None
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
                                  "or set train.distill=0")
        with safe_open(str(weights_file), framework="np") as f:
            embedding = f.get_tensor("embedding.weight")
        self.model = wordllama.WordLlamaInference(embedding, Tokenizer.from_file(str(tokenizer_file)))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.model.embed(list(captions), norm=True))
