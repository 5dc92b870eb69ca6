"""The probe run: sample a base model on every fact, score with the shared matcher, categorize,
and write the annotated output folder (resumable, atomic, refusing a folder of another run).

Output folder (``load_annotated`` in ``probe.annotated`` reads it back)::

    facts/<split>.jsonl   the annotated facts, one file per fact split (e.g. train, test),
                          in input order; ``mastery[model_key]`` holds the result
    dataset/              the same facts as one ``datasets.Dataset`` (save_to_disk; mastery
                          and meta as JSON text, plus flat ``category`` and ``score`` columns);
                          left out with ``save_dataset=False`` (the shipped tiny world's, for size)
    README.md             the dataset card (base model, revision, templates, sampling, counts)
    probe_config.json     written last: run config, library versions, counts; its presence
                          (with ``"complete": true``) is what marks the folder finished

While a run is in progress the folder holds only ``.probe-partial/`` (``run.json``: the run's
identity; ``done.jsonl``: one line per finished fact, appended and fsynced per chunk). A rerun
with the same identity resumes from it; a different run is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sftknow_eval.errors import UserError
from sftknow_eval.facts import Fact, write_jsonl
from sftknow_eval.matching import contains_answer
from sftknow_eval.probe.annotated import (
    CARD_FILE,
    CONFIG_FILE,
    DATASET_DIR,
    FACTS_DIR,
    FINAL_TMP_DIR,
    FORMAT,
    PARTIAL_DIR,
    load_annotated,
    read_config,
)
from sftknow_eval.probe.backend import Sampler, derive_seed, generation_settings, load_model
from sftknow_eval.probe.categories import CATEGORIES, SLICK, YE2025, slick_category, ye2025_category
from sftknow_eval.probe.requests import FewShotPrompts, ProbeSettings, check_templates, mapping_prompts
from sftknow_eval.versions import library_versions

logger = logging.getLogger(__name__)

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class ModelSpec:
    """Which model to probe, as lm-eval names it, and how to run it.

    ``batch_size`` and ``device`` are not part of the run's identity (a run may resume on
    another machine); with the hf backend they do decide which random numbers each sample
    gets, so reproducing samples exactly needs the same batch size.
    """

    model: str = "hf"
    model_args: str = ""
    batch_size: int | str = 64
    device: str | None = None
    key: str | None = None

    def pretrained(self) -> str | None:
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(self.model_args)
        value = args.get("pretrained") or args.get("model")
        return str(value) if value else None

    def model_key(self) -> str:
        """The stable name results are filed under: ``key`` if given, else the Hub id, or the
        local folder's name."""
        if self.key:
            return self.key
        pretrained = self.pretrained()
        if not pretrained:
            raise UserError("cannot name the model: give pretrained=... in model_args or a model key")
        path = Path(pretrained).expanduser()
        return path.resolve().name if path.exists() else pretrained


@dataclass
class ProbeResult:
    """A finished probe: the annotated facts and where they were written."""

    facts: list[Fact]
    model_key: str
    scheme: str
    out: Path
    config: dict[str, Any]
    resumed_facts: int = 0
    probed_facts: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def part_name(fact: Fact) -> str:
    """The group a fact is counted in: its split and domain, e.g. ``train/in``, ``test/out``."""
    return f"{fact.split}/{fact.domain}"


def category_counts(facts: Sequence[Fact], model_key: str, scheme: str) -> dict[str, dict[str, int]]:
    """Per part (split/domain), how many facts fall in each category of the scheme."""
    counts: dict[str, Counter[str]] = {}
    for fact in facts:
        counts.setdefault(part_name(fact), Counter())[fact.category(model_key) or "unprobed"] += 1
    ordered: dict[str, dict[str, int]] = {}
    for part in sorted(counts):
        row = {name: counts[part].get(name, 0) for name in CATEGORIES[scheme]}
        if counts[part].get("unprobed"):
            row["unprobed"] = counts[part]["unprobed"]
        ordered[part] = row
    return ordered


