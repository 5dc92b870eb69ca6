"""Pretraining of the tiny world's Llama-architecture base model on its corpus.

A plain PyTorch loop (with transformers' cosine schedule) rather than ``Trainer``: the corpus
is a few hundred thousand tokens packed into fixed blocks, and the loop's whole job is a
seeded shuffle, a step and a progress bar; Trainer's data pipeline would add only overhead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)


@dataclass
class ModelShape:
    """The base model's architecture (Llama)."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    intermediate: int = 768
    context: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PretrainSettings:
    """How the base model is pretrained."""

    epochs: float = 3.1
    learning_rate: float = 2e-3
    batch_size: int = 32
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    # bf16 autocast (weights and optimizer state stay fp32): 1.5x faster on a CPU with
    # AVX512-BF16; the shipped world was pretrained this way.
    bf16_autocast: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def make_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama model sized by ``shape`` for ``tokenizer``'s vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pack_documents(
    documents: Sequence[str], tokenizer: PreTrainedTokenizerFast, context: int
) -> torch.Tensor:
    """Tokenize documents, join them with EOS, and cut the stream into ``context``-long blocks."""
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    usable = len(stream) // context * context
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, context)


def pretrain(
    model: LlamaForCausalLM,
    blocks: torch.Tensor,
    settings: PretrainSettings,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on ``blocks`` in place; returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(blocks) / settings.batch_size)
    total_steps = max(1, round(steps_per_epoch * settings.epochs))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95),
        weight_decay=settings.weight_decay,
    )
    schedule = get_cosine_schedule_with_warmup(
        optimizer, max(1, round(total_steps * settings.warmup_fraction)), total_steps
    )
    model.train()
    epoch_losses: list[float] = []
    bar = tqdm(total=total_steps, desc="pretraining", unit="step", disable=not progress)
    step = 0
    while step < total_steps:
        order = torch.randperm(len(blocks), generator=generator)
        losses: list[float] = []
        for start in range(0, len(blocks), settings.batch_size):
            if step >= total_steps:
                break
            batch = blocks[order[start:start + settings.batch_size]]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16_autocast):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        epoch_losses.append(sum(losses) / max(1, len(losses)))
    bar.close()
    model.eval()
    return epoch_losses
