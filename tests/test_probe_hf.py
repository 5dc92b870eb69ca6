"""The probe on lm-eval's real hf backend (a tiny random Llama): N samples of one prompt
differ, a fixed seed reproduces them and the categories, and the model's own
``max_new_tokens`` does not cut the probe's budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hub_fixtures import TINY_OBJECTS, TINY_SUBJECTS

from sftknow_eval.facts import Fact
from sftknow_eval.probe.backend import Sampler, load_model
from sftknow_eval.probe.requests import ProbeSettings
from sftknow_eval.probe.run import ModelSpec, probe_facts
from sftknow_eval.relations import RELATIONS

KWARGS = {"until": ["\n"], "do_sample": True, "temperature": 0.7, "max_gen_toks": 12}


@pytest.fixture(scope="module")
def hf_lm(tiny_model_dir: Path) -> Any:
    return load_model("hf", f"pretrained={tiny_model_dir}", batch_size=64, device="cpu")


def facts() -> list[Fact]:
    rows = []
    for i, subject in enumerate(TINY_SUBJECTS):
        obj = TINY_OBJECTS[i % len(TINY_OBJECTS)]
        rows.append(Fact(id=f"P17-{i}", relation="P17", subject=subject, object=obj, aliases=[obj],
                         question=RELATIONS["P17"].question_for(subject), split="train", domain="in"))
    return rows


def test_samples_of_one_prompt_differ_and_a_seed_reproduces_them(hf_lm: Any) -> None:
    sampler = Sampler(hf_lm)
    assert sampler.family == "hf"
    prompts = ["varo is located in", "quell is located in"]
    first = sampler.generate(prompts, 10, KWARGS, seed=11)
    assert [len(samples) for samples in first] == [10, 10]
    assert len(set(first[0])) >= 8 and len(set(first[1])) >= 8  # really different samples
    assert sampler.generate(prompts, 10, KWARGS, seed=11) == first
    assert sampler.generate(prompts, 10, KWARGS, seed=12) != first


def test_fixed_seed_reproduces_the_categories(hf_lm: Any, tmp_path: Path) -> None:
    spec = ModelSpec(model_args="pretrained=tiny", key="tiny", batch_size=64)
    settings = ProbeSettings(templates=3, samples=5, max_new_tokens=12, seed=3)
    runs = [probe_facts(facts(), spec, tmp_path / name, settings, lm=hf_lm, progress=False,
                        chunk_facts=3) for name in ("a", "b")]
    records = [[f.mastery["tiny"] for f in run.facts] for run in runs]
    assert records[0] == records[1]
    other = probe_facts(facts(), spec, tmp_path / "c", ProbeSettings(templates=3, samples=5,
                        max_new_tokens=12, seed=4), lm=hf_lm, progress=False, chunk_facts=3)
    assert [f.mastery["tiny"]["per_template"] for f in other.facts] != [
        r["per_template"] for r in records[0]]


def test_model_max_new_tokens_does_not_cap_the_probe(hf_lm: Any) -> None:
    from sftknow_eval.probe.backend import uncap_generation

    hf_lm.model.generation_config.max_new_tokens = 2
    uncap_generation(hf_lm)
    outputs = Sampler(hf_lm).generate(["varo is located in"], 4, KWARGS, seed=0)[0]
    assert max(len(text.split()) for text in outputs) > 2


def test_cli_end_to_end(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sftknow_eval.cli import main
    from sftknow_eval.facts import write_jsonl
    from sftknow_eval.probe.annotated import load_annotated

    source = write_jsonl(facts(), tmp_path / "facts.jsonl")
    argv = ["probe", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu",
            "--facts", str(source), "--out", str(tmp_path / "out"), "--templates", "2", "--samples", "3",
            "--max-new-tokens", "6", "--no-progress"]
    assert main(argv) == 0
    annotated, key, scheme = load_annotated(tmp_path / "out")
    assert key == "model" and scheme == "ye2025" and len(annotated) == len(TINY_SUBJECTS)
    assert all(f.mastery["model"]["samples"] == 6 for f in annotated)
    assert (tmp_path / "out" / "dataset").is_dir()
    assert main(argv[:-1] + ["--samples", "4", "--no-progress"]) == 2
    assert "different probe run" in capsys.readouterr().err
    bad = ["probe", "--model-args", f"pretrained={tmp_path / 'nope'}", "--device", "cpu",
           "--facts", str(source), "--out", str(tmp_path / "out2")]
    assert main(bad) == 2
    assert "cannot load model" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_shipped_annotations_cover_the_world() -> None:
    from sftknow_eval.probe.annotated import SHIPPED_ANNOTATED, load_annotated
    from sftknow_eval.world.shipped import load_all_facts

    if not (SHIPPED_ANNOTATED / "probe_config.json").is_file():
        pytest.skip("no shipped annotations")
    annotated, key, scheme = load_annotated(SHIPPED_ANNOTATED)
    world = load_all_facts()
    assert scheme == "ye2025" and {f.id for f in annotated} == {f.id for f in world}
    assert all(f.category(key) in {"D0", "D1", "D2", "D3", "D4"} for f in annotated)