def facts_fingerprint(facts: Sequence[Fact]) -> str:
    """Hash of what the probe reads from the facts, in order (mastery and meta excluded)."""
    digest = hashlib.sha256()
    for fact in facts:
        row = [fact.id, fact.relation, fact.subject, fact.object, fact.aliases, fact.question,
               fact.split, fact.domain]
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _identity(facts: Sequence[Fact], spec: ModelSpec, settings: ProbeSettings) -> dict[str, Any]:
    return {
        "model": spec.model,
        "model_args": spec.model_args,
        "model_key": spec.model_key(),
        "settings": settings.to_dict(),
        "facts": len(facts),
        "facts_fingerprint": facts_fingerprint(facts),
    }


def run_id_of(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file in the same folder, then rename)."""
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _describe(config: dict[str, Any]) -> str:
    settings = config.get("settings", {})
    return (f"model {config.get('model_key')!r}, scheme {settings.get('scheme')}, "
            f"{config.get('facts')} facts, run {config.get('run_id')}")


def _check_out_folder(out: Path, run_id: str) -> str:
    """"fresh", "resume" or "complete"; a UserError when ``out`` holds anything else."""
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("run_id") == run_id and config.get("complete"):
            return "complete"
        raise UserError(f"{out} already holds a different probe run ({_describe(config)}); "
                        "choose another --out folder or delete this one")
    run_path = out / PARTIAL_DIR / "run.json"
    if run_path.is_file():
        config = json.loads(run_path.read_text(encoding="utf-8"))
        if config.get("run_id") == run_id:
            return "resume"
        raise UserError(f"{out} holds an unfinished, different probe run ({_describe(config)}); "
                        "rerun that one to finish it, or choose another --out folder")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a folder")
        leftovers = [p.name for p in out.iterdir() if p.name not in (FINAL_TMP_DIR, PARTIAL_DIR)]
        if leftovers:
            raise UserError(f"{out} is not empty and holds no probe run "
                            f"({', '.join(sorted(leftovers)[:5])}); choose an empty or new folder")
    return "fresh"


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Finished facts of an interrupted run; a torn last line (crash mid-write) is dropped."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("dropping a torn line in %s", path)
                continue
            done[row["id"]] = row["mastery"]
    return done


def _score_ye2025(fact: Fact, outputs: list[list[str]], samples: int) -> dict[str, Any]:
    answers = fact.answers()
    per_template = [sum(contains_answer(text, answers) for text in texts) for texts in outputs]
    correct, total = sum(per_template), len(per_template) * samples
    return {"scheme": YE2025, "score": correct / total, "category": ye2025_category(correct, total),
            "correct": correct, "samples": total, "templates": len(per_template),
            "samples_per_template": samples, "per_template": per_template}


def _score_slick(fact: Fact, greedy: list[list[str]], sampled: list[list[str]],
                 samples: int, shots: int) -> dict[str, Any]:
    answers = fact.answers()
    greedy_correct = sum(contains_answer(texts[0], answers) for texts in greedy)
    sampled_correct = sum(contains_answer(t, answers) for texts in sampled for t in texts)
    sets = len(greedy)
    return {"scheme": SLICK, "score": greedy_correct / sets,
            "category": slick_category(greedy_correct, sets, sampled_correct),
            "greedy_correct": greedy_correct, "greedy": sets,
            "score_sampled": sampled_correct / (sets * samples),
            "correct": sampled_correct, "samples": sets * samples,
            "fewshot_sets": sets, "shots": shots}


def _probe_chunk(sampler: Sampler, chunk: Sequence[Fact], settings: ProbeSettings, seed: int,
                 fewshot: FewShotPrompts | None) -> list[dict[str, Any]]:
    """Mastery records for a chunk of facts: all their prompts in one backend call per kind."""
    assert settings.samples is not None
    if settings.scheme == YE2025:
        per_fact = [mapping_prompts(fact, settings.templates) for fact in chunk]
    else:
        assert fewshot is not None
        per_fact = [fewshot.prompts(fact) for fact in chunk]
    flat = [prompt for prompts in per_fact for prompt in prompts]
    sampled = sampler.generate(flat, settings.samples, settings.sample_kwargs(), seed)
    greedy = (sampler.generate(flat, 1, settings.greedy_kwargs(), seed)
              if settings.scheme == SLICK else None)
    records, start = [], 0
    for fact, prompts in zip(chunk, per_fact, strict=True):
        end = start + len(prompts)
        if settings.scheme == YE2025:
            records.append(_score_ye2025(fact, sampled[start:end], settings.samples))
        else:
            assert greedy is not None
            records.append(_score_slick(fact, greedy[start:end], sampled[start:end],
                                        settings.samples, settings.shots))
        start = end
    return records


def probe_facts(
    facts: Sequence[Fact],
    spec: ModelSpec,
    out: str | os.PathLike[str],
    settings: ProbeSettings | None = None,
    *,
    source: str = "<memory>",
    chunk_facts: int = 32,
    progress: bool = True,
    lm: Any = None,
    stop_after_chunks: int | None = None,
    save_dataset: bool = True,
) -> ProbeResult:
    """Probe ``facts`` with the model of ``spec`` and write the annotated folder ``out``.

    Bad input fails before the model loads: an empty fact list, duplicate ids, a relation
    without mapping templates, bad settings, or an ``out`` folder holding another run. A
    finished folder of the same run is returned as is. ``lm`` passes an already loaded
    lm-eval model (tests, benchmarks); ``stop_after_chunks`` simulates an interruption;
    ``save_dataset=False`` skips the ``dataset/`` copy (the jsonl files hold the same data).
    """
    settings = (settings or ProbeSettings()).resolved()
    out = Path(out)
    facts = list(facts)
    if not facts:
        raise UserError("no facts to probe")
    seen: set[str] = set()
    for fact in facts:
        if fact.id in seen:
            raise UserError(f"duplicate fact id {fact.id!r} (ids must be unique across all sources)")
        seen.add(fact.id)
        if not _SPLIT_NAME.match(fact.split):
            raise UserError(f"fact {fact.id}: split name {fact.split!r} cannot name a file")
    templates_used = check_templates(facts, settings.templates) if settings.scheme == YE2025 else {}
    model_key = spec.model_key()
    identity = _identity(facts, spec, settings)
    run_id = run_id_of(identity)
    state = _check_out_folder(out, run_id)
    if state == "complete":
        logger.info("%s already holds this probe run (%s); nothing to do", out, run_id)
        done_facts, key, scheme = load_annotated(out)
        config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        return ProbeResult(done_facts, key, scheme, out, config, resumed_facts=len(done_facts),
                           counts=config.get("counts", {}))

    if lm is None:  # loaded before anything is written, so a bad model leaves no folder behind
        lm = load_model(spec.model, spec.model_args, batch_size=spec.batch_size, device=spec.device)
    partial = out / PARTIAL_DIR
    partial.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if state == "fresh":
        _write_json(partial / "run.json", {**identity, "run_id": run_id, "started_at": started})
    done = _read_done(partial / "done.jsonl")
    resumed = sum(1 for fact in facts if fact.id in done)
    if resumed:
        logger.info("resuming: %d of %d facts already probed", resumed, len(facts))

    sampler = Sampler(lm)
    fewshot = (FewShotPrompts(facts, settings.shots, settings.fewshot_sets, settings.seed)
               if settings.scheme == SLICK else None)
    chunks = [facts[i:i + chunk_facts] for i in range(0, len(facts), chunk_facts)]
    began = time.perf_counter()
    probed = 0
    bar = tqdm(total=len(facts), initial=resumed, desc=f"probing ({settings.scheme})",
               unit="fact", disable=not progress)
    with (partial / "done.jsonl").open("a", encoding="utf-8") as log:
        for index, chunk in enumerate(chunks):
            todo = [fact for fact in chunk if fact.id not in done]
            if not todo:
                continue
            if stop_after_chunks is not None and probed >= stop_after_chunks * chunk_facts:
                bar.close()
                raise KeyboardInterrupt("stopped on request (stop_after_chunks)")
            seed = derive_seed(settings.seed, index, chunk[0].id)
            records = _probe_chunk(sampler, todo, settings, seed, fewshot)
            for fact, record in zip(todo, records, strict=True):
                done[fact.id] = record
                log.write(json.dumps({"id": fact.id, "mastery": record}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            probed += len(todo)
            bar.update(len(todo))
    bar.close()
    elapsed = time.perf_counter() - began

    annotated = []
    for fact in facts:
        copy = Fact(**{**fact.to_dict(), "mastery": {**fact.mastery, model_key: done[fact.id]}})
        annotated.append(copy)
    counts = category_counts(annotated, model_key, settings.scheme)
    config = {
        "format": FORMAT,
        "complete": True,
        "run_id": run_id,
        **identity,
        "scheme": settings.scheme,
        "facts_source": source,
        "model_revision": _revision(spec),
        "templates_used": templates_used,
        "backend": sampler.family,
        "batch_size": spec.batch_size,
        "device": spec.device,
        "model_generation_config": generation_settings(lm),
        "counts": counts,
        "files": {},
        "started_at": json.loads((partial / "run.json").read_text("utf-8")).get("started_at", started),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "probe_seconds_this_session": round(elapsed, 2),
        "facts_per_second_this_session": round(probed / elapsed, 3) if probed and elapsed else None,
        "versions": library_versions(),
    }
    config["dataset_saved"] = save_dataset
    _finalize(out, annotated, config, save_dataset)
    logger.info("wrote %s (%d facts; %d resumed)", out, len(annotated), resumed)
    return ProbeResult(annotated, model_key, settings.scheme, out, config,
                       resumed_facts=resumed, probed_facts=probed, counts=counts)


def _revision(spec: ModelSpec) -> str | None:
    pretrained = spec.pretrained()
    if not pretrained:
        return None
    from sftknow_eval import hub

    try:
        return hub.model_revision(pretrained)
    except UserError as error:  # the card says "unknown" rather than failing a finished probe
        logger.warning("could not look up the model revision: %s", error)
        return None


def _dataset_rows(facts: Sequence[Fact], model_key: str) -> list[dict[str, Any]]:
    rows = []
    for fact in facts:
        row = fact.to_dict()
        record = fact.mastery.get(model_key, {})
        row["mastery"] = json.dumps(fact.mastery, ensure_ascii=False)
        row["meta"] = json.dumps(fact.meta, ensure_ascii=False)
        row["category"] = record.get("category")
        row["score"] = float(record.get("score", 0.0))
        rows.append(row)
    return rows


def _finalize(out: Path, facts: list[Fact], config: dict[str, Any], save_dataset: bool) -> None:
    """Write every output into a temp folder, move them in, and write the config last."""
    import datasets

    from sftknow_eval.probe.card import build_card

    tmp = out / FINAL_TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / FACTS_DIR).mkdir(parents=True)
    splits: dict[str, list[Fact]] = {}
    for fact in facts:
        splits.setdefault(fact.split, []).append(fact)
    for split, members in splits.items():
        write_jsonl(members, tmp / FACTS_DIR / f"{split}.jsonl")
        config["files"][split] = f"{FACTS_DIR}/{split}.jsonl"
    if save_dataset:
        rows = _dataset_rows(facts, config["model_key"])
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp / DATASET_DIR))
    build_card(config).save(tmp / CARD_FILE)
    for name in (FACTS_DIR, DATASET_DIR, CARD_FILE):
        if not (tmp / name).exists():
            continue
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(tmp / name, target)
    _write_json(out / CONFIG_FILE, config)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def push_annotated(out: str | os.PathLike[str], repo_id: str, *, private: bool = True,
                   overwrite: bool = False) -> str:
    """Push a finished annotated folder as a Hub dataset repo; returns the commit URL."""
    from sftknow_eval import hub

    config = read_config(out)
    return hub.push_folder(out, repo_id, private=private, repo_type="dataset", overwrite=overwrite,
                           commit_message=f"Mastery of {config['model_key']} ({config['scheme']}) "
                                          "probed with sftknow-eval")
