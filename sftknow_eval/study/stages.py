"""What each study cell does: a thin call into the stage module that owns the work (probe,
select, train, lm-eval, analysis, restore); no stage is implemented here.

Every function gets the cell, the study context and a staging folder (renamed into place by
the runner when the function returns) and returns a small JSON-able summary for ``cell.json``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftknow_eval.errors import UserError
from sftknow_eval.study.plan import BASE, Cell, choose_family, restored_name
from sftknow_eval.study.spec import SHIPPED, StudySpec

logger = logging.getLogger(__name__)

RESULTS_FILE = "results_study.json"  # lm-eval's results schema (``results_*.json``)


@dataclass
class Context:
    """The study being run and what cells share within one process."""

    spec: StudySpec
    run_dir: Path
    cache: dict[str, Any] = field(default_factory=dict)

    def cell_dir(self, cell_id: str) -> Path:
        return self.run_dir / cell_id

    def base_model(self) -> str:
        if self.spec.model.path == SHIPPED:
            from sftknow_eval.world.shipped import model_path

            return str(model_path())
        return self.spec.model.path

    def annotated(self) -> Path:
        return Path(json.loads((self.cell_dir("probe/annotations") / "cell.json")
                               .read_text(encoding="utf-8"))["outputs"]["annotated"])

    def family_dir(self, family: str | None = None) -> Path:
        """The folder of a task family the study wrote (default: the eval family)."""
        return self.cell_dir(f"tasks/{family or self.spec.eval.family}") / "family"

    def model_dir(self, name: str) -> Path:
        """The model folder of a cell name: the base, a fine-tuned or a restored model."""
        if name == BASE:
            return Path(self.base_model())
        if self.spec.restore is not None and "-" in name:  # <model>-<strategy><k>
            record = self.run_dir / "restore" / name.rsplit("-", 1)[0] / "cell.json"
            if record.is_file():
                models = json.loads(record.read_text())["outputs"].get("models", {})
                if name in models:
                    return Path(models[name])
        return self.cell_dir(f"train/{name}") / "model"


def _resolve_facts(source: str) -> list[Any]:
    from sftknow_eval.readers import load_facts
    from sftknow_eval.world.shipped import load_all_facts

    return load_all_facts() if source == SHIPPED else load_facts(source)


def run_probe(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    """Point at existing annotations, or probe the facts with the base model."""
    probe = ctx.spec.probe
    if probe.annotated is not None:
        from sftknow_eval.probe.annotated import load_annotated, shipped_annotated

        folder = shipped_annotated() if probe.annotated == SHIPPED else Path(probe.annotated)
        facts, model_key, scheme = load_annotated(folder)
        if model_key != ctx.spec.model.key:
            raise UserError(f"{folder} holds mastery for {model_key!r}, the spec's model.key is "
                            f"{ctx.spec.model.key!r}")
        return {"annotated": str(folder.resolve()), "facts": len(facts), "model_key": model_key,
                "scheme": scheme, "probed": False}
    from sftknow_eval.probe.requests import ProbeSettings
    from sftknow_eval.probe.run import ModelSpec, probe_facts

    facts = [fact for source in probe.facts for fact in _resolve_facts(source)]
    model_args = ",".join(a for a in (f"pretrained={ctx.base_model()}", probe.model_args) if a)
    spec = ModelSpec(model=probe.backend, model_args=model_args, batch_size=probe.batch_size,
                     device=probe.device, key=ctx.spec.model.key)
    settings = ProbeSettings(scheme=probe.scheme, templates=probe.templates, samples=probe.samples,
                             temperature=probe.temperature, max_new_tokens=probe.max_new_tokens,
                             seed=probe.seed)
    # The probe keeps its own resumable folder (hours on a real model); it lives beside the
    # cell, so an interrupted study resumes the probe, and is moved in once complete.
    work = ctx.run_dir / "probe" / ".annotations-probe"
    result = probe_facts(facts, spec, work, settings, source=" + ".join(probe.facts),
                         save_dataset=False)
    os.replace(work, staging / "annotated")
    final = ctx.cell_dir(cell.id) / "annotated"
    return {"annotated": str(final.resolve()), "facts": len(result.facts),
            "model_key": result.model_key, "scheme": result.scheme, "probed": True,
            "counts": result.counts}


def run_tasks(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    from sftknow_eval.lm_tasks.family import write_family
    from sftknow_eval.probe.annotated import load_annotated
    from sftknow_eval.probe.categories import CATEGORIES

    facts, model_key, scheme = load_annotated(ctx.annotated())
    family, splits = cell.config["family"], tuple(cell.config["splits"])
    if family == choose_family(ctx.spec) and not any(f.split in splits for f in facts):
        found = ", ".join(sorted({f.split for f in facts}))
        raise UserError(f"restore.choose_on: the annotations hold no facts of split "
                        f"{', '.join(splits)} to choose k on (splits: {found}); probe the dev "
                        "facts too, or set restore.choose_on: null")
    summary = write_family(facts, model_key, scheme, CATEGORIES[scheme], family,
                           staging / "family", splits=splits)
    return {"family": family, "splits": list(splits), "items": summary["items"]}


def run_select(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    from sftknow_eval.select.sets import select_sft_set

    c = cell.config
    rows, meta = select_sft_set(ctx.annotated(), c["category"], c["size"], c["seed"],
                                staging / "train.jsonl", allow_smaller=c["allow_smaller"],
                                split=c["split"])
    return {"data": str(ctx.cell_dir(cell.id) / "train.jsonl"), "size": meta["size"],
            "per_relation": meta["per_relation"]}


def run_train(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    train = ctx.spec.train
    data = ctx.cell_dir(f"select/{cell.name}") / "train.jsonl"
    overrides = {**train.overrides, "model_name_or_path": ctx.base_model(),
                 "seed": cell.config["seed"], "output_dir": str(staging / "trainer")}
    push_to = f"{ctx.spec.push.org}/{ctx.spec.name}-{cell.name}" if ctx.spec.push.org else None
    out = staging / "model"
    if train.launcher == "accelerate":
        # A separate process per cell, the way TRL users launch several GPUs (`accelerate
        # launch`, run through this interpreter so the venv's accelerate is the one used).
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        if train.accelerate_config:
            from sftknow_eval.recipe_files import find_accelerate_config

            command += ["--config_file", str(find_accelerate_config(train.accelerate_config))]
        command += ["-m", "sftknow_eval.cli", "train", "--recipe", train.recipe, "--data",
                    str(data), "--out", str(out)]
        if push_to:
            command += ["--push-to", push_to]
        command += [f"{k}={v}" for k, v in overrides.items()]
        logger.info("launching: %s", " ".join(command))
        subprocess.run(command, check=True)
        run = json.loads((out / "training_run.json").read_text(encoding="utf-8"))
        metrics = run.get("metrics", {})
    else:
        from sftknow_eval.train.sft import train as train_model

        result = train_model(train.recipe, data, out, overrides=overrides, push_to=push_to)
        metrics = result.metrics
    return {"model": str(ctx.cell_dir(cell.id) / "model"), "train_loss": metrics.get("train_loss"),
            "rows": sum(1 for _ in data.open(encoding="utf-8"))}


def _task_manager(ctx: Context, family_dir: Path) -> Any:
    """lm-eval's task index holding ``family_dir`` (None for lm_eval processes): one index per
    process over every family folder the study has written (the eval family and the choose_on
    family), and over nothing else: indexing lm-eval's own task library takes tens of seconds
    on a small CPU, and the study's families need none of it."""
    from sftknow_eval.lm_tasks.evaluate import task_manager

    if ctx.spec.eval.subprocess:
        return None
    families = [ctx.spec.eval.family, choose_family(ctx.spec)]
    folders = tuple(ctx.family_dir(f) for f in families if f and ctx.family_dir(f).is_dir())
    key = folders if family_dir in folders else (family_dir,)
    managers = ctx.cache.setdefault("task_managers", {})
    if key not in managers:
        managers[key] = task_manager(*key)
    return managers[key]


