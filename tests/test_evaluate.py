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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_windows_longer_than_the_models_positions_are_refused_naming_both(family, char_tokenizer, text_file):
    """Past its 256 positions GPT-2 has no embedding (an IndexError before) and Llama extrapolates RoPE (a
    silently different number before): both refuse, naming the two lengths, before reading the text."""
    from atq.data import DataError
    from atq.evaluate import evaluate_windows

    from .conftest import make_gpt2, make_llama

    model = make_llama() if family == "llama" else make_gpt2()
    with pytest.raises(DataError, match="seq_len 257 is longer than the model's 256 positions"):
        perplexity(model, char_tokenizer, "no-such-file.txt", seq_len=257, quiet=True)
    with pytest.raises(DataError, match="seq_len 300 is longer than the model's 256 positions"):
        evaluate_windows(model, torch.zeros(1, 300, dtype=torch.long), quiet=True)
    assert math.isfinite(perplexity(model, char_tokenizer, text_file, seq_len=256, max_windows=1, quiet=True))


def test_llama_cpp_perplexity_reads_logits_as_evaluate_windows_does():
    """A stand-in for llama_cpp.Llama that serves a tiny model's logits: the perplexity from them must be the
    one evaluate_windows computes (the protocol both sides of a GGUF comparison share)."""
    from types import SimpleNamespace

    from atq.evaluate import evaluate_windows, llama_cpp_perplexity

    from .conftest import make_llama

    model = make_llama(seed=4)
    windows = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    llm = SimpleNamespace(scores=None, reset=lambda: None)

    def run(window):
        with torch.no_grad():
            llm.scores = model(torch.tensor([window])).logits[0].double().numpy()

    llm.eval = run
    assert llama_cpp_perplexity(llm, windows) == pytest.approx(evaluate_windows(model, windows, quiet=True)["ppl"],
                                                               rel=1e-5)
