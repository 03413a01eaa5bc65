"""The caption tokenizer: byte-level BPE trained with HuggingFace `tokenizers`. Knows nothing of the model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import (
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from .data.layouts import clean_caption
from .errors import CheckpointError, ConfigError, SaveError
from .run_files import atomic_write

PAD, START, END = "<pad>", "<start>", "<end>"
SPECIALS = [PAD, START, END]  # ids 0, 1, 2
# At least the 256 byte tokens and the 3 specials. No caption set needs a million tokens, and far larger sizes
# (10^8) have ended in an abort inside the Rust trainer.
MIN_VOCAB, MAX_VOCAB = 260, 1_000_000


def _encodable(text: str) -> str:
    """`text` with lone surrogates as "?": `tokenizers` rejects them, and they do reach us, from JSON escapes
    such as "\\ud800" and from command-line bytes that are not UTF-8."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


class Tokenizer:
    """Wraps a HuggingFace tokenizer whose post-processor adds <start> ... <end>."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.pad_id = hf.token_to_id(PAD)
        self.end_id = hf.token_to_id(END)
        if self.pad_id is None or self.end_id is None or hf.token_to_id(START) is None:
            raise CheckpointError("tokenizer lacks the <pad>/<start>/<end> tokens; retrain it with `miniclip train-tokenizer`")
        # The model's embedding has vocab_size rows: an id past them (a crafted or damaged file) would fail
        # there, far from its cause. Checking every id here means encode cannot return one.
        largest = max(hf.get_vocab(with_added_tokens=True).values())
        if largest >= self.vocab_size:
            raise CheckpointError(f"token ids up to {largest} in a vocabulary of {self.vocab_size}; retrain the "
                                  "tokenizer with `miniclip train-tokenizer` or restore it from a copy")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, texts: list[str], context_length: int, pad_to: str = "longest") -> tuple[np.ndarray, np.ndarray]:
        """Token ids (n x L, int64, padded with <pad>) and lengths (n, counting <start> and <end>).

        Captions longer than the context are cut so that <end> stays last. pad_to="longest" pads to the
        batch's longest caption (cheaper to train on); "max" pads to the full context (fixed ONNX shapes).
        """
        encodings = [self.hf.encode(_encodable(t)) for t in texts]
        lengths = np.array([min(len(e.ids), context_length) for e in encodings], dtype=np.int64)
        width = context_length if pad_to == "max" else int(lengths.max(initial=2))
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        for row, (e, n) in enumerate(zip(encodings, lengths)):
            ids[row, :n] = e.ids[:n]
            ids[row, n - 1] = self.end_id  # truncated captions still end on <end>, whose output is the feature
        return ids, lengths

    def token_count(self, text: str) -> int:
        """Tokens in `text` with <start> and <end>, before any cut to the context."""
        return len(self.hf.encode(_encodable(text)).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; ids outside the vocabulary (from another tokenizer, say) are dropped, not an error."""
        size = self.vocab_size
        return self.hf.decode([int(i) for i in ids if 0 <= i < size], skip_special_tokens=True).strip()

    def texts(self) -> list[str]:
        """Each token's own text, by id ("" for the specials): " dog" for the token of the word dog."""
        return [self.hf.decode([i]) for i in range(self.vocab_size)]

    def to_json(self) -> str:
        """What save writes: the whole tokenizer (vocabulary, merges, normaliser, specials) as JSON."""
        return self.hf.to_str(pretty=True)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """The tokenizer to_json wrote (sent from another process, say)."""
        return cls(HFTokenizer.from_str(text))

    def save(self, path: Path) -> None:
        """Write to_json to `path` atomically: a full disk leaves the previous file as it was."""
        path = Path(path)
        try:
            atomic_write(path, lambda tmp: tmp.write_text(self.to_json(), encoding="utf-8"))
        except OSError as exc:
            raise SaveError(f"{path}: could not be written ({exc.strerror or exc}); the previous {path.name}, if "
                            "any, is unchanged; free disk space or choose another --out") from None

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file missing; train one with `miniclip train-tokenizer --out {path}`")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for any malformed file
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(exc)[:80]}); retrain it with `miniclip train-tokenizer`") from None
        try:
            return cls(hf)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None


def train_tokenizer(captions: Iterable[str], vocab_size: int = 10_000, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE over NFKC-normalised, lower-cased captions: any Unicode text encodes, none is <unk>."""
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"vocab size {vocab_size:,} is out of range; use one between {MIN_VOCAB} and {MAX_VOCAB:,} "
                          "(the 256 byte tokens and the specials at least)")
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Captions reach here from the caption-file layouts and shards, already clean; these are the last guard.
    hf.train_from_iterator(map(clean_caption, captions), trainer=trainer)
    start, end = hf.token_to_id(START), hf.token_to_id(END)
    hf.post_processor = processors.TemplateProcessing(single=f"{START} $A {END}", special_tokens=[(START, start), (END, end)])
    return Tokenizer(hf)
