"""The dataset card of an annotated probe folder (huggingface_hub DatasetCard objects)."""

from __future__ import annotations

from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from sftknow_eval.probe.categories import CATEGORIES, SLICK, YE2025
from sftknow_eval.relations import RELATIONS

SCHEME_TEXT = {
    YE2025: (
        "Ye et al. (EMNLP 2025): every mapping template of the fact's relation (a declarative "
        "completion prefix such as \"{subject} is located in\") is completed several times by "
        "sampling; a sample is correct when it contains the object or an alias (word-boundary "
        "containment after normalisation, synonym table applied). R = correct / (templates x "
        "samples). D0 when R = 0; D_i when (i-1)/4 < R <= i/4."
    ),
    SLICK: (
        "SliCK (Gekhman et al. 2024): several few-shot QA prompts per fact, each with "
        "exemplars drawn from other facts of the same relation, answered greedily and by "
        "sampling. HighlyKnown: every greedy answer is correct; MaybeKnown: some are; "
        "WeaklyKnown: none is, but some sample is; Unknown: neither."
    ),
}


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def card_data(config: dict[str, Any]) -> DatasetCardData:
    """Card metadata: tags, size, and one loadable config whose splits are the fact files."""
    files = config.get("files", {})
    return DatasetCardData(
        language="en",
        task_categories=["question-answering"],
        size_categories=size_category(int(config["facts"])),
        pretty_name=f"Knowledge mastery of {config['model_key']} ({config['scheme']})",
        tags=["sftknow-eval", "knowledge-probing", f"mastery-{config['scheme']}"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": split, "path": path} for split, path in files.items()]}],
    )


def _counts_table(config: dict[str, Any]) -> list[str]:
    names = list(CATEGORIES[config["scheme"]])
    lines = ["| split / domain | " + " | ".join(names) + " | total |",
             "|---|" + "---:|" * (len(names) + 1)]
    for part, row in config.get("counts", {}).items():
        values = [row.get(name, 0) for name in names]
        lines.append(f"| {part} | " + " | ".join(map(str, values)) + f" | {sum(row.values())} |")
    return lines


def _templates_section(config: dict[str, Any]) -> list[str]:
    used = config.get("templates_used") or {}
    if not used:
        return []
    lines = ["## Mapping templates", "",
             "The first templates of each relation in `sftknow_eval.relations` "
             "(`{subject}` is the fact's subject):", ""]
    for pid, count in used.items():
        relation = RELATIONS[pid]
        shown = "; ".join(f"`{t}`" for t in relation.templates(count))
        lines.append(f"- **{pid}** ({relation.label}, {count}): {shown}")
    return lines + [""]


def card_body(config: dict[str, Any]) -> str:
    settings = config["settings"]
    scheme = config["scheme"]
    revision = config.get("model_revision") or "unknown (a local folder, or no Hub access)"
    sampling = [
        f"- samples per prompt: {settings['samples']}, temperature {settings['temperature']}, "
        f"at most {settings['max_new_tokens']} new tokens, cut at {settings['until']!r}",
        f"- seed: {settings['seed']}; backend: lm-eval `{config['model']}` "
        f"(`{config['model_args']}`), batch size {config.get('batch_size')}",
    ]
    if settings.get("gen_kwargs"):
        sampling.append(f"- extra generation kwargs: `{settings['gen_kwargs']}`")
    if config.get("model_generation_config"):
        sampling.append(f"- the model's own generation defaults: `{config['model_generation_config']}`")
    if scheme == SLICK:
        sampling.append(f"- few-shot: {settings['shots']} exemplars, {settings['fewshot_sets']} "
                        "exemplar sets per fact, each answered greedily and sampled")
    lines = [
        f"# Knowledge mastery of `{config['model_key']}`",
        "",
        "Every fact annotated with how well the base model already knows it, written by "
        "`sftknow-eval probe`, the mastery probe of the sftknow-eval package (described in its "
        "docs/METHOD.md, section 2). Load it with "
        "`sftknow_eval.probe.annotated.load_annotated(folder)` or `datasets.load_dataset(repo)`; "
        f"each row's `mastery[\"{config['model_key']}\"]` holds the score and category.",
        "",
        "## Base model",
        "",
        f"- model: `{config['model_key']}` (lm-eval args `{config['model_args']}`)",
        f"- revision: `{revision}`",
        "",
        f"## Scheme: `{scheme}`",
        "",
        SCHEME_TEXT[scheme],
        "",
        "## Sampling",
        "",
        *sampling,
        "",
        "## Category counts per split",
        "",
        *_counts_table(config),
        "",
        *_templates_section(config),
        "## Provenance",
        "",
        f"- facts: {config['facts']} from `{config.get('facts_source')}` "
        f"(fingerprint `{config['facts_fingerprint'][:16]}`)",
        f"- run id `{config['run_id']}`, finished {config.get('finished_at')}",
        "- library versions: " + ", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items()),
        "",
    ]
    return "\n".join(lines)


def build_card(config: dict[str, Any]) -> DatasetCard:
    """The dataset card for a finished probe config (``probe_config.json``)."""
    content = f"---\n{card_data(config).to_yaml()}\n---\n\n{card_body(config)}"
    return DatasetCard(content)
