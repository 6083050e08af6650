"""Shared fixtures: tiny random models built from configs, a character tokenizer, a text corpus."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before anything (transformers
# included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 256


class CharTokenizer:
    """Bytes as tokens: enough for windows and perplexity on tiny models, with no files to fetch."""

    def __call__(self, text: str, return_tensors: str | None = None):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
        return SimpleNamespace(input_ids=ids)

    def save_pretrained(self, directory: str) -> None:
        with open(f"{directory}/char_tokenizer.txt", "w") as handle:
            handle.write("bytes\n")


def make_llama(seed: int = 0, hidden: int = 72, tie: bool = True) -> LlamaForCausalLM:
    """Hidden size 72 with groups of 64 leaves a short last group, like SmolLM2's 576 with 128."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=72, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_gpt2()


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


def make_word_tokenizer():
    """A real (saveable, AutoTokenizer-loadable) word-level tokenizer built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", ".", "a", "an", "of", "and", "to", "in"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama saved like a hub checkpoint (config, safetensors, tokenizer)."""
    directory = tmp_path / "tiny-llama"
    make_llama(seed=5).save_pretrained(directory)
    make_word_tokenizer().save_pretrained(directory)
    return directory
