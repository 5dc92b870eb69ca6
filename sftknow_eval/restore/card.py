"""The model card (README.md) of a restored variant, built with huggingface_hub's card objects."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from sftknow_eval.lineage import HubOrigin, hub_origin


def _origin(model: dict[str, object]) -> HubOrigin | None:
    return hub_origin(str(model["source"]), str(model["revision"]) if model.get("revision") else None)


def _label(model: dict[str, object], origin: HubOrigin | None) -> str:
    if origin is None:
        return f"the local folder `{model['source']}`"
    if str(model["source"]) != origin.repo_id:
        return f"{origin.markdown()} (read from the local copy `{model['source']}`)"
    return origin.markdown()


def build_card(*, variant: str, base: dict[str, object], tuned: dict[str, object],
               settings: dict[str, object], summary: dict[str, object]) -> ModelCard:
    """A card recording base and tuned models (with revisions), region, strategy, k, seed, counts.

    The parent of a restored model is the fine-tuned model: ``base_model`` (with
    ``base_model_revision``) is its Hub id when it came from the Hub or a local folder that
    records its Hub repo (``lineage.hub_origin``), and is left out otherwise; a local path is
    never put in the metadata. The base model, whose weights part of it returns to, is named
    in the text (and by Hub id, when it has one, under ``restore.base``). No
    ``base_model_relation`` is set: the Hub's values (adapter, merge, quantized, finetune)
    have none for a partial revert to a grandparent, and ``merge`` needs several parents.
    """
    tuned_origin, base_origin = _origin(tuned), _origin(base)
    restore_fields = {
        "variant": variant,
        **{side: {"hub_id": o.repo_id if o else None, "revision": o.revision if o else None}
           for side, o in (("base", base_origin), ("tuned", tuned_origin))},
        **settings,
        **{key: summary[key] for key in ("region_elements", "restored_elements", "threshold_r",
                                         "concentration")},
    }
    data = ModelCardData(
        base_model=tuned_origin.repo_id if tuned_origin else None,
        base_model_revision=tuned_origin.revision if tuned_origin else None,
        library_name="transformers",
        tags=["sftknow-eval", "parameter-restoration", f"restore-{settings['strategy']}"],
        restore=restore_fields,
    )
    tuned_name = tuned_origin.repo_id if tuned_origin else tuned["source"]
    body = _body(variant, f"{_label(tuned, tuned_origin)} and its base model "
                 f"{_label(base, base_origin)}", str(tuned_name), base, tuned, settings, summary)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _body(variant: str, parents: str, tuned_name: str, base: dict[str, object],
          tuned: dict[str, object], settings: dict[str, object], summary: dict[str, object]) -> str:
    """The card's text: what was reset, from which models, and the counts."""
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
    return f"""
# {variant}: {tuned_name} with part of its fine-tuning undone

Made by `sftknow-eval restore` (parameter restoration, Ye et al., EMNLP 2025) from the
fine-tuned model {parents}:
in the region `{settings['region']}`, {what} were reset from the fine-tuned model to the base
model. Relative change is r = |tuned - base| / (|base| + 1e-8), in float32.

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

