"""The tokenizer transformers builds from a GGUF, checked against the file (gguf_tokenizer.py). References: the
file's own vocabulary and BOS flag, written here; the wrong conversion is the one transformers 5.17 makes of
Gemma 3's GGUF (whole words split into pieces, no BOS), imitated by a tokenizer that encodes letter by letter."""

import pytest

from atq.data import opening_token
from atq.gguf_tokenizer import PROBE_WORDS, match_gguf_tokenizer, probe_words

gguf = pytest.importorskip("gguf")

WORDS = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(PROBE_WORDS + 8)]


def vocab_gguf(path, add_bos: bool = True, architecture: str = "llama"):
    """A metadata-only GGUF with a SentencePiece vocabulary: specials, pieces, and whole words marked by ▁, in
    an order from which BPE merges follow (every token after the two pieces it joins: ▁ + w, ▁w + o, ...)."""
    letters = [chr(97 + i) for i in range(26)]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", *letters, "\u2581x", "\u2581w", "\u2581wo",
              "\u2581wor", "\u2581word", *[f"\u2581word{c}" for c in "abc"], *[f"\u2581{w}" for w in WORDS], "\u2581ab",
              "yz", "xy"]  # " xyz" is ▁x + yz when merges follow the file's order, ▁ + xy + z when they run backwards
    writer = gguf.GGUFWriter(path, architecture)
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
    letters = sum(map(len, probe_words(tokens, "llama")))  # the imitation's one token a letter
    with pytest.raises(ValueError, match=rf"encodes {PROBE_WORDS} whole-word tokens of its own vocabulary .* as "
                                         rf"{letters} tokens; llama.cpp encodes each as one"):
        match_gguf_tokenizer(Tokenizer(tokens, whole=False), path)


def test_a_gemma_tokenizer_that_splits_words_is_rebuilt_from_the_file(tmp_path, caplog):
    """transformers 5.17's Gemma conversion (imitated: letter by letter) is replaced by the BPE tokenizer 5.25
    builds: each word comes out as the file's own token for it, and BOS opens sequences as the file asks."""
    path, tokens = vocab_gguf(tmp_path / "g.gguf", add_bos=True, architecture="gemma3")
    tokenizer = match_gguf_tokenizer(Tokenizer(tokens, whole=False), path)
    assert not isinstance(tokenizer, Tokenizer)
    words = WORDS[:5] + ["word"]
    assert tokenizer(" " + " ".join(words))["input_ids"] == [2] + [tokens.index(f"\u2581{w}") for w in words]
    assert tokenizer(" xyz", add_special_tokens=False)["input_ids"] == [tokens.index("\u2581x"), tokens.index("yz")]
    assert "rebuilt from the file as transformers 5.25 does" in caplog.text


def test_the_rebuilt_gemma_tokenizer_encodes_as_llama_cpp_does():
    """On the real Gemma 3 GGUF (``ATQ_GGUF_GEMMA3_270M``): the ids of WikiText-2 text equal llama.cpp's own
    tokenization of it (llama-cpp-python, vocabulary only), BOS included."""
    import os

    from transformers import AutoTokenizer

    from atq.data import load_text
    from atq.gguf_tokenizer import _fields, gemma_tokenizer

    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (a llama.cpp build)")
    path = os.environ.get("ATQ_GGUF_GEMMA3_270M")
    if not path:
        pytest.skip("set ATQ_GGUF_GEMMA3_270M to the Gemma 3 270M GGUF")
    fields = _fields(path, ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    tokenizer = gemma_tokenizer(fields, AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                                       gguf_file=os.path.basename(path)))
    tokenizer.add_bos_token = True
    text = load_text("wikitext2")[:20000]
    reference = llama_cpp.Llama(path, vocab_only=True, verbose=False).tokenize(text.encode(), add_bos=True)
    assert tokenizer(text)["input_ids"] == reference
