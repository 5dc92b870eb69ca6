"""Choosing k on dev data: the rule, the whole run on the tiny world with lm-eval, and the bad
inputs (overlap with the training set, empty dev buckets, an unusable backend)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sftknow_eval import choose_k as choose
from sftknow_eval.choose_k import Candidate, pick, restore_and_choose
from sftknow_eval.cli import main
from sftknow_eval.errors import UserError
from sftknow_eval.lm_tasks.family import write_family
from sftknow_eval.lm_tasks.results import FamilyScores
from sftknow_eval.probe.annotated import load_annotated, shipped_annotated
from sftknow_eval.probe.categories import YE2025_CATEGORIES
from sftknow_eval.restore.pipeline import RestoreConfig
from sftknow_eval.world.shipped import model_path

BASE = model_path()


def _candidate(name: str, k: float, acc: float | None) -> Candidate:
    return Candidate(name=name, k=k, model=name, acc=acc)


def test_pick_highest_acc_ties_to_the_smaller_k() -> None:
    assert pick([_candidate("tuned", 0, 0.5), _candidate("top5", 5, 0.6),
                 _candidate("top20", 20, 0.6)]).name == "top5"
    assert pick([_candidate("tuned", 0, 0.6), _candidate("top5", 5, 0.6)]).name == "tuned"
    assert pick([_candidate("tuned", 0, None), _candidate("top5", 5, 0.1)]).name == "top5"
    with pytest.raises(UserError, match="buckets are all empty"):
        pick([_candidate("tuned", 0, None)])


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tiny world's model fine-tuned briefly on 40 D0 training facts."""
    from sftknow_eval.select.sets import select_sft_set
    from sftknow_eval.train import train

    folder = tmp_path_factory.mktemp("choose")
    data = folder / "D0-40.jsonl"
    select_sft_set(shipped_annotated(), "D0", 40, 0, data)
    return train("tiny", data, folder / "sft", overrides=["num_train_epochs=2",
                                                           "disable_tqdm=true"]).output


def _dev_family(folder: Path, split_from: str = "test", ids: list[str] | None = None) -> Path:
    """A family of 'dev' facts: a few in-domain facts of each bucket (taken from ``split_from``,
    or the facts named by ``ids``), relabelled as the dev split."""
    facts, key, scheme = load_annotated(shipped_annotated())
    chosen, per_bucket = [], {}
    for fact in facts:
        if ids is not None:
            take = fact.id in ids
        else:
            bucket = fact.category(key)
            take = (fact.split == split_from and fact.domain == "in"
                    and per_bucket.get(bucket, 0) < 4)
            per_bucket[bucket] = per_bucket.get(bucket, 0) + take
        if take:
            fact.split = "dev"
            chosen.append(fact)
    write_family(chosen, key, scheme, YE2025_CATEGORIES, "tinydev", folder, splits=("dev",))
    return folder


