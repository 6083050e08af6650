import sys

import pytest
import torch

from atq.data import DataError, load_text, token_windows


def test_named_source_from_data_dir(tmp_path, monkeypatch):
    (tmp_path / "wikitext2_test.txt").write_text("hello test")
    (tmp_path / "wikitext2_valid_tokenized.txt").write_text("hello valid")
    monkeypatch.setenv("ATQ_DATA_DIR", str(tmp_path))
    assert load_text("wikitext2") == "hello test"
    assert load_text("wikitext2_valid") == "hello valid"


def test_data_dir_without_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ATQ_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="wikitext2_test.txt does not exist"):
        load_text("wikitext2")


def test_no_data_dir_and_no_datasets_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("ATQ_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="set ATQ_DATA_DIR"):
        load_text("wikitext2")


def test_path_and_bad_sources(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text")
    assert load_text(path) == "some text"
    with pytest.raises(DataError, match="cannot resolve data source"):
        load_text("wikitext3")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_text(tmp_path / "empty.txt")


def test_windows_are_consecutive_and_the_tail_is_dropped(char_tokenizer):
    text = "abcdefghij" * 5  # 50 tokens
    windows = token_windows(char_tokenizer, text, seq_len=16)
    assert windows.shape == (3, 16)
    assert torch.equal(windows.reshape(-1), torch.tensor(list(text.encode()))[:48])
    assert token_windows(char_tokenizer, text, 16, max_windows=2).shape == (2, 16)


def test_text_shorter_than_one_window(char_tokenizer):
    with pytest.raises(DataError, match="10 tokens, fewer than one window of 16"):
        token_windows(char_tokenizer, "abcdefghij", seq_len=16)
    with pytest.raises(DataError, match="max_windows"):
        token_windows(char_tokenizer, "abcdefghij" * 4, seq_len=16, max_windows=0)


def test_generated_token_cache_is_reused_and_regenerated_when_settings_change(tiny_llama, char_tokenizer, tmp_path,
                                                                            monkeypatch):
    from atq import data

    calls = []
    real = data.generated_windows
    monkeypatch.setattr(data, "generated_windows", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    cache = tmp_path / "cache" / "tokens.safetensors"
    first = data.cached_generated_windows(tiny_llama, char_tokenizer, 3, 12, cache, batch_size=2)
    again = data.cached_generated_windows(tiny_llama, char_tokenizer, 3, 12, cache, batch_size=2)
    assert torch.equal(first, again) and again.dtype == torch.long and calls == [(3, 12)]
    assert not list(cache.parent.glob(".*.tmp"))  # written atomically
    longer = data.cached_generated_windows(tiny_llama, char_tokenizer, 3, 16, cache, batch_size=2)
    assert longer.shape == (3, 16) and calls == [(3, 12), (3, 16)]
    cache.write_bytes(b"garbage")  # a corrupted cache is regenerated, not trusted
    assert data.cached_generated_windows(tiny_llama, char_tokenizer, 3, 16, cache, batch_size=2).shape == (3, 16)
    assert len(calls) == 3


class BosTokenizer:
    """Bytes as tokens, opening every text with BOS (id 1) like Gemma's tokenizer (``add_bos_token``)."""

    bos_token_id, add_bos_token = 1, True

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [1] * add_special_tokens + list(text.encode("utf-8"))
        return __import__("types").SimpleNamespace(input_ids=torch.tensor([ids]))


def test_windows_open_with_bos_where_the_tokenizer_asks_for_it():
    text = "abcdefghij" * 5  # 50 text tokens
    windows = token_windows(BosTokenizer(), text, seq_len=16)
    assert windows.shape == (3, 16) and (windows[:, 0] == 1).all()
    assert torch.equal(windows[:, 1:].reshape(-1), torch.tensor(list(text.encode()))[:45])  # text continues


def test_a_gemma3_model_is_evaluated_and_calibrated_on_bos_windows(tmp_path):
    """The loading fix on a tiny Gemma 3: perplexity and calibration feed it windows that open with BOS."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from atq import QuantConfig, perplexity, quantize

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                              sliding_window=32)
    model = Gemma3ForCausalLM(config).eval()
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 0]),
                                          with_kwargs=True)
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    assert perplexity(model, BosTokenizer(), str(tmp_path / "text.txt"), seq_len=32, quiet=True) > 1
    quantize(model, QuantConfig(group_size=32, calibration=str(tmp_path / "text.txt"), calibration_windows=4,
                                calibration_seq_len=32), tokenizer=BosTokenizer(), quiet=True)
    assert len(seen) >= 2 and all((first == 1).all() for first in seen)


def test_a_plain_callable_tokenizer_that_asks_for_bos_still_gets_bos_windows():
    class Plain:  # no add_special_tokens keyword: it always opens the text with BOS
        bos_token_id, add_bos_token = 1, True

        def __call__(self, text, return_tensors=None):
            return __import__("types").SimpleNamespace(input_ids=torch.tensor([[1, *text.encode("utf-8")]]))

    text = "abcdefghij" * 5
    windows = token_windows(Plain(), text, seq_len=16)
    assert (windows[:, 0] == 1).all() and torch.equal(windows[:, 1:].reshape(-1), torch.tensor(list(text.encode()))[:45])
