"""Checks of the tokenizer transformers builds from a GGUF file against what the file itself says.

Why: perplexity is only comparable when the token ids are the model's own. transformers converts a GGUF's
vocabulary into a tokenizer, and that conversion has differed between versions: transformers 5.17 turns Gemma 3
270M's GGUF into a tokenizer that splits common words into pieces ("hello" -> 2 tokens, where llama.cpp and
transformers 5.25 give the vocabulary's one token 23391) and opens no sequence with BOS although the file's
``tokenizer.ggml.add_bos_token`` asks for it. Such a model's FP perplexity measured 143.8 instead of the ~20 of
its real tokens, and every quantized number on it would have been as meaningless.

``match_gguf_tokenizer`` corrects the BOS flag to the file's (logged). A Gemma tokenizer that splits the
vocabulary's own whole-word tokens is rebuilt from the file the way transformers 5.25 builds it (``gemma_tokenizer``:
SentencePiece BPE whose merges follow the order of the file's tokens, since Gemma's scores do not follow its merge
order and the file lists no merges; 5.17 built a Unigram model from those scores instead), checked again, and
used (logged). Any other tokenizer that splits them is refused, naming the version and the fix.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger("atq")

PROBE_WORDS = 64  # whole-word tokens of the vocabulary encoded as one text
MAX_TOKENS_PER_WORD = 1.25  # a correct tokenizer gives about one token a word (the first may take two)
_WORD_MARKS = {"llama": "\u2581", "gpt2": "\u0120"}  # SentencePiece's ▁ and byte-level BPE's Ġ: a leading space


def match_gguf_tokenizer(tokenizer: Any, path: str | os.PathLike) -> Any:
    """``tokenizer`` (from ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), or a Gemma tokenizer rebuilt from
    the GGUF at ``path`` where transformers' splits the vocabulary's own words, opening sequences with BOS as the
    file asks; ValueError if neither encodes those words whole."""
    fields = _fields(path, ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
                            "tokenizer.ggml.token_type", "general.architecture"))
    words = probe_words(fields.get("tokenizer.ggml.tokens") or [], fields.get("tokenizer.ggml.model"))
    count = _split_count(tokenizer, words)
    import transformers  # only its version is read, for the messages below

    if count is not None and str(fields.get("general.architecture", "")).startswith("gemma"):
        rebuilt = gemma_tokenizer(fields, tokenizer)
        if _split_count(rebuilt, words) is None:
            log.warning("%s: transformers %s builds a tokenizer from this GGUF that encodes %d whole-word tokens of "
                        "its vocabulary as %d tokens (llama.cpp: one each); rebuilt from the file as transformers 5.25 "
                        "does (BPE, merges in the file's token order)", path, transformers.__version__, len(words),
                        count)
            tokenizer, count = rebuilt, None
    if count is not None:
        raise ValueError(
            f"{path}: transformers {transformers.__version__} builds a tokenizer from this GGUF that encodes "
            f"{len(words)} whole-word tokens of its own vocabulary (e.g. {words[:3]}) as {count} tokens; llama.cpp "
            "encodes each as one. Perplexity and calibration on those ids would mean nothing. Use a transformers "
            "version that converts this file correctly, or load the model from a checkpoint directory with its "
            "tokenizer.json")
    _match_bos(tokenizer, fields.get("tokenizer.ggml.add_bos_token"), path)
    return tokenizer


def _split_count(tokenizer: Any, words: list[str]) -> int | None:
    """How many tokens ``tokenizer`` makes of ``words`` (after a space each) when that is more than about one a
    word, else None (also for a vocabulary with too few whole-word tokens to probe: a character-level one)."""
    if len(words) < PROBE_WORDS // 2:
        return None
    count = len(tokenizer(" " + " ".join(words), add_special_tokens=False)["input_ids"])
    return count if count > MAX_TOKENS_PER_WORD * len(words) + 1 else None


def gemma_tokenizer(fields: dict[str, Any], built: Any) -> Any:
    """The Gemma tokenizer of a GGUF's vocabulary as transformers 5.25 builds it (its ``gemma_tokenizer``): tokens
    of only spaces respelled with ▁ (as GemmaTokenizer looks them up), merges derived from the vocabulary and ranked
    by the tokens' order in the file, control tokens (type 3) special and user-defined ones (type 4) added whole.
    ``built`` (transformers' own conversion) gives the special tokens' names and the chat template."""
    from transformers import AddedToken, GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in fields["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = generate_merges(vocab, {token: -index for index, token in enumerate(tokens)})
    names = {key: getattr(built, key, None) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, **{k: v for k, v in names.items() if v is not None})
    types = list(fields.get("tokenizer.ggml.token_type") or ())
    control = [AddedToken(token, normalized=False, special=True) for token, kind in zip(tokens, types) if kind == 3]
    if control:
        tokenizer.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    user = [AddedToken(token, normalized=False, special=False) for token, kind in zip(tokens, types) if kind == 4]
    if user:
        tokenizer.add_tokens(user)
    tokenizer.chat_template = getattr(built, "chat_template", None)
    return tokenizer


def probe_words(tokens: list[str], model: str | None) -> list[str]:
    """The first ``PROBE_WORDS`` tokens that are a leading-space mark and 4+ ASCII letters, as plain words: the
    vocabulary's common whole words, each of which its own tokenizer encodes (after a space) as that token."""
    mark = _WORD_MARKS.get(model or "")
    if mark is None:
        return []
    pattern = re.compile(re.escape(mark) + "[A-Za-z]{4,}")
    return [token[1:] for token in tokens if pattern.fullmatch(token)][:PROBE_WORDS]


def opening_token(tokenizer) -> int | None:
    """The BOS id when the tokenizer opens every sequence with it (Gemma; GGUF ``tokenizer.ggml.add_bos_token``,
    which transformers maps to ``add_bos_token``, or a post-processor that adds it: a Gemma tokenizer saved and
    reloaded reads ``add_bos_token`` False and still adds BOS), else None (SmolLM2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or getattr(tokenizer, "add_bos_token", False):
        return bos
    try:
        return bos if opens_with_bos(tokenizer) else None
    except (TypeError, KeyError, IndexError):  # a plain callable tokenizer (tests) that says nothing of BOS
        return None


def opens_with_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when it encodes a text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(len(ids)) and int(ids[0]) == bos


def _match_bos(tokenizer: Any, wanted: bool | None, path: str | os.PathLike) -> None:
    if wanted is None or getattr(tokenizer, "bos_token_id", None) is None or opens_with_bos(tokenizer) == wanted:
        return
    tokenizer.add_bos_token = bool(wanted)
    if opens_with_bos(tokenizer) != wanted:
        raise ValueError(f"{path}: the GGUF's tokenizer.ggml.add_bos_token is {wanted}, and the tokenizer "
                         "transformers built from it cannot be made to follow it")
    log.warning("%s: the tokenizer transformers built %s BOS; the file's tokenizer.ggml.add_bos_token says %s: "
                "corrected", path, "adds no" if wanted else "adds a", wanted)


def _fields(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` in the GGUF's metadata (absent keys left out); the tensors are not read."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: reader.fields[key].contents() for key in keys if key in reader.fields}
