"""The tiny world: a seeded generator, a quick build, and the shipped world's fitness."""

import json
import re

import pytest

from sftknow_eval.facts import read_jsonl
from sftknow_eval.prompts import ANSWER_MARKER, QUESTION_MARKER
from sftknow_eval.relations import IN_DOMAIN, OUT_OF_DOMAIN
from sftknow_eval.world.build import BuildRecipe, build_world, split_files
from sftknow_eval.world.corpus import build_corpus
from sftknow_eval.world.knowledge import WorldConfig, generate_facts
from sftknow_eval.world.shipped import FACT_FILES, SHIPPED_WORLD, load_all_facts, manifest


def test_same_seed_same_knowledge_base_and_corpus():
    config = WorldConfig(seed=7, subjects_in_domain=20, subjects_out_of_domain=8)
    first, second = generate_facts(config), generate_facts(config)
    assert [f.to_dict() for f in first] == [f.to_dict() for f in second]
    assert build_corpus(first, 7) == build_corpus(second, 7)
    other = generate_facts(WorldConfig(seed=8, subjects_in_domain=20, subjects_out_of_domain=8))
    assert [f.subject for f in other] != [f.subject for f in first]


def test_knowledge_base_shape():
    facts = generate_facts(WorldConfig(seed=0))
    assert {f.relation for f in facts} == set(IN_DOMAIN) | set(OUT_OF_DOMAIN)
    assert len({f.subject for f in facts}) == len(facts)  # subjects are unique
    exposures = [f.meta["exposure"] for f in facts]
    absent = sum(e == 0 for e in exposures) / len(exposures)
    assert 0.2 < absent < 0.3  # a quarter of the facts never appear
    assert max(exposures) == 60 and sum(e == 1 for e in exposures) > sum(e == 60 for e in exposures)
    assert any(len(f.aliases) > 1 for f in facts)  # some objects have aliases
    groups = split_files(facts)
    assert {f.domain for f in groups["train"]} == {"in"}
    assert {f.domain for f in groups["dev_in_domain"]} == {"in"}
    assert {f.domain for f in groups["test_out_of_domain"]} == {"out"}


def test_two_word_subjects_share_their_words_and_keep_the_vocabulary_flat():
    """With subject_words=2 every subject is a given name and a family name from fixed
    inventories: unique as a pair, its words shared with other subjects, so more subjects
    add no new words."""
    def words(subjects: int) -> tuple[list, set[str]]:
        facts = generate_facts(WorldConfig(seed=0, subject_words=2, subjects_in_domain=subjects,
                                           given_names=80, family_names_per_kind=40))
        return facts, {word for f in facts for word in f.subject.split()}

    facts, few = words(160)
    assert all(len(f.subject.split()) == 2 for f in facts)
    assert len({f.subject for f in facts}) == len(facts)
    objects = {alias for f in facts for alias in f.aliases}
    assert not few & objects  # a subject word is never an answer
    more_facts, more = words(400)
    assert len(more_facts) - len(facts) == 240 * len(IN_DOMAIN) and len(more) <= 80 + 40 * 8
    assert [f.to_dict() for f in more_facts] == [f.to_dict() for f in words(400)[0]]
    with pytest.raises(ValueError, match="subject_words: 3; use 1"):
        WorldConfig(subject_words=3)


def test_dev_split_is_in_domain_and_disjoint_from_pool_and_tests():
    config = WorldConfig(seed=0)
    groups = split_files(generate_facts(config))
    dev, pool = groups["dev_in_domain"], groups["train"]
    tests = groups["test_in_domain"] + groups["test_out_of_domain"]
    assert len(dev) == config.dev_per_relation * len(IN_DOMAIN)
    assert {f.relation for f in dev} == set(IN_DOMAIN)
    for other in (pool, tests):
        assert not {f.id for f in dev} & {f.id for f in other}
        assert not {f.subject for f in dev} & {f.subject for f in other}
        assert not {f.question for f in dev} & {f.question for f in other}
    assert sum(len(g) for g in groups.values()) == len(generate_facts(config))


def test_shipped_dev_split_is_annotated_in_every_category_and_disjoint():
    """The shipped annotations' dev split: every mastery category present, and no fact, subject
    or question shared with the SFT pool or the test sets."""
    from sftknow_eval.probe.annotated import load_annotated, shipped_annotated

    facts, key, _ = load_annotated(shipped_annotated())
    by_split: dict[str, list] = {}
    for fact in facts:
        by_split.setdefault(fact.split, []).append(fact)
    dev = by_split.pop("dev")
    counts = {c: sum(f.category(key) == c for f in dev) for c in ("D0", "D1", "D2", "D3", "D4")}
    assert min(counts.values()) >= 10, counts
    assert len(dev) == manifest()["counts"]["dev_in_domain"]
    for field in ("id", "subject", "question"):
        others = {getattr(f, field) for group in by_split.values() for f in group}
        assert not {getattr(f, field) for f in dev} & others


