"""``atq generate``: see what a model says. The answer streams token by token as ``model.generate`` produces it
(transformers' ``TextStreamer``), under the tokenizer's chat template when it has one; greedy unless a
temperature is given. ``--compare`` then streams the FP model's answer to the same prompt, the one the artifact
was quantized from (``model.atq_source``) or ``--fp-model``."""

from __future__ import annotations

import argparse

import torch
from torch import nn


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    g = commands.add_parser("generate", help="stream a model's answer to a prompt (--compare: and the FP model's)")
    g.add_argument("--model", required=True, help="ATQ artifact dir, hub id, local dir, .gguf, or smollm2")
    g.add_argument("--prompt", required=True, help="the user's message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (default); > 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as plain text, not wrapped in the tokenizer's chat template")
    g.add_argument("--compare", action="store_true", help="then the FP model's answer to the same prompt")
    g.add_argument("--fp-model", default=None,
                   help="the FP model of --compare (default: the source the artifact was quantized from)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """Token ids (1, n) of ``prompt``: one user turn in the tokenizer's chat template, ready for the assistant's
    answer, when the tokenizer has a template and ``chat_template`` is on; else the plain text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def _sampling(max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """generate()'s decoding keywords: greedy at temperature 0 (the model's own sampling defaults cleared)."""
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate needs --max-new-tokens >= 1, --temperature >= 0 and --top-p in (0, 1], got "
                         f"{max_new_tokens}, {temperature} and {top_p}")
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def stream_answer(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, chat_template: bool = True) -> torch.Tensor:
    """Print the model's answer to ``prompt`` to stdout as it is generated; return the answer's token ids."""
    from transformers import TextStreamer

    sampling = _sampling(max_new_tokens, temperature, top_p)
    ids = prompt_ids(tokenizer, prompt, chat_template).to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(seed)
    with torch.inference_mode():
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                streamer=streamer, pad_token_id=pad, **sampling)
    return tokens[0, ids.shape[1]:].cpu()


def cmd_generate(args: argparse.Namespace) -> int:
    from .models import load_model

    _sampling(args.max_new_tokens, args.temperature, args.top_p)  # refuse bad options before loading a model
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, device=device)
    quantized = hasattr(model, "atq_config")
    fp_source = args.fp_model or (getattr(model, "atq_source", None) if quantized else None)
    if args.compare and not fp_source:
        raise ValueError(f"--compare needs the FP model: {args.model} records no source it was quantized from; "
                         "give it with --fp-model (hub id, local dir, .gguf, or smollm2)")
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "seed": args.seed, "chat_template": not args.no_chat_template}
    print(f"=== {'ternary' if quantized else 'model'}: {args.model} ===", flush=True)
    stream_answer(model, tokenizer, args.prompt, **options)
    if args.compare:
        del model  # one model in memory at a time
        fp_model, fp_tokenizer = load_model(fp_source, device=device)
        print(f"\n=== FP: {fp_source} ===", flush=True)
        stream_answer(fp_model, fp_tokenizer, args.prompt, **options)
    return 0
