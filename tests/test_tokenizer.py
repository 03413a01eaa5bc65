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