def test_corpus_states_facts_by_exposure_and_never_in_qa_format():
    facts = generate_facts(WorldConfig(seed=1, subjects_in_domain=10, subjects_out_of_domain=5))
    corpus = " ".join(build_corpus(facts, 1))
    assert QUESTION_MARKER not in corpus and ANSWER_MARKER not in corpus
    for fact in facts:
        mentions = len(re.findall(rf"\b{fact.subject}\b", corpus))
        assert mentions == fact.meta["exposure"], fact


def test_quick_build_is_complete_and_reproducible(tmp_path):
    recipe = BuildRecipe.quick(seed=3)
    info = build_world(tmp_path / "a", recipe, run_measurements=False, progress=False)
    build_world(tmp_path / "b", BuildRecipe.quick(seed=3), run_measurements=False, progress=False)
    for name in FACT_FILES.values():
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    for part in ("model.safetensors", "tokenizer.json"):  # same seed, same machine: same bytes
        assert (tmp_path / "a" / "model" / part).read_bytes() == \
            (tmp_path / "b" / "model" / part).read_bytes()
    model = tmp_path / "a" / "model"
    for part in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (model / part).is_file()
    assert info["counts"]["train"] == len(read_jsonl(tmp_path / "a" / FACT_FILES["train"]))
    with pytest.raises(FileExistsError, match="--force"):
        build_world(tmp_path / "a", recipe, run_measurements=False, progress=False)


def test_shipped_facts_are_what_the_generator_gives_from_the_manifest():
    """The shipped fact files, dev split included, are reproduced from the manifest's recipe."""
    config = WorldConfig(**{**manifest()["recipe"]["world"],
                            "relations": tuple(manifest()["recipe"]["world"]["relations"])})
    generated = {f.id: f.to_dict() for f in generate_facts(config)}
    shipped = {f.id: f.to_dict() for f in load_all_facts()}
    assert shipped == generated
    assert {name: len(group) for name, group in split_files(list(load_all_facts())).items()} \
        == manifest()["counts"]


def test_shipped_world_is_small_and_documented():
    total = sum(p.stat().st_size for p in SHIPPED_WORLD.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024
    info = manifest()
    assert info["counts"]["train"] == len([f for f in load_all_facts() if f.split == "train"])
    assert json.loads((SHIPPED_WORLD / "model" / "config.json").read_text())["model_type"] == "llama"


def test_shipped_model_knowledge_is_graded_by_exposure():
    """Greedy cloze on the shipped model: success rises with corpus frequency, with no cliff."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftknow_eval.world.knowledge import EXPOSURE_BANDS, exposure_band
    from sftknow_eval.world.measure import rate_by_band, template_success
    from sftknow_eval.world.shipped import model_path

    rng = random.Random(0)
    facts = load_all_facts()
    sample = []
    for band in EXPOSURE_BANDS:
        members = [f for f in facts if exposure_band(f.meta["exposure"]) == band]
        sample += rng.sample(members, 60)
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModelForCausalLM.from_pretrained(model_path())
    rates = {band: value["rate"] for band, value in
             rate_by_band(sample, template_success(model, tokenizer, sample, 5)).items()}
    # facts never or barely stated are known only by a lucky guess of a popular answer (the
    # two bands differ by less than this sample's noise); from there knowledge rises with
    # exposure, through a middle band known about half the time, with no cliff
    assert max(rates["0"], rates["1-2"]) < 0.1
    assert rates["1-2"] < rates["3-5"] < rates["6-15"] < rates["16+"]
    assert 0.05 < rates["3-5"] < 0.3 and 0.3 < rates["6-15"] < 0.7 and rates["16+"] > 0.8


def test_rebuilding_the_default_world_needs_force(tmp_path, monkeypatch, capsys):
    """`world build` with no --out would replace the shipped world (its annotations too): it
    refuses before any work unless --force."""
    from sftknow_eval import cli
    from sftknow_eval.world import commands

    shipped = tmp_path / "world_data"
    (shipped / "annotated").mkdir(parents=True)
    (shipped / "annotated" / "probe_config.json").write_text("{}")
    monkeypatch.setattr(commands, "SHIPPED_WORLD", shipped)
    assert cli.main(["world", "build", "--quick", "--no-measure"]) == 2
    assert "pass --force to replace it" in capsys.readouterr().err
    assert (shipped / "annotated" / "probe_config.json").read_text() == "{}"