def _eval_settings(ctx: Context) -> Any:
    from sftknow_eval.lm_tasks.evaluate import EvalSettings

    ev = ctx.spec.eval
    return EvalSettings(backend=ev.backend, model_args=ev.model_args, batch_size=ev.batch_size,
                        device=ev.device, limit=ev.limit, subprocess=ev.subprocess)


def run_eval(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    """lm-eval on the study's family: in this process (hf) or as an lm_eval process."""
    from sftknow_eval.lm_tasks.evaluate import evaluate_family

    ev = ctx.spec.eval
    model = ctx.model_dir(cell.name)
    settings = _eval_settings(ctx)
    tasks = _task_manager(ctx, ctx.family_dir())
    score = evaluate_family(model, ctx.family_dir(), ev.family, settings,
                            staging / RESULTS_FILE, tasks=tasks)
    return {"model": str(model), "acc": score.acc, "buckets": score.buckets,
            "items": score.items}


def run_kl(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    from sftknow_eval.analysis.kl import run_kl as kl

    kl_spec = ctx.spec.kl
    summary = kl(ctx.base_model(), str(ctx.model_dir(cell.name)), ctx.annotated(),
                 category=kl_spec.category, out=staging / "kl", full_vocab=kl_spec.full_vocab,
                 batch_size=kl_spec.batch_size)
    return {key: summary.get(key) for key in ("facts", "mean", "median", "per_category")}


def run_updates(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    from sftknow_eval.analysis.updates import run_updates as updates

    stats = updates(ctx.base_model(), str(ctx.model_dir(cell.name)), staging / "updates",
                    region=cell.config["region"], progress=False)
    return {"concentration": stats.get("concentration"),
            "module_shares": stats.get("module_shares"), "layer_shares": stats.get("layer_shares")}


def run_restore(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    """Every k of the spec for one fine-tuned model, in one restore run."""
    from sftknow_eval.restore.pipeline import RestoreConfig, restore, variant_name

    c = cell.config
    push = ctx.spec.push
    push_to = f"{push.org}/{ctx.spec.name}-{cell.name}" if push.org else None
    result = restore(RestoreConfig(base=ctx.base_model(), tuned=str(ctx.model_dir(cell.name)),
                                   out=staging, k=list(c["k"]), region=c["region"],
                                   strategy=c["strategy"], push_to=push_to,
                                   private=push.private, progress=False))
    models = {restored_name(cell.name, c["strategy"], k):
              str(ctx.cell_dir(cell.id) / variant_name(c["strategy"], k)) for k in c["k"]}
    return {"tuned": cell.name, "k": c["k"], "models": models, "pushed": result.pushed}


def run_choose(cell: Cell, ctx: Context, staging: Path) -> dict[str, Any]:
    """k chosen on dev for one fine-tuned model: it (k = 0) and the variants its restore cell
    wrote, scored on the choose_on family with the eval settings, picked by choose_k's rule;
    ``choice.json`` as ``restore --choose-on`` writes it. No test data is read."""
    from sftknow_eval.choose_k import CHOICE_FILE, UNRESTORED, refuse_overlap, score_and_pick, write_choice
    from sftknow_eval.restore.pipeline import variant_name

    c = cell.config
    family_dir = ctx.family_dir(c["family"])
    tuned = ctx.model_dir(cell.name)
    refuse_overlap(family_dir, str(tuned))
    models: list[tuple[str, float, str | Path]] = [(UNRESTORED, 0.0, tuned)]
    for k in sorted(c["k"]):
        models.append((variant_name(c["strategy"], k),
                       k, ctx.model_dir(restored_name(cell.name, c["strategy"], k))))
    choice = score_and_pick(models, family_dir, c["family"], _eval_settings(ctx),
                            staging / "dev_eval", tasks=_task_manager(ctx, family_dir))
    write_choice(staging / CHOICE_FILE, choice)
    chosen = (restored_name(cell.name, c["strategy"], choice.chosen.k) if choice.restored
              else cell.name)
    return {"tuned": cell.name, "chosen": choice.chosen.name, "chosen_k": choice.chosen.k,
            "chosen_model": chosen, "restored": choice.restored, "domain": choice.domain,
            "dev_acc": {cand.name: cand.acc for cand in choice.candidates},
            "choice": str(ctx.cell_dir(cell.id) / CHOICE_FILE)}


RUNNERS = {"probe": run_probe, "tasks": run_tasks, "select": run_select, "train": run_train,
           "eval": run_eval, "kl": run_kl, "updates": run_updates, "restore": run_restore,
           "choose": run_choose}
