"""What a study spec names, checked before any cell runs (dry run and real run alike): the base
model, the SFT recipe with its overrides, the accelerate config, the facts to probe, the
annotations, the pools the grid draws from and the dev split k is chosen on.

``spec.validate`` checks the values on their own; this module opens what they point at, without
loading a model or running anything: a local model's config and safetensors headers, the recipe
through TRL's parser, the annotated fact files. A Hub model id is checked for its form only (a
dry run works offline), and facts the study probes itself have no categories yet, so their
pools are checked when the probe cell has run (by select).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from sftknow_eval.errors import UserError
from sftknow_eval.facts import Fact
from sftknow_eval.study.spec import SHIPPED, StudySpec

logger = logging.getLogger(__name__)


def check_inputs(spec: StudySpec) -> None:
    """Every problem found, in one UserError naming the spec and each key at fault."""
    problems: list[str] = []
    base = _check_model(spec, problems)
    _check_recipe(spec, base, problems)
    _check_launcher(spec, problems)
    _check_facts(spec, problems)
    _check_annotations(spec, problems)
    _check_push(spec, problems)
    if problems:
        where = spec.source or "study spec"
        if len(problems) == 1:
            raise UserError(f"{where}: {problems[0]}")
        raise UserError(f"{where}: {len(problems)} problems:\n  " + "\n  ".join(problems))


def _check_model(spec: StudySpec, problems: list[str]) -> str | None:
    """The base model as the stages will name it, or None when it cannot be used."""
    from sftknow_eval import hub

    path = spec.model.path
    if path == SHIPPED:
        from sftknow_eval.world.shipped import model_path

        return str(model_path())
    try:
        local = hub._local_folder(path)  # a missing path fails here
        if local is None:
            hub.validate_repo_id(path)  # a Hub id: its form only (no network in a dry run)
        else:
            hub.check_model(local)  # config and safetensors headers: a causal LM
    except UserError as error:
        problems.append(f"model.path: {error}")
        return None
    return path


def _check_recipe(spec: StudySpec, base: str | None, problems: list[str]) -> None:
    """The recipe parsed by TRL with the overrides the train cells pass (unknown keys and bad
    values are refused there)."""
    from sftknow_eval.train.recipes import find_recipe, load_recipe

    train = spec.train
    try:
        find_recipe(train.recipe)
    except UserError as error:
        problems.append(f"train.recipe: {error}")
        return
    overrides = {**train.overrides, "seed": spec.grid.seeds[0]}
    if base is not None:
        overrides["model_name_or_path"] = base
    try:
        load_recipe(train.recipe, overrides)
    except UserError as error:
        problems.append(f"train.overrides: {error}" if str(error).startswith("override")
                        else f"train.recipe: {error}")


def _check_launcher(spec: StudySpec, problems: list[str]) -> None:
    """The accelerate config the train cells launch with, by path or shipped name."""
    from sftknow_eval.recipe_files import find_accelerate_config

    if spec.train.launcher == "accelerate" and spec.train.accelerate_config:
        try:
            find_accelerate_config(spec.train.accelerate_config)
        except UserError as error:
            problems.append(f"train.accelerate_config: {error}")


def _check_facts(spec: StudySpec, problems: list[str]) -> None:
    """The fact sources the study probes itself: each a local file or folder, or a Hub dataset
    id (its form only; offline, a source that is not local cannot be read at all)."""
    from sftknow_eval import hub
    from sftknow_eval.readers import EQ_HINT

    if spec.probe.annotated is not None:
        return
    for source in spec.probe.facts:
        if source == SHIPPED or Path(source).exists():
            continue
        try:
            hub.validate_repo_id(source, require_namespace=True)
        except UserError:
            problems.append(f"probe.facts: {source}: no such file or folder; {EQ_HINT}")
            continue
        if hub.is_offline():
            problems.append(f"probe.facts: {source}: no such file or folder, and HF_HUB_OFFLINE is "
                            f"set, so it cannot be read as a Hub dataset id either; {EQ_HINT}")
        else:
            logger.warning("probe.facts: %s is not a local file or folder; the probe cell will "
                           "read it as a Hub dataset id", source)


def _check_annotations(spec: StudySpec, problems: list[str]) -> None:
    """Existing annotations: their model key and scheme, and enough facts for every grid cell
    (select's pool), for KL and for each evaluated split."""
    from sftknow_eval.probe.annotated import load_annotated, shipped_annotated
    from sftknow_eval.select.sets import training_pool

    probe, grid = spec.probe, spec.grid
    if probe.annotated is None:
        return  # probed by the study itself: categories exist only once the probe cell ran
    try:
        folder = shipped_annotated() if probe.annotated == SHIPPED else Path(probe.annotated)
        facts, key, scheme = load_annotated(folder)
    except UserError as error:
        problems.append(f"probe.annotated: {error}")
        return
    if key != spec.model.key:
        problems.append(f"model.key: {spec.model.key!r}, but {folder} holds mastery for {key!r}")
        return
    if scheme != probe.scheme:
        problems.append(f"probe.scheme: {probe.scheme!r}, but {folder} holds {scheme} categories")
        return
    pool = Counter(fact.category(key) for fact in training_pool(facts, grid.split))
    for category in grid.categories:
        available = pool[category]
        if available == 0:
            problems.append(f"grid.categories: {category} has no facts in the {grid.split!r} "
                            f"pool of {folder}")
            continue
        too_large = [size for size in grid.sizes if size != "all" and int(size) > available]
        if too_large and not grid.allow_smaller:
            problems.append(
                f"grid.sizes: {', '.join(map(str, too_large))} > the {available} {category} "
                f"facts in the {grid.split!r} pool of {folder}; use smaller sizes or set "
                "grid.allow_smaller: true")
    splits = Counter(fact.split for fact in facts)
    missing = [split for split in spec.eval.splits if not splits[split]]
    if missing:
        problems.append(f"eval.splits: no facts of split {', '.join(missing)} in {folder} "
                        f"(splits: {', '.join(sorted(splits))})")
    if spec.kl.enabled and not any(f.split == "test" and f.category(key) == spec.kl.category
                                   for f in facts):
        problems.append(f"kl.category: no test facts in category {spec.kl.category} in {folder}")
    _check_choose_split(spec, facts, folder, problems)


def _check_choose_split(spec: StudySpec, facts: list[Fact], folder: Path, problems: list[str]) -> None:
    """The split k is chosen on (restore.choose_on): present in the annotations, and sharing no
    fact (by id, or by relation and subject) with the pool the SFT sets are drawn from."""
    from sftknow_eval.select.sets import training_pool

    split = spec.restore.choose_on if spec.restore else None
    if split is None:
        return
    dev = [fact for fact in facts if fact.split == split]
    if not dev:
        found = ", ".join(sorted({fact.split for fact in facts}))
        problems.append(f"restore.choose_on: no facts of split {split} in {folder} (splits: "
                        f"{found}); probe the dev facts with the others, or set "
                        "restore.choose_on: null")
        return
    pool = training_pool(facts, spec.grid.split)
    ids = {fact.id for fact in pool}
    keys = {(fact.relation, fact.subject) for fact in pool}
    shared = sorted(fact.id for fact in dev if fact.id in ids or (fact.relation, fact.subject) in keys)
    if shared:
        shown = ", ".join(shared[:5]) + (" ..." if len(shared) > 5 else "")
        problems.append(f"restore.choose_on: {len(shared)} {split} fact(s) of {folder} are also in "
                        f"the {spec.grid.split!r} pool SFT sets are drawn from ({shown}); k must "
                        "be chosen on facts no fine-tune can have seen")


def _check_push(spec: StudySpec, problems: list[str]) -> None:
    """The form of the repo ids models are pushed to (a token and the repos themselves are
    checked by train and restore before their work)."""
    from sftknow_eval import hub

    if spec.push.org is None:
        return
    try:
        hub.validate_repo_id(f"{spec.push.org}/{spec.name}-model", require_namespace=True)
    except UserError as error:
        problems.append(f"push.org: {error}")
