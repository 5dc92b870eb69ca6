"""A human-readable description of a built world, with a live sample of its model's answers."""

from __future__ import annotations

import json
import random
from pathlib import Path

from sftknow_eval.matching import contains_answer
from sftknow_eval.relations import RELATIONS
from sftknow_eval.world.knowledge import EXPOSURE_BANDS, exposure_band
from sftknow_eval.world.shipped import load_all_facts, manifest, model_path, world_dir


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def describe_world(path: str | Path | None = None, sample: int = 8, seed: int = 0,
                   as_json: bool = False) -> str:
    """Counts, sizes, measurements and ``sample`` facts with the base model's greedy answer."""
    folder = world_dir(path)
    info = manifest(folder)
    if as_json:
        return json.dumps(info, indent=2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftknow_eval.generation import greedy_complete

    lines = [
        f"tiny world at {folder} (seed {info['seed']}, {folder_megabytes(folder):.1f} MB on disk)",
        "facts: " + ", ".join(f"{name} {count}" for name, count in info["counts"].items()),
        f"corpus: {info['corpus']['sentences']} sentences, {info['corpus']['tokens']} tokens",
        f"model: Llama, {info['model']['parameters']:,} parameters, "
        f"vocabulary {info['model']['vocabulary']}",
    ]
    bands = info.get("measurements", {}).get("greedy_template_success_by_exposure")
    if bands:
        lines.append("greedy template completion by corpus exposure: " + ", ".join(
            f"{band}: {bands[band]['rate']:.0%} ({bands[band]['facts']} facts)"
            for band in EXPOSURE_BANDS if band in bands))
    extraction = info.get("measurements", {}).get("extraction")
    if extraction:
        lines.append(
            f"after SFT on {extraction['sft_pairs']} QA pairs: frequent in-domain "
            f"{extraction['frequent_in_domain_test_accuracy']:.0%}, frequent out-of-domain "
            f"{extraction['frequent_out_of_domain_accuracy']:.0%}, absent from corpus "
            f"{extraction['absent_test_accuracy']:.0%}"
        )
    if sample > 0:
        facts = load_all_facts(folder)
        rng = random.Random(seed)
        by_band: dict[str, list] = {band: [] for band in EXPOSURE_BANDS}
        for fact in facts:
            by_band[exposure_band(int(fact.meta.get("exposure", 0)))].append(fact)
        chosen = []
        while len(chosen) < sample and any(by_band.values()):
            for band in EXPOSURE_BANDS:
                if by_band[band] and len(chosen) < sample:
                    chosen.append(by_band[band].pop(rng.randrange(len(by_band[band]))))
        model_dir = model_path(folder)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        prompts = [RELATIONS[f.relation].mapping_templates[0].format(subject=f.subject)
                   for f in chosen]
        answers = greedy_complete(model, tokenizer, prompts)
        lines.append("sample (base model, greedy, first mapping template):")
        for fact, prompt, answer in zip(chosen, prompts, answers, strict=True):
            verdict = "knows" if contains_answer(answer, fact.aliases) else "does not know"
            lines.append(f"  [{verdict:>13}] seen {fact.meta.get('exposure', 0):>2}x  "
                         f"{prompt} -> {answer!r} (truth: {fact.object})")
    return "\n".join(lines)
