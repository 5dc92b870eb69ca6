"""Choosing k on held-out dev data: restore every k in one run, score the unrestored fine-tune
(k = 0) and each variant on a dev task family with lm-eval, and keep the best.

The paper picks k by looking at test accuracy; here the choice sees only dev facts, which must
not overlap the fine-tune's training set. ``pick`` is the rule (highest macro Acc, ties to the
smaller k), ``score_and_pick`` scores candidates already on disk (the study's choose cells use
it), ``restore_and_choose`` the whole run: ``choice.json`` with every candidate's
per-bucket dev scores, a card section on the chosen variant, and pushes (the chosen variant, or
every one with ``push_all``; nothing restored when no k beats k = 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sftknow_eval.errors import UserError
from sftknow_eval.lm_tasks.evaluate import EvalSettings, check_backend, evaluate_family, task_manager
from sftknow_eval.restore.pipeline import DEFAULT_K, RestoreConfig, restore, variant_name

logger = logging.getLogger(__name__)

CHOICE_FILE = "choice.json"
DEV_FAMILY = "dev_family"  # the family written from annotated dev facts, inside --out
DEV_FAMILY_NAME = "sftknow_dev"
RULE = ("highest macro Acc on the dev split (the unweighted mean over its mastery buckets, "
        "in-domain when the family has in-domain buckets); ties go to the smaller k; k = 0 is "
        "the unrestored fine-tune")
UNRESTORED = "tuned"


@dataclass
class Candidate:
    """One model the choice considers: the fine-tune (k = 0) or one restored variant."""

    name: str  # "tuned" or the variant, e.g. "top5"
    k: float
    model: str
    acc: float | None  # the choice metric (macro Acc of the chosen domain), None if absent
    acc_by_domain: dict[str, float | None] = field(default_factory=dict)
    buckets: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass
class Choice:
    """The outcome: every candidate, the chosen one, and how it was chosen."""

    chosen: Candidate
    candidates: list[Candidate]
    domain: str  # "id" or "ood": whose macro Acc decided
    family: str
    family_dir: str
    rule: str = RULE
    pushed: dict[str, str] = field(default_factory=dict)  # variant -> commit URL

    @property
    def restored(self) -> bool:
        """False when no k beat the unrestored fine-tune."""
        return self.chosen.k > 0

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen.name, "chosen_k": self.chosen.k, "restored": self.restored,
                "rule": self.rule, "domain": self.domain, "family": self.family,
                "family_dir": self.family_dir, "pushed": self.pushed,
                "candidates": [asdict(candidate) for candidate in self.candidates]}

    def table(self) -> str:
        """A Markdown table: one row per candidate, dev accuracy per bucket and Acc (percent)."""
        buckets = sorted({b for c in self.candidates for b in c.buckets.get(self.domain, {})})
        rows = ["| model | k | " + " | ".join(buckets) + " | Acc | |",
                "|---|---|" + "---|" * len(buckets) + "---|---|"]
        for c in self.candidates:
            cells = [_percent(c.buckets.get(self.domain, {}).get(b)) for b in buckets]
            mark = "chosen" if c is self.chosen else ""
            rows.append(f"| {c.name} | {c.k:g} | " + " | ".join(cells)
                        + f" | {_percent(c.acc)} | {mark} |")
        return "\n".join(rows)


def _percent(value: float | None) -> str:
    return "absent" if value is None else f"{100 * value:.2f}"


def pick(candidates: Sequence[Candidate]) -> Candidate:
    """The rule: the highest ``acc``; among equals the smallest k (k = 0, no restoration, wins
    every tie it is in). Candidates without a score are not considered."""
    scored = [c for c in candidates if c.acc is not None]
    if not scored:
        raise UserError("no candidate has a dev score: the dev family's buckets are all empty")
    return min(scored, key=lambda c: (-c.acc, c.k))


# -- the dev family --------------------------------------------------------------------------


def dev_family(choose_on: str | os.PathLike[str], out: Path) -> tuple[Path, str]:
    """The dev task family to score on: a folder written by ``tasks write`` (with its
    ``family.json``), or annotated facts whose ``dev`` split is written as a family into
    ``out/dev_family``. A family with no dev item at all is refused."""
    folder = Path(choose_on)
    if (folder / "family.json").is_file():
        name = json.loads((folder / "family.json").read_text(encoding="utf-8"))["family"]
    else:
        from sftknow_eval.lm_tasks.family import write_family
        from sftknow_eval.probe.annotated import load_annotated, resolve_annotated
        from sftknow_eval.probe.categories import CATEGORIES

        facts, model_key, scheme = load_annotated(resolve_annotated(str(choose_on)))
        if not any(f.split == "dev" for f in facts):
            splits = ", ".join(sorted({f.split for f in facts}))
            raise UserError(f"--choose-on {choose_on}: no facts of split dev (splits: {splits}); "
                            "probe the dev split, or give a dev task family folder")
        folder, name = out / DEV_FAMILY, DEV_FAMILY_NAME
        write_family(facts, model_key, scheme, CATEGORIES[scheme], name, folder, splits=("dev",),
                     force=True)
    items = json.loads((folder / "family.json").read_text(encoding="utf-8")).get("items", {})
    if not any(count for counts in items.values() for count in counts.values()):
        raise UserError(f"--choose-on {choose_on}: every bucket of the dev family {name} is empty")
    return folder, name


def _family_ids(folder: Path) -> set[str]:
    ids: set[str] = set()
    for data in sorted((folder / "data").glob("*.jsonl")):
        with data.open(encoding="utf-8") as handle:
            ids.update(str(json.loads(line)["id"]) for line in handle if line.strip())
    return ids


def _training_ids(tuned: str) -> set[str] | None:
    """The fact ids of the set a local ``train`` output was trained on (None when unknown)."""
    run_file = Path(tuned) / "training_run.json"
    if not run_file.is_file():
        return None
    data = Path(json.loads(run_file.read_text(encoding="utf-8")).get("data", {}).get("file", ""))
    if not data.is_file():
        return None
    with data.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {str(row["id"]) for row in rows if "id" in row}


def refuse_overlap(family_dir: Path, tuned: str) -> None:
    """A dev family sharing facts with the fine-tune's training set would reward memorised
    answers: refused, naming some shared ids. Unknown training data gets a warning."""
    trained = _training_ids(tuned)
    if trained is None:
        logger.warning("cannot check that the dev facts are disjoint from %s's training set (no "
                       "local training_run.json with its data file)", tuned)
        return
    shared = sorted(_family_ids(family_dir) & trained)
    if shared:
        shown = ", ".join(shared[:5]) + (" ..." if len(shared) > 5 else "")
        raise UserError(f"the dev family {family_dir} shares {len(shared)} fact(s) with the "
                        f"training set of {tuned} ({shown}): choose on facts it never saw")


# -- the run ---------------------------------------------------------------------------------


def _score(name: str, k: float, model: Path | str, family_dir: Path, family: str,
           settings: EvalSettings, results: Path, tasks: Any) -> Candidate:
    scores = evaluate_family(model, family_dir, family, settings, results, tasks=tasks)
    return Candidate(name=name, k=k, model=str(model), acc=None, acc_by_domain=dict(scores.acc),
                     buckets={d: dict(b) for d, b in scores.buckets.items()})


def restore_and_choose(config: RestoreConfig, choose_on: str | os.PathLike[str],
                       settings: EvalSettings | None = None, *, push_all: bool = False) -> Choice:
    """Restore every k of ``config`` in one run, score ``tuned`` and each variant on the dev
    family with lm-eval, pick by :data:`RULE`, write ``<out>/choice.json`` and the chosen
    variant's card section, then push (``config.push_to``: the chosen variant, or all with
    ``push_all``; nothing restored is pushed when k = 0 wins). Returns the choice."""
    from sftknow_eval import hub

    settings = settings or EvalSettings()
    check_backend(settings.backend)
    if config.layers:
        raise UserError("--choose-on chooses a k: it does not combine with --layers")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    family_dir, family = dev_family(choose_on, out)
    refuse_overlap(family_dir, config.tuned)
    ks = sorted(config.k or DEFAULT_K)
    if config.push_to:  # every variant could be chosen: check them all before any work
        for k in ks:
            hub.check_push_target(f"{config.push_to}-{variant_name(config.strategy, k)}",
                                  overwrite=config.overwrite)
    result = restore(replace(config, push_to=None, k=ks))

    tuned = hub.resolve_model(config.tuned, config.tuned_revision)
    models: list[tuple[str, float, str | Path]] = [(UNRESTORED, 0.0, tuned)]
    for k in ks:
        name = variant_name(config.strategy, k)
        models.append((name, k, result.folders[name]))
    choice = score_and_pick(models, family_dir, family, settings, out / "dev_eval")
    write_choice(out / CHOICE_FILE, choice)
    if choice.restored:
        _card_choice(Path(result.folders[choice.chosen.name]), choice)
    choice.pushed = _push(config, result.folders, choice, push_all)
    if choice.pushed:
        write_choice(out / CHOICE_FILE, choice)
    return choice


def score_and_pick(models: Sequence[tuple[str, float, str | Path]], family_dir: Path, family: str,
                   settings: EvalSettings, evals: Path, *, tasks: Any = None) -> Choice:
    """Score each ``(name, k, model)`` candidate (k = 0: the unrestored fine-tune) on the dev
    family with lm-eval (lm-eval's results JSON per candidate in ``evals/<name>.json``) and pick
    by :data:`RULE` on the in-domain macro Acc (out-of-domain when the family has no in-domain
    bucket). ``tasks``: a task manager of ``family_dir`` to reuse."""
    if tasks is None and not settings.subprocess:
        tasks = task_manager(family_dir)
    candidates = [_score(name, k, model, family_dir, family, settings, evals / f"{name}.json", tasks)
                  for name, k, model in models]
    domain = "id" if any(c.acc_by_domain.get("id") is not None for c in candidates) else "ood"
    for candidate in candidates:
        candidate.acc = candidate.acc_by_domain.get(domain)
    return Choice(chosen=pick(candidates), candidates=candidates, domain=domain, family=family,
                  family_dir=str(family_dir))


def write_choice(path: Path, choice: Choice) -> None:
    """``choice.json`` (written whole or not at all)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(choice.to_json(), indent=2, allow_nan=False) + "\n",
                       encoding="utf-8")
    os.replace(partial, path)


