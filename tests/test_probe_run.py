"""The probe run on a scripted fake LM: scores, resume, output folder, bad input, card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard
from probe_helpers import FakeLM, FakeVLLM, make_fact, world_facts

from sftknow_eval import relations
from sftknow_eval.errors import UserError
from sftknow_eval.probe.annotated import load_annotated, read_config
from sftknow_eval.probe.backend import Sampler, load_model
from sftknow_eval.probe.requests import FewShotPrompts, ProbeSettings
from sftknow_eval.probe.run import ModelSpec, probe_facts
from sftknow_eval.readers import load_facts

SPEC = ModelSpec(model="hf", model_args="pretrained=fake-org/fake-model", key="fake")


def test_scores_and_outputs(tmp_path: Path) -> None:
    facts = world_facts()
    lm = FakeLM()
    result = probe_facts(facts, SPEC, tmp_path / "out", ProbeSettings(templates=5),
                         lm=lm, progress=False, chunk_facts=4)
    by_id = {f.id: f.mastery["fake"] for f in result.facts}
    for fact in facts:
        record = by_id[fact.id]
        known = int(fact.subject.split("k")[1])
        assert record["correct"] == known * 5 and record["samples"] == 50
        assert record["templates"] == 5 and record["per_template"] == [known] * 5
        assert record["category"] == {0: "D0", 3: "D2", 10: "D4"}[known]
    # every prompt went out 10 times, with sampling kwargs
    prompts = lm.prompts_sent()
    assert len(prompts) == len(facts) * 5 * 10
    assert all(kwargs["do_sample"] and kwargs["temperature"] == 0.7 and kwargs["max_gen_toks"] == 32
               for call in lm.calls for _, kwargs in call)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dataset", "facts", "probe_config.json"]
    loaded, key, scheme = load_annotated(out)
    assert key == "fake" and scheme == "ye2025" and [f.id for f in loaded] == [f.id for f in facts]
    assert load_facts(out / "dataset")[0].mastery["fake"]["category"] == loaded[0].category("fake")
    config = read_config(out)
    assert config["versions"]["lm_eval"] and config["settings"]["samples"] == 10
    assert config["counts"] == {"train/in": {"D0": 4, "D1": 0, "D2": 4, "D3": 0, "D4": 4}}


def test_resume_skips_finished_facts(tmp_path: Path) -> None:
    facts = world_facts(per_relation=3)  # 12 facts, 6 chunks of 2
    out = tmp_path / "out"
    first = FakeLM()
    with pytest.raises(KeyboardInterrupt):
        probe_facts(facts, SPEC, out, lm=first, progress=False, chunk_facts=2, stop_after_chunks=2)
    assert not (out / "probe_config.json").exists()  # nothing looks complete
    with pytest.raises(UserError, match="unfinished"):
        load_annotated(out)
    second = FakeLM()
    result = probe_facts(facts, SPEC, out, lm=second, progress=False, chunk_facts=2)
    assert result.resumed_facts == 4 and result.probed_facts == 8
    probed_again = {p for p in second.prompts_sent()}
    assert not any(f.subject in p for f in facts[:4] for p in probed_again)
    fresh = probe_facts(facts, SPEC, tmp_path / "fresh", lm=FakeLM(), progress=False, chunk_facts=2)
    assert [f.mastery for f in result.facts] == [f.mastery for f in fresh.facts]
    # a finished folder of the same run is returned without probing
    third = FakeLM()
    again = probe_facts(facts, SPEC, out, lm=third, progress=False, chunk_facts=2)
    assert third.calls == [] and len(again.facts) == 12


def test_a_torn_line_is_dropped_on_resume(tmp_path: Path) -> None:
    facts = world_facts()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        probe_facts(facts, SPEC, out, lm=FakeLM(), progress=False, chunk_facts=2, stop_after_chunks=1)
    with (out / ".probe-partial" / "done.jsonl").open("a") as handle:
        handle.write('{"id": "P17-00')
    result = probe_facts(facts, SPEC, out, lm=FakeLM(), progress=False, chunk_facts=2)
    assert result.resumed_facts == 2 and len(result.facts) == 12


def test_out_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    facts = world_facts()
    out = tmp_path / "out"
    probe_facts(facts, SPEC, out, lm=FakeLM(), progress=False)
    with pytest.raises(UserError, match="different probe run"):
        probe_facts(facts, SPEC, out, ProbeSettings(samples=3), lm=FakeLM(), progress=False)
    with pytest.raises(UserError, match="different probe run"):
        probe_facts(facts[:-1], SPEC, out, lm=FakeLM(), progress=False)
    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        probe_facts(facts, SPEC, partial, lm=FakeLM(), progress=False, chunk_facts=2,
                    stop_after_chunks=1)
    with pytest.raises(UserError, match="unfinished, different"):
        probe_facts(facts, SPEC, partial, ProbeSettings(seed=5), lm=FakeLM(), progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        probe_facts(facts, SPEC, foreign, lm=FakeLM(), progress=False)


def test_relation_without_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    monkeypatch.setitem(relations.RELATIONS, "P19",
                        replace(relations.RELATIONS["P19"], mapping_templates=()))
    facts = [make_fact(1, "P17"), make_fact(2, "P19")]
    with pytest.raises(UserError, match="fact P19-0002: relation P19 has no mapping templates"):
        probe_facts(facts, SPEC, tmp_path / "out", lm=FakeLM(), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_settings_and_input(tmp_path: Path) -> None:
    facts = world_facts()
    with pytest.raises(UserError, match="unknown scheme"):
        probe_facts(facts, SPEC, tmp_path / "a", ProbeSettings(scheme="gekhman"), lm=FakeLM())
    with pytest.raises(UserError, match="samples must be at least 1"):
        probe_facts(facts, SPEC, tmp_path / "a", ProbeSettings(samples=0), lm=FakeLM())
    with pytest.raises(UserError, match="duplicate fact id"):
        probe_facts(facts + facts[:1], SPEC, tmp_path / "a", lm=FakeLM())
    with pytest.raises(UserError, match="own options"):
        probe_facts(facts, SPEC, tmp_path / "a", ProbeSettings(gen_kwargs={"seed": 1}), lm=FakeLM())
    assert not (tmp_path / "a").exists()


def test_model_that_cannot_be_loaded(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot load model 'hf'"):
        load_model("hf", f"pretrained={tmp_path / 'missing-model'}", device="cpu")
    with pytest.raises(UserError, match="no model backend 'no-such-backend'"):
        load_model("no-such-backend", "pretrained=x")
    spec = ModelSpec(model="hf", model_args=f"pretrained={tmp_path / 'missing-model'}", device="cpu")
    with pytest.raises(UserError, match="cannot load model"):
        probe_facts(world_facts(), spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written


def test_vllm_gets_a_distinct_seed_per_sample() -> None:
    lm = FakeVLLM()
    sampler = Sampler(lm)
    assert sampler.family == "vllm"
    outputs = sampler.generate(["subj1k3 is located in", "subj2k0 is located in"], 10,
                               {"do_sample": True, "temperature": 0.7}, seed=7)
    assert [len(o) for o in outputs] == [10, 10]
    seeds = [kwargs["seed"] for _, kwargs in lm.calls[0]]
    assert len(set(seeds)) == 20
    Sampler(lm).generate(["subj1k3 is located in", "subj2k0 is located in"], 10,
                         {"do_sample": True, "temperature": 0.7}, seed=7)
    assert [kwargs["seed"] for _, kwargs in lm.calls[1]] == seeds  # reproducible


def test_slick_scheme(tmp_path: Path) -> None:
    facts = world_facts(per_relation=6)
    lm = FakeLM()
    settings = ProbeSettings(scheme="slick", samples=10, fewshot_sets=3, shots=2)
    result = probe_facts(facts, SPEC, tmp_path / "out", settings, lm=lm, progress=False)
    for fact in result.facts:
        record = fact.mastery["fake"]
        known = int(fact.subject.split("k")[1])
        # the fake answers right on the first `known` copies: the single greedy copy is right
        # iff known > 0, samples are right `known` of 10 times
        assert record["category"] == {0: "Unknown", 3: "HighlyKnown", 10: "HighlyKnown"}[known]
        assert record["correct"] == known * 3 and record["greedy"] == 3
    kinds = [call[0][1]["do_sample"] for call in lm.calls]
    assert set(kinds) == {True, False}  # greedy and sampled calls both made
    prompt = lm.calls[0][0][0]
    lines = prompt.split("\n")
    assert len(lines) == 3 and lines[-1].endswith("<|answer|>") and "<|answer|> obj" in lines[0]
    assert read_config(tmp_path / "out")["counts"]["train/in"]["Unknown"] == 8


def test_fewshot_exemplars_are_same_relation_and_seeded() -> None:
    facts = world_facts(per_relation=6)
    prompts = FewShotPrompts(facts, shots=3, sets=4, seed=0)
    target = facts[0]
    drawn = prompts.prompts(target)
    assert len(drawn) == 4 and len(set(drawn)) > 1
    for prompt in drawn:
        exemplars = prompt.split("\n")[:-1]
        assert len(exemplars) == 3
        assert all(target.subject not in line for line in exemplars)
        same = {f.question for f in facts if f.relation == target.relation}
        assert all(any(q in line for q in same) for line in exemplars)
    assert FewShotPrompts(list(reversed(facts)), 3, 4, 0).prompts(target) == drawn


def test_card_states_what_was_done(tmp_path: Path) -> None:
    facts = world_facts() + [make_fact(900, "P26", split="test", known=10)]
    probe_facts(facts, SPEC, tmp_path / "out", ProbeSettings(templates=3), lm=FakeLM(),
                progress=False, source="hand-made")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    text = card.text
    assert "fake" in text and "revision" in text and "ye2025" in text
    assert "samples per prompt: 10, temperature 0.7, at most 32 new tokens" in text
    assert "`{subject} is located in`" in text and "**P26**" in text
    assert "| train/in | 4 | 0 | 4 | 0 | 4 | 12 |" in text
    assert "| test/out | 0 | 0 | 0 | 0 | 1 | 1 |" in text
    data = card.data.to_dict()
    assert data["configs"][0]["data_files"] == [
        {"split": "train", "path": "facts/train.jsonl"}, {"split": "test", "path": "facts/test.jsonl"}]
    assert "mastery-ye2025" in data["tags"]


def test_push_as_dataset_repo(tmp_path: Path, local_hub) -> None:
    from sftknow_eval.probe.run import push_annotated

    out = tmp_path / "out"
    probe_facts(world_facts(), SPEC, out, lm=FakeLM(), progress=False)
    url = push_annotated(out, "study/fake-mastery")
    assert "study/fake-mastery" in url
    files = local_hub.files("study/fake-mastery", repo_type="dataset")
    assert {"README.md", "probe_config.json", "facts/train.jsonl"} <= set(files)
    assert any(name.startswith("dataset/") for name in files)
    assert local_hub.state.repos[("dataset", "study/fake-mastery")].private
    assert json.loads(files["probe_config.json"])["model_key"] == "fake"
