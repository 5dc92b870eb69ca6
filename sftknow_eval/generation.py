"""Batched greedy generation with a transformers model, cut at stop strings (used by the
world's fitness checks, `world info` and the KL analysis's choice of templates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def greedy_complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 256,
    stop_strings: Sequence[str] = (".",),
    progress: bool = False,
    desc: str = "completing",
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), cut at a stop string."""
    stop_ids = [tokenizer.eos_token_id]
    for text in stop_strings:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            stop_ids.append(ids[0])
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
            chunk = list(prompts[start:start + batch_size])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return [cut_at_stop(text, stop_strings) for text in outputs]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) its first stop string or newline."""
    cut = len(text)
    for stop in (*stop_strings, "\n"):
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()
