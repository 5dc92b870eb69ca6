"""The model card (README.md) of a restored variant, built with huggingface_hub's card objects."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData


def build_card(*, variant: str, base: dict[str, object], tuned: dict[str, object],
               settings: dict[str, object], summary: dict[str, object]) -> ModelCard:
    """A card recording base and tuned models (with revisions), region, strategy, k, seed, counts.

    ``base_model`` lists the fine-tuned model first, then the base; the relation is ``merge``
    because every weight comes from one of the two.
    """
    sources = [str(tuned["source"]), str(base["source"])]
    restore_fields = {
        "variant": variant,
        "base": base,
        "tuned": tuned,
        **settings,
        "region_elements": summary["region_elements"],
        "restored_elements": summary["restored_elements"],
        "threshold_r": summary["threshold_r"],
        "concentration": summary["concentration"],
    }
    data = ModelCardData(
        base_model=sources,
        base_model_relation="merge",
        library_name="transformers",
        tags=["sftknow-eval", "parameter-restoration", f"restore-{settings['strategy']}"],
        restore=restore_fields,
    )
    k = settings.get("k")
    size = "largest" if settings["strategy"] == "top" else "smallest"
    what = (f"the {k}% of elements with the {size} relative change"
            if settings["strategy"] in ("top", "bottom") and k is not None
            else f"a seeded random {k}% of elements (seed {settings.get('seed')})"
            if settings["strategy"] == "random"
            else f"every element of layers {settings.get('layers')}")
    modules = summary.get("per_module") or {}
    module_lines = "\n".join(f"| {m} | {share:.1%} |" for m, share in modules.items())
    concentration = summary["concentration"]
    shown = "-" if concentration is None else f"{concentration:.4f}"
    body = f"""
# {variant}: {tuned['source']} with part of its fine-tuning undone

Made by `sftknow-eval restore` (parameter restoration, Ye et al., EMNLP 2025): in the region
`{settings['region']}`, {what} were reset from the fine-tuned model to the base model.
Relative change is r = |tuned - base| / (|base| + 1e-8), in float32.

| | |
|---|---|
| fine-tuned model | `{tuned['source']}` @ `{tuned.get('revision') or 'local'}` |
| base model | `{base['source']}` @ `{base.get('revision') or 'local'}` |
| region | `{settings['region']}` |
| strategy | {settings['strategy']} |
| k (%) | {k if k is not None else '-'} |
| seed | {settings.get('seed')} |
| region elements | {summary['region_elements']:,} |
| restored elements | {summary['restored_elements']:,} |
| threshold r | {summary['threshold_r'] if summary['threshold_r'] is not None else '-'} |
| concentration (share of summed r in the top k%) | {shown} |

Restored elements per module:

| module | share |
|---|---|
{module_lines}

Full statistics: `restore_stats.json` and `restore_stats.tsv` in this repository.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