def _card_choice(folder: Path, choice: Choice) -> None:
    """Record the choice and the dev table in the chosen variant's model card."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    card.data.restore_choice = {"chosen_k": choice.chosen.k, "rule": choice.rule,
                                "dev_family": choice.family, "domain": choice.domain}
    card.text += (
        "\n\n## Chosen on dev data\n\n"
        f"This variant was chosen among the unrestored fine-tune and every restored k by "
        f"{choice.rule}. Dev family `{choice.family}` "
        f"({'in-domain' if choice.domain == 'id' else 'out-of-domain'} buckets, accuracy in %):"
        f"\n\n{choice.table()}\n"
    )
    card.save(folder / "README.md")


def _push(config: RestoreConfig, folders: dict[str, Path], choice: Choice,
          push_all: bool) -> dict[str, str]:
    from sftknow_eval import hub

    if not config.push_to:
        return {}
    names = list(folders) if push_all else ([choice.chosen.name] if choice.restored else [])
    if not names:
        logger.warning("no k beat the unrestored fine-tune on dev: nothing restored is published")
    pushed = {}
    for name in names:
        pushed[name] = hub.push_folder(folders[name], f"{config.push_to}-{name}",
                                       private=config.private, overwrite=config.overwrite,
                                       commit_message=f"sftknow-eval restore --choose-on: {name}")
        logger.info("pushed %s: %s", name, pushed[name])
    return pushed


# -- the command line (restore's --choose-on flags) ------------------------------------------


def add_choose_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``restore`` flags of the dev-data choice."""
    choose = parser.add_argument_group(
        "choosing k on dev data",
        "--choose-on scores the unrestored fine-tune (k = 0) and every variant with lm-eval on "
        "dev facts, keeps the highest macro Acc (ties: the smaller k), writes OUT/choice.json "
        "and a card section, and with --push-to publishes only the chosen variant")
    choose.add_argument("--choose-on", metavar="DEV",
                        help="a dev task family folder (tasks write --splits dev) or annotated "
                             "facts with a dev split (probe output, Hub dataset id)")
    choose.add_argument("--model", dest="eval_backend", default="hf", metavar="BACKEND",
                        help="lm-eval model backend for the dev scores (hf, vllm, ...; default hf)")
    choose.add_argument("--model-args", default="",
                        help="lm-eval model args after pretrained=<model>, e.g. dtype=bfloat16")
    choose.add_argument("--batch-size", default="8", help="lm-eval batch size (default 8)")
    choose.add_argument("--device", default=None, help="lm-eval device (e.g. cpu, cuda)")
    choose.add_argument("--limit", type=float, default=None,
                        help="lm-eval --limit per bucket task (a quick look, not a choice to trust)")
    choose.add_argument("--push-all", action="store_true",
                        help="with --push-to: publish every variant, not only the chosen one")


def run_choose(config: RestoreConfig, args: argparse.Namespace) -> int:
    """``restore --choose-on``: the run, the dev table on the console, what was published."""
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    settings = EvalSettings(backend=args.eval_backend, model_args=args.model_args,
                            batch_size=batch, device=args.device, limit=limit)
    choice = restore_and_choose(config, args.choose_on, settings, push_all=args.push_all)
    print(choice.table())
    if choice.restored:
        print(f"chosen: {choice.chosen.name} ({choice.chosen.model}); {config.out / CHOICE_FILE}")
    else:
        print("no k beats the unrestored fine-tune on the dev split: keep the fine-tune "
              f"(nothing restored is published); {config.out / CHOICE_FILE}")
    for name, url in choice.pushed.items():
        print(f"pushed {name}: {url}")
    return 0
