import math

import pytest
import torch

from atq import evaluate, perplexity


def test_perplexity_matches_transformers_own_loss(tiny_llama, char_tokenizer, text_file):
    ids = char_tokenizer(text_file.read_text()).input_ids[0]
    seq_len, n = 64, len(ids) // 64
    with torch.no_grad():
        losses = [tiny_llama(ids[None, i * seq_len:(i + 1) * seq_len],
                             labels=ids[None, i * seq_len:(i + 1) * seq_len]).loss.double() for i in range(n)]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert perplexity(tiny_llama, char_tokenizer, text_file, seq_len=seq_len, quiet=True) == pytest.approx(
        expected, rel=1e-6)


def test_token_accuracy_and_counts(tiny_llama, char_tokenizer, text_file):
    result = evaluate(tiny_llama, char_tokenizer, text_file, seq_len=64, max_windows=3, batch_size=2, quiet=True)
    ids = char_tokenizer(text_file.read_text()).input_ids[0][: 3 * 64].reshape(3, 64)
    with torch.no_grad():
        predicted = tiny_llama(ids).logits[:, :-1].argmax(-1)
    assert result["token_accuracy"] == pytest.approx(float((predicted == ids[:, 1:]).float().mean()))
    assert (result["windows"], result["tokens"], result["seq_len"]) == (3, 192, 64)


def test_batching_does_not_change_the_result(tiny_llama, char_tokenizer, text_file):
    one = perplexity(tiny_llama, char_tokenizer, text_file, seq_len=64, batch_size=1, quiet=True)
    four = perplexity(tiny_llama, char_tokenizer, text_file, seq_len=64, batch_size=4, quiet=True)
    assert one == pytest.approx(four, rel=1e-5)
