from open_clip.tokenizer import SimpleTokenizer

from cnexp.tinyworld.tokenizer import build_tiny_tokenizer


def test_tiny_tokenizer_splits_words_exactly_as_real_clip():
    tiny, real = build_tiny_tokenizer(), SimpleTokenizer()
    for text in ["a red circle and a yellow square on a blue background",
                 "a high-quality, detailed, and professional image"]:
        real_pieces = [p for word in real.encode(text) for p in [real.decoder[word]]]
        assert tiny.tokenize(text) == real_pieces
    assert len(tiny) < 1000  # vs 49408 in CLIP: keeps the tiny text encoder small
