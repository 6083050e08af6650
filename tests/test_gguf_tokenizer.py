"""The tokenizer transformers builds from a GGUF, checked against the file (gguf_tokenizer.py). References: the
file's own vocabulary and BOS flag, written here; the wrong conversion is the one transformers 5.17 makes of
Gemma 3's GGUF (whole words split into pieces, no BOS), imitated by a tokenizer that encodes letter by letter."""

import pytest

from atq.data import opening_token
from atq.gguf_tokenizer import PROBE_WORDS, match_gguf_tokenizer, probe_words

gguf = pytest.importorskip("gguf")

WORDS = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(PROBE_WORDS + 8)]


def vocab_gguf(path, add_bos: bool = True):
    """A metadata-only GGUF with a SentencePiece vocabulary: specials, pieces, and whole words marked by ▁."""
    tokens = ["<pad>", "<eos>", "<bos>", "a", "b", *[f"\u2581{w}" for w in WORDS], "\u2581ab"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tokens


class Tokenizer:
    """Encodes each space-separated word as one id (``whole``) or as one id per letter; BOS (id 2) first when
    ``add_bos_token``."""

    bos_token_id = 2

    def __init__(self, tokens, whole: bool = True, add_bos_token: bool = False):
        self.ids, self.whole, self.add_bos_token = {t: i for i, t in enumerate(tokens)}, whole, add_bos_token

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for word in text.split():
            ids += [self.ids.get("\u2581" + word, 3)] if self.whole else [3] * len(word)
        return {"input_ids": ([2] if add_special_tokens and self.add_bos_token else []) + ids}


def test_probe_words_are_the_vocabularys_whole_words():
    tokens = ["<bos>", "\u2581the", "\u2581word", "\u0120word", "\u2581x1yz", "\u2581Tower"]
    assert probe_words(tokens, "llama") == ["word", "Tower"]  # 4+ letters after the mark
    assert probe_words(tokens, "gpt2") == ["word"]
    assert probe_words(tokens, "bert") == []


def test_a_tokenizer_that_encodes_the_vocabulary_right_passes_and_gets_the_files_bos(tmp_path, caplog):
    path, tokens = vocab_gguf(tmp_path / "v.gguf", add_bos=True)
    tokenizer = Tokenizer(tokens)
    assert opening_token(tokenizer) is None
    match_gguf_tokenizer(tokenizer, path)
    assert tokenizer.add_bos_token and opening_token(tokenizer) == 2
    assert "tokenizer.ggml.add_bos_token says True: corrected" in caplog.text


def test_a_tokenizer_that_adds_bos_the_file_does_not_ask_for_is_corrected(tmp_path):
    path, tokens = vocab_gguf(tmp_path / "v.gguf", add_bos=False)
    tokenizer = Tokenizer(tokens, add_bos_token=True)
    match_gguf_tokenizer(tokenizer, path)
    assert opening_token(tokenizer) is None


def test_a_tokenizer_that_splits_the_vocabularys_words_is_refused(tmp_path):
    path, tokens = vocab_gguf(tmp_path / "v.gguf")
    with pytest.raises(ValueError, match=rf"encodes {PROBE_WORDS} whole-word tokens of its own vocabulary .* as "
                                         rf"{6 * PROBE_WORDS} tokens; llama.cpp encodes each as one"):
        match_gguf_tokenizer(Tokenizer(tokens, whole=False), path)
