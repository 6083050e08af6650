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


# --- generation options (LLM-QAT / BitDistiller), prompts and the mix ----------------------------------------

def _argmax_continuation(model, tokens, new):
    """``new`` tokens appended to each row of ``tokens`` by a plain argmax over full forward passes, EOS excluded
    (a window is never cut short): the independent reference for the greedy part of generated windows."""
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(new):
            logits = model(tokens).logits[:, -1].double()
            logits[:, eos] = -float("inf")
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens


def test_the_first_greedy_tokens_are_the_argmax_and_the_rest_is_sampled(tiny_llama, char_tokenizer):
    from atq.data import generated_windows

    windows = generated_windows(tiny_llama, char_tokenizer, 4, 12, batch_size=3, seed=1, quiet=True, greedy_tokens=5)
    greedy = _argmax_continuation(tiny_llama, windows[:, :1], 11)
    assert torch.equal(windows[:, :6], greedy[:, :6])  # the first token, then 5 greedy ones
    assert not torch.equal(windows[:, 6:], greedy[:, 6:])  # then sampled: the argmax path is left
    default = generated_windows(tiny_llama, char_tokenizer, 4, 12, batch_size=3, seed=1, quiet=True)
    assert torch.equal(windows[:, 0], default[:, 0])  # the same first tokens (one seed, one draw)
    assert not torch.equal(windows, default)


def test_a_tiny_top_p_is_greedy_and_the_temperature_is_used(tiny_llama, char_tokenizer):
    from atq.data import generated_windows

    nucleus = generated_windows(tiny_llama, char_tokenizer, 3, 10, seed=2, quiet=True, top_p=1e-9)
    assert torch.equal(nucleus, _argmax_continuation(tiny_llama, nucleus[:, :1], 9))
    hot = generated_windows(tiny_llama, char_tokenizer, 3, 10, seed=2, quiet=True, temperature=0.5)
    assert not torch.equal(hot, generated_windows(tiny_llama, char_tokenizer, 3, 10, seed=2, quiet=True))


def test_uniform_first_tokens_are_drawn_across_the_vocabulary_even_with_bos(tiny_llama):
    from atq.data import generated_windows

    windows = generated_windows(tiny_llama, BosTokenizer(), 5, 6, seed=4, quiet=True, first_token="uniform")
    assert torch.equal(windows[:, 0], torch.randint(256, (5,), generator=torch.Generator().manual_seed(4)))
    after_bos = generated_windows(tiny_llama, BosTokenizer(), 5, 6, seed=4, quiet=True)  # the model's, after BOS
    assert not torch.equal(after_bos[:, 0], windows[:, 0])


PARAGRAPHS = " = Title = \n\n the first paragraph is here .\n short\n\n the second one follows .\n the third ends it .\n"


def test_prompts_are_paragraph_openings_spread_over_the_text(char_tokenizer):
    from atq.data import text_prompts

    openings = [bytes(row.tolist()).decode() for row in text_prompts(char_tokenizer, PARAGRAPHS, 3, 8)]
    assert openings == ["the firs", "the seco", "the thir"]  # the heading and the short line are no paragraphs
    assert [bytes(r.tolist()).decode() for r in text_prompts(char_tokenizer, PARAGRAPHS, 5, 8)] == [
        "the firs", "the firs", "the seco", "the seco", "the thir"]  # fewer paragraphs than prompts: each in turn
    with_bos = text_prompts(BosTokenizer(), PARAGRAPHS, 2, 8)
    assert with_bos.shape == (2, 8) and (with_bos[:, 0] == 1).all() and bytes(with_bos[1, 1:].tolist()) == b"the sec"
    with pytest.raises(DataError, match="no paragraph .* has the 40 tokens a prompt of 40 needs"):
        text_prompts(char_tokenizer, PARAGRAPHS, 2, 40)


def test_generated_windows_continue_their_prompts(tiny_llama, char_tokenizer):
    from atq.data import generated_windows, text_prompts

    prompts = text_prompts(char_tokenizer, PARAGRAPHS, 3, 8)
    windows = generated_windows(tiny_llama, char_tokenizer, 5, 14, batch_size=2, quiet=True, prompts=prompts,
                                greedy_tokens=2)
    assert windows.shape == (5, 14)
    assert torch.equal(windows[:, :8], prompts[torch.arange(5) % 3])  # each window opens with its prompt
    assert torch.equal(windows[:, :10], _argmax_continuation(tiny_llama, windows[:, :8], 2))  # ... continued
    with pytest.raises(DataError, match="prompts must be .*1 <= length < seq_len 8"):
        generated_windows(tiny_llama, char_tokenizer, 2, 8, quiet=True, prompts=prompts)


def test_the_mix_has_the_exact_share_in_a_seeded_order():
    from atq.data import mixed_windows

    calibration = torch.arange(3).repeat_interleave(4).reshape(3, 4)  # rows 0, 1, 2
    generated = (100 + torch.arange(5)).repeat_interleave(4).reshape(5, 4)  # rows 100 .. 104
    mix = mixed_windows(calibration, generated, 0.3, 10, seed=1)
    firsts = mix[:, 0].tolist()
    assert sorted(firsts) == [0, 0, 0, 1, 1, 2, 2, 100, 101, 102]  # 3 generated, 7 calibration repeated in turn
    assert torch.equal(mix, mixed_windows(calibration, generated, 0.3, 10, seed=1))
    assert not torch.equal(mix, mixed_windows(calibration, generated, 0.3, 10, seed=2))
    assert firsts != sorted(firsts)  # interleaved, not the calibration block then the generated one
    assert mixed_windows(calibration, generated, 0.0, 7)[:, 0].tolist().count(0) == 3  # calibration only
    assert sorted(mixed_windows(calibration[:0], generated, 1.0, 5)[:, 0].tolist()) == list(range(100, 105))
    with pytest.raises(DataError, match="generated_fraction must be in \\[0, 1\\], got 1.5"):
        mixed_windows(calibration, generated, 1.5, 10)
    with pytest.raises(DataError, match="6 generated and 4 calibration windows asked for, 5 generated"):
        mixed_windows(calibration, generated, 0.6, 10)


def test_the_cache_records_every_generation_option(tiny_llama, char_tokenizer, tmp_path, monkeypatch):
    from atq import data

    calls = []
    real = data.generated_windows
    monkeypatch.setattr(data, "generated_windows", lambda *a, **k: calls.append(k) or real(*a, **k))
    cache = tmp_path / "tokens.safetensors"
    prompts = data.text_prompts(char_tokenizer, PARAGRAPHS, 2, 6)  # "the fi", "the se"
    base = {"prompts": prompts}
    changes = [{"greedy_tokens": 2}, {"temperature": 0.7}, {"top_p": 0.9}, {"first_token": "uniform"},
               {"prompts": prompts.flip(0)}, {"prompts": None}, {"batch_size": 2}, {"seed": 1}]
    for change in changes:  # from the base, one option changed, and back: every step regenerates once
        for options in ({**base, **change}, base):
            for _ in range(2):  # made once, then reused
                data.cached_generated_windows(tiny_llama, char_tokenizer, 3, 8, cache, quiet=True, **options)
    assert len(calls) == 2 * len(changes)
    data.cached_generated_windows(tiny_llama, char_tokenizer, 3, 8, cache, quiet=True, temperature=1, **base)
    assert len(calls) == 2 * len(changes)  # 1 is 1.0: reused
    with pytest.raises(TypeError, match="unknown sampling keyword.*top_k"):
        data.cached_generated_windows(tiny_llama, char_tokenizer, 3, 8, cache, quiet=True, top_k=5)