def test_choose_on_dev_with_lm_eval(fine_tune: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    family = _dev_family(tmp_path / "dev")
    out = tmp_path / "restored"
    code = main(["restore", "--base", str(BASE), "--tuned", str(fine_tune), "--k", "5,20",
                 "--out", str(out), "--choose-on", str(family), "--device", "cpu",
                 "--model-args", "dtype=float32", "--batch-size", "16", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    choice = json.loads((out / "choice.json").read_text())
    names = [c["name"] for c in choice["candidates"]]
    assert names == ["tuned", "top5", "top20"] and choice["domain"] == "id"
    for candidate in choice["candidates"]:  # each scored on every in-domain dev bucket
        assert set(candidate["buckets"]["id"]) == set(YE2025_CATEGORIES)
        assert candidate["acc"] == candidate["acc_by_domain"]["id"]
        assert (out / "dev_eval" / f"{candidate['name']}.json").is_file()
    best = pick([Candidate(**c) for c in choice["candidates"]])
    assert choice["chosen"] == best.name and choice["restored"] == (best.k > 0)
    assert "| tuned | 0 |" in printed and "| top20 | 20 |" in printed
    if choice["restored"]:
        card = (out / choice["chosen"] / "README.md").read_text()
        assert "## Chosen on dev data" in card and "restore_choice:" in card
    else:
        assert "no k beats the unrestored fine-tune" in printed


def _fake_scores(accs: dict[str, float]):
    """evaluate_family stand-in: the in-domain macro Acc of each model by its folder name."""
    def evaluate(model, family_dir, family, settings, results_file, *, tasks=None):
        name = "tuned" if Path(model).name == "sft" else Path(model).name
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text("{}")
        return FamilyScores(model=str(model), family=family, source=str(results_file),
                            buckets={"id": {"D0": accs[name]}}, acc={"id": accs[name]})
    return evaluate


def test_push_only_the_chosen_variant_or_nothing(local_hub, fine_tune: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    family = _dev_family(tmp_path / "dev")
    monkeypatch.setattr(choose, "evaluate_family",
                        _fake_scores({"tuned": 0.4, "top5": 0.5, "top20": 0.5}))
    config = RestoreConfig(base=str(BASE), tuned=str(fine_tune), out=tmp_path / "a", k=[20, 5],
                           push_to="study/tiny-d0", progress=False)
    choice = restore_and_choose(config, family)
    assert choice.chosen.name == "top5" and set(choice.pushed) == {"top5"}  # tie: smaller k
    api = HfApi()
    assert api.repo_exists("study/tiny-d0-top5") and not api.repo_exists("study/tiny-d0-top20")
    card = (tmp_path / "a" / "top5" / "README.md").read_text()
    assert "Chosen on dev data" in card
    assert json.loads((tmp_path / "a" / "choice.json").read_text())["pushed"] == choice.pushed

    monkeypatch.setattr(choose, "evaluate_family",
                        _fake_scores({"tuned": 0.6, "top5": 0.5, "top20": 0.6}))
    config = RestoreConfig(base=str(BASE), tuned=str(fine_tune), out=tmp_path / "b", k=[5, 20],
                           push_to="study/tiny-d0b", progress=False)
    choice = restore_and_choose(config, family)
    assert choice.chosen.name == "tuned" and not choice.restored and choice.pushed == {}
    assert not api.repo_exists("study/tiny-d0b-top5") and not api.repo_exists("study/tiny-d0b-top20")
    assert "Chosen on dev data" not in (tmp_path / "b" / "top20" / "README.md").read_text()


def test_bad_dev_inputs_fail_before_restoring(fine_tune: Path, tmp_path: Path) -> None:
    config = RestoreConfig(base=str(BASE), tuned=str(fine_tune), out=tmp_path / "out", k=[5],
                           progress=False)
    # dev facts the fine-tune was trained on
    trained = [json.loads(line)["id"] for line in
               Path(json.loads((fine_tune / "training_run.json").read_text())["data"]["file"])
               .read_text().splitlines()]
    overlapping = _dev_family(tmp_path / "overlap", ids=trained[:3])
    with pytest.raises(UserError, match=rf"shares 3 fact\(s\) with the training set .*{trained[0]}"):
        restore_and_choose(config, overlapping)
    # a dev family with no item at all
    empty = _dev_family(tmp_path / "empty")
    family_json = json.loads((empty / "family.json").read_text())
    family_json["items"] = {group: dict.fromkeys(counts, 0)
                            for group, counts in family_json["items"].items()}
    (empty / "family.json").write_text(json.dumps(family_json))
    with pytest.raises(UserError, match="every bucket of the dev family tinydev is empty"):
        restore_and_choose(config, empty)
    # annotated facts without a dev split (the shipped annotations less their dev file)
    no_dev = tmp_path / "no-dev"
    shutil.copytree(shipped_annotated(), no_dev)
    (no_dev / "facts" / "dev.jsonl").unlink()
    probe_config = json.loads((no_dev / "probe_config.json").read_text())
    del probe_config["files"]["dev"]
    probe_config["facts"] = sum(1 for f in load_annotated(shipped_annotated())[0] if f.split != "dev")
    (no_dev / "probe_config.json").write_text(json.dumps(probe_config))
    with pytest.raises(UserError, match="no facts of split dev"):
        restore_and_choose(config, no_dev)
    # a backend this machine cannot run
    family = _dev_family(tmp_path / "dev")
    with pytest.raises(UserError, match="backend 'vllm' is not usable here"):
        restore_and_choose(config, family, choose.EvalSettings(backend="vllm"))
    assert not (tmp_path / "out" / "top5").exists()


class _KnowsSomeSubjects:
    """A scripted lm-eval model: always answers the object for the subjects it knows, else
    something wrong (so known facts probe as D4 and the rest as D0)."""

    def __init__(self, known: dict[str, str]) -> None:
        self.known = known

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            prompt = request.args[0].split("\n")[-1]
            answer = next((obj for subject, obj in self.known.items() if subject in prompt), None)
            outputs.append(f" {answer}" if answer else " nowhere in particular")
        return outputs


def test_entity_questions_dev_split_probes_and_writes_a_dev_family(tmp_path: Path) -> None:
    """The real files' dev/ split is annotated by the probe like any other split, and `tasks
    write --splits dev` turns it into the dev family --choose-on scores on."""
    from sftknow_eval.probe.requests import ProbeSettings
    from sftknow_eval.probe.run import ModelSpec, probe_facts
    from sftknow_eval.readers import load_facts

    fixture = Path(__file__).parent / "fixtures" / "entity_questions" / "dataset"
    facts = load_facts(fixture / "dev") + load_facts(fixture / "train")
    dev = [f for f in facts if f.split == "dev"]
    assert dev and {f.domain for f in dev} == {"in", "out"}
    known = {f.subject: f.object for f in dev[::2]}
    spec = ModelSpec(model="hf", model_args="pretrained=fake-org/fake", key="fake")
    probe_facts(facts, spec, tmp_path / "annotated", ProbeSettings(templates=2, samples=2),
                lm=_KnowsSomeSubjects(known), progress=False, save_dataset=False)
    assert (tmp_path / "annotated" / "facts" / "dev.jsonl").is_file()
    assert main(["tasks", "write", "--annotated", str(tmp_path / "annotated"), "--name", "eqdev",
                 "--splits", "dev", "--out", str(tmp_path / "family")]) == 0
    folder, name = choose.dev_family(tmp_path / "family", tmp_path / "unused")
    items = json.loads((folder / "family.json").read_text())["items"]
    assert name == "eqdev" and sum(items["eqdev_id"].values()) == sum(f.domain == "in" for f in dev)
    assert items["eqdev_id"]["D4"] > 0 and items["eqdev_id"]["D0"] > 0
    # the same through annotated facts directly: the family is written from their dev split
    folder, name = choose.dev_family(tmp_path / "annotated", tmp_path / "out")
    assert folder == tmp_path / "out" / "dev_family" and name == "sftknow_dev"
    assert choose._family_ids(folder) == {f.id for f in dev}
