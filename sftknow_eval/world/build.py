"""Build a tiny world from its seed: knowledge base, corpus, tokenizer, pretrained base model,
fitness measurements, and a manifest; written atomically into one folder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from sftknow_eval.atomic import atomic_folder
from sftknow_eval.facts import Fact, write_jsonl
from sftknow_eval.relations import RELATIONS
from sftknow_eval.versions import library_versions
from sftknow_eval.world import measure
from sftknow_eval.world.corpus import build_corpus
from sftknow_eval.world.knowledge import WorldConfig, generate_facts
from sftknow_eval.world.pretrain import (
    ModelShape,
    PretrainSettings,
    make_model,
    pack_documents,
    pretrain,
)
from sftknow_eval.world.shipped import FACT_FILES, MANIFEST, MODEL_DIR
from sftknow_eval.world.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class BuildRecipe:
    """Everything a world build depends on; the same recipe and seed give the same world."""

    world: WorldConfig = field(default_factory=WorldConfig)
    shape: ModelShape = field(default_factory=ModelShape)
    pretraining: PretrainSettings = field(default_factory=PretrainSettings)
    extraction: measure.ExtractionSettings = field(default_factory=measure.ExtractionSettings)

    @classmethod
    def full(cls, seed: int = 0) -> BuildRecipe:
        recipe = cls()
        recipe.world.seed = seed
        recipe.extraction.seed = seed
        return recipe

    @classmethod
    def quick(cls, seed: int = 0) -> BuildRecipe:
        """A small world for tests: same pipeline, a few facts per relation, a tiny model."""
        return cls(
            world=WorldConfig(seed=seed, subjects_in_domain=14, subjects_out_of_domain=6,
                              test_per_relation=3, dev_per_relation=2, pool_scale=0.2),
            shape=ModelShape(layers=2, hidden=64, heads=2, intermediate=128, context=64),
            pretraining=PretrainSettings(epochs=3, learning_rate=3e-3, batch_size=16),
            extraction=measure.ExtractionSettings(train_size=20, min_exposure=16, epochs=2,
                                                  seed=seed),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"world": self.world.to_dict(), "model": self.shape.to_dict(),
                "pretraining": self.pretraining.to_dict(),
                "extraction": self.extraction.to_dict()}


def split_files(facts: list[Fact]) -> dict[str, list[Fact]]:
    """Facts grouped into the world's fact files (shipped.FACT_FILES)."""
    return {
        "train": [f for f in facts if f.split == "train"],
        "dev_in_domain": [f for f in facts if f.split == "dev"],
        "test_in_domain": [f for f in facts if f.split == "test" and f.domain == "in"],
        "test_out_of_domain": [f for f in facts if f.split == "test" and f.domain == "out"],
    }


def vocabulary_texts(facts: list[Fact], documents: list[str]) -> list[str]:
    """Every text whose words the tokenizer must hold: corpus, questions, templates, answers."""
    texts = list(documents)
    texts.extend(f.question for f in facts)
    texts.extend(alias for f in facts for alias in f.aliases)
    texts.extend(f.subject for f in facts)
    for relation in RELATIONS.values():
        texts.extend(relation.mapping_templates)
        texts.append(relation.question)
    return texts


def build_world(
    out: str | os.PathLike[str],
    recipe: BuildRecipe,
    *,
    force: bool = False,
    run_measurements: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the world described by ``recipe`` into ``out``; returns its manifest."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    started = time.perf_counter()
    torch.manual_seed(recipe.world.seed)
    facts = generate_facts(recipe.world)
    documents = build_corpus(facts, recipe.world.seed)
    tokenizer = build_tokenizer(vocabulary_texts(facts, documents), recipe.shape.context)
    blocks = pack_documents(documents, tokenizer, recipe.shape.context)
    model = make_model(tokenizer, recipe.shape, recipe.world.seed)
    logger.info("world: %d facts, %d documents, %d tokens, vocabulary %d, %d parameters",
                len(facts), len(documents), blocks.numel(), len(tokenizer),
                sum(p.numel() for p in model.parameters()))
    pretrain_started = time.perf_counter()
    losses = pretrain(model, blocks, recipe.pretraining, recipe.world.seed, progress=progress)
    pretrain_seconds = time.perf_counter() - pretrain_started
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )

    measurements: dict[str, Any] = {}
    if run_measurements:
        score = measure.template_success(model, tokenizer, facts, progress=progress)
        measurements["greedy_template_success_by_exposure"] = measure.rate_by_band(facts, score)
        measurements["extraction"] = measure.extraction_check(
            model, tokenizer, facts, recipe.extraction
        )

    with atomic_folder(out) as staging:
        model.save_pretrained(staging / MODEL_DIR, safe_serialization=True)
        tokenizer.save_pretrained(staging / MODEL_DIR)
        for name, group in split_files(facts).items():
            write_jsonl(group, staging / FACT_FILES[name])
        manifest = {
            "format": "sftknow-eval tiny world, version 2",
            "seed": recipe.world.seed,
            "recipe": recipe.to_dict(),
            "counts": {name: len(group) for name, group in split_files(facts).items()},
            "corpus": {"documents": len(documents), "tokens": int(blocks.numel()),
                       "sentences": sum(int(f.meta["exposure"]) for f in facts)},
            "model": {"parameters": sum(p.numel() for p in model.parameters()),
                      "vocabulary": len(tokenizer)},
            "pretraining": {"epoch_losses": losses, "seconds": round(pretrain_seconds, 1),
                            "threads": torch.get_num_threads()},
            "measurements": measurements,
            "build_seconds": round(time.perf_counter() - started, 1),
            "machine": {"python": platform.python_version(), "processor": platform.machine()},
            "versions": library_versions(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
