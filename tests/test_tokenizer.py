import functools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from miniclip_cli.tokenizer import Tokenizer, train_tokenizer

CAPTIONS = ["A dog runs across the grass .", "Two children play with a red ball", "a man rides a bike"] * 20


def test_round_trip_and_normalisation(tmp_path):
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=400)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    ids, lengths = loaded.encode(["A DOG runs across the grass ."], context_length=64)
    assert loaded.decode(ids[0][: lengths[0]]) == "a dog runs across the grass ."
    assert loaded.vocab_size == tokenizer.vocab_size


def test_unseen_unicode_still_encodes():
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=400)
    ids, lengths = tokenizer.encode(["ein Mädchen 🐕 café"], context_length=64)
    assert tokenizer.decode(ids[0][: lengths[0]]) == "ein mädchen 🐕 café"


def test_padding_and_truncation_keep_the_end_token():
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=400)
    long = " ".join(["grass"] * 100)
    ids, lengths = tokenizer.encode(["a dog", long], context_length=16)
    assert ids.shape == (2, 16)  # padded to the longest, which was cut to the context
    assert lengths[1] == 16 and ids[1, 15] == tokenizer.end_id
    assert ids[0, lengths[0] - 1] == tokenizer.end_id
    assert (ids[0, lengths[0]:] == tokenizer.pad_id).all()
    full, _ = tokenizer.encode(["a dog"], context_length=16, pad_to="max")
    assert full.shape == (1, 16)


# ------------------------------------------------------------------------------------------------ fuzzing


@functools.lru_cache(maxsize=1)
def fuzz_tokenizer():
    return train_tokenizer(CAPTIONS, vocab_size=400)


# Any code point, lone surrogates included (json.loads('"\\ud800"') and undecodable command-line bytes make
# them), plus the strings most likely to trip a tokenizer: its own special tokens, NFKC expansions, controls.
any_text = st.lists(
    st.one_of(
        st.characters(),
        st.integers(0xD800, 0xDFFF).map(chr),
        st.sampled_from(["<end>", "<pad>", "<start>", " ", "\x00", "\u200b", "\ufdfa", "\ufb03", "İ", "\r\n",
                         "🐕‍🦺"]),
    ),
    max_size=120,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(any_text, min_size=1, max_size=4), context=st.integers(3, 80),
       pad_to=st.sampled_from(["longest", "max"]))
def test_fuzz_any_unicode_encodes_within_vocab_and_context(texts, context, pad_to):
    tokenizer = fuzz_tokenizer()
    ids, lengths = tokenizer.encode(texts, context, pad_to=pad_to)
    assert ids.dtype == np.int64 and ids.shape[0] == len(texts) and ids.shape[1] <= context
    assert ((ids >= 0) & (ids < tokenizer.vocab_size)).all()
    assert ((lengths >= 2) & (lengths <= context)).all()
    for row, n in zip(ids, lengths):
        assert row[n - 1] == tokenizer.end_id
        assert (row[n:] == tokenizer.pad_id).all()
        assert isinstance(tokenizer.decode(row[:n]), str)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(-(2**70), 2**70), max_size=40))
def test_fuzz_decode_never_raises(ids):
    assert isinstance(fuzz_tokenizer().decode(ids), str)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="<"), max_size=60))
def test_fuzz_printable_ascii_round_trips(text):
    tokenizer = fuzz_tokenizer()
    ids, lengths = tokenizer.encode([text], context_length=200)
    assert tokenizer.decode(ids[0][: lengths[0]]) == text.lower().strip(" ")
