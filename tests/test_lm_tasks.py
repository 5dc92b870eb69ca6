"""lm-eval task families: scoring, the unweighted group mean, empty buckets, and the results
table parsed from a real lm-eval run of the stock `lm_eval` command on the tiny model."""

import json
import os
import subprocess
import sys

import pytest
from probe_helpers import bucketed_test_facts

from sftknow_eval.errors import UserError
from sftknow_eval.lm_tasks.card_results import merge_results
from sftknow_eval.lm_tasks.family import write_family
from sftknow_eval.lm_tasks.results import collect, render
from sftknow_eval.lm_tasks.scoring import process_results
from sftknow_eval.world.shipped import model_path

BUCKETS = ("D0", "D1", "D2", "D3", "D4")


def test_scoring_on_hand_made_samples():
    doc = {"aliases": ["Tessia", "Republic of Tessia"]}
    assert process_results(doc, [" tessia"]) == {"acc": 1, "acc_per_item": 1, "exact_match": 1}
    assert process_results(doc, ["it is the republic of tessia."]) == {
        "acc": 1, "acc_per_item": 1, "exact_match": 0}
    assert process_results(doc, ["tessiana"]) == {"acc": 0, "acc_per_item": 0, "exact_match": 0}
    assert process_results(doc, [""]) == {"acc": 0, "acc_per_item": 0, "exact_match": 0}
    assert process_results({"aliases": ["United States of America"]}, ["USA"])["exact_match"] == 1


def test_empty_bucket_is_absent_not_zero(tmp_path):
    facts = bucketed_test_facts({"D0": 2, "D2": 3, "D4": 1})
    summary = write_family(facts, "tiny", "ye2025", BUCKETS, "fam", tmp_path / "fam")
    assert summary["groups"]["fam_id"] == ["D0", "D2", "D4"]
    assert summary["items"]["fam_id"]["D1"] == 0
    group = (tmp_path / "fam" / "_fam_id.yaml").read_text()
    assert "absent_buckets:\n  - D1\n  - D3" in group
    assert not (tmp_path / "fam" / "fam_id_D1.yaml").exists()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path / "fam"))
    assert {"fam", "fam_id", "fam_ood", "fam_id_D0", "fam_ood_D4"} <= set(manager.all_tasks)


def test_bad_annotations_are_refused(tmp_path):
    facts = bucketed_test_facts({"D0": 2})
    facts[1].mastery = {}
    with pytest.raises(UserError, match="no mastery category"):
        write_family(facts, "tiny", "ye2025", BUCKETS, "fam", tmp_path / "x")
    facts[1].mastery = {"tiny": {"category": "D9"}}
    with pytest.raises(UserError, match="not one of the ye2025 buckets"):
        write_family(facts, "tiny", "ye2025", BUCKETS, "fam", tmp_path / "x")
    with pytest.raises(UserError, match="family name"):
        write_family(facts, "tiny", "ye2025", BUCKETS, "bad-name!", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """The stock lm_eval CLI, run from an unrelated working directory, on a small family with
    unequal bucket sizes (so the unweighted and the per-item means differ)."""
    root = tmp_path_factory.mktemp("lmeval")
    facts = bucketed_test_facts({"D0": 3, "D1": 5, "D3": 9, "D4": 12})
    write_family(facts, "tiny", "ye2025", BUCKETS, "famx", root / "tasks" / "famx")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={model_path()},dtype=float32", "--device", "cpu", "--batch_size", "8",
               "--include_path", str(root / "tasks" / "famx"), "--tasks", "famx",
               "--output_path", str(root / "out"), "--log_samples"]
    done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out"


def test_group_acc_is_the_unweighted_bucket_mean(lm_eval_run):
    results_file = next(lm_eval_run.rglob("results_*.json"))
    data = json.loads(results_file.read_text())
    results = data["results"]
    for domain in ("id", "ood"):
        buckets = {b: results[f"famx_{domain}_{b}"]["acc,none"] for b in ("D0", "D1", "D3", "D4")}
        sizes = {"D0": 3, "D1": 5, "D3": 9, "D4": 12}
        macro = sum(buckets.values()) / 4
        micro = sum(buckets[b] * sizes[b] for b in buckets) / sum(sizes.values())
        assert results[f"famx_{domain}"]["acc,none"] == pytest.approx(macro)
        assert results[f"famx_{domain}"]["acc_per_item,none"] == pytest.approx(micro)


def test_lm_eval_prompts_are_the_sft_prompt_and_targets_the_answer(lm_eval_run):
    """The family's doc_to_text / doc_to_target hooks give lm-eval exactly the prompt SFT
    trained on and the fact's answer."""
    from sftknow_eval.prompts import qa_prompt

    records = [json.loads(line) for path in lm_eval_run.rglob("samples_famx_id_D3_*.jsonl")
               for line in path.read_text().splitlines() if line]
    assert len(records) == 9
    for record in records:
        context = record["arguments"]["gen_args_0"]["arg_0"]
        assert context == qa_prompt(record["doc"]["question"])
        assert context.startswith("<|question|> ") and context.endswith(" <|answer|>")
        assert record["target"] == record["doc"]["answer"]


def test_results_table_from_real_output(lm_eval_run, tmp_path):
    scores = collect([lm_eval_run])
    assert len(scores) == 1 and scores[0].family == "famx"
    score = scores[0]
    assert set(score.buckets["id"]) == {"D0", "D1", "D3", "D4"}
    assert score.items["id"] == {"D0": 3, "D1": 5, "D3": 9, "D4": 12}
    table = render(scores, "md").splitlines()
    assert table[0] == "| model | family | D0 | D1 | D2 | D3 | D4 | Acc | Acc OOD |"
    cells = table[2].split(" | ")
    assert cells[4] == "absent"  # D2 has no facts: absent, not 0
    assert float(cells[7]) == pytest.approx(100 * score.acc["id"], abs=0.01)
    csv_lines = render(scores, "csv").splitlines()
    assert csv_lines[0].startswith("model,family,D0") and len(csv_lines) == 2
    as_json = json.loads(render(scores, "json"))
    assert as_json[0]["acc"]["ood"] == score.acc["ood"]
    relations = {key.split(":")[1] for key in score.per_relation}
    assert relations and all(r.startswith("P") for r in relations)  # from the samples files

    from huggingface_hub import ModelCard, ModelCardData

    card = merge_results(ModelCard.from_template(ModelCardData()), scores, "tiny-base")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    names = {(r.dataset_type, r.metric_name): r.metric_value for r in loaded.data.eval_results}
    assert names[("famx_id", "Acc (mean over buckets)")] == round(100 * score.acc["id"], 2)
    assert ("famx_id", "Acc D2") not in names
    again = merge_results(loaded, scores, "tiny-base")  # rewriting replaces, never duplicates
    assert len(again.data.eval_results) == len(loaded.data.eval_results)


def test_card_add_results_on_folder_and_hub_repo(lm_eval_run, tmp_path, local_hub, tiny_model_dir):
    from huggingface_hub import ModelCard

    from sftknow_eval import hub
    from sftknow_eval.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    # the results are the tiny world model's: another model's card takes them only with --force
    assert main(["card", "add-results", "--results", str(lm_eval_run), "--model", str(folder)]) == 2
    assert main(["card", "add-results", "--results", str(lm_eval_run), "--model", str(folder),
                 "--force"]) == 0
    local = ModelCard.load(folder / "README.md")
    assert {r.metric_name for r in local.data.eval_results} >= {"Acc D0", "Acc (mean over buckets)"}

    hub.push_folder(tiny_model_dir, "study/carded")
    assert main(["card", "add-results", "--results", str(lm_eval_run), "--model",
                 "study/carded", "--force"]) == 0
    remote = ModelCard.load("study/carded")
    assert {r.dataset_type for r in remote.data.eval_results} == {"famx_id", "famx_ood"}


def test_shipped_tasks_folder_matches_the_shipped_annotations(tmp_path):
    """tasks/tiny is what `sftknow-eval tasks write --annotated shipped` writes, file for file."""
    from pathlib import Path

    from sftknow_eval.cli import main

    shipped = Path(__file__).resolve().parent.parent / "tasks" / "tiny"
    assert main(["tasks", "write", "--annotated", "shipped", "--name", "sftknow_tiny",
                 "--out", str(tmp_path / "tiny")]) == 0
    written = sorted(p.relative_to(tmp_path / "tiny") for p in (tmp_path / "tiny").rglob("*")
                     if p.is_file())
    assert written == sorted(p.relative_to(shipped) for p in shipped.rglob("*")
                             if p.is_file() and "__pycache__" not in p.parts)
    for relative in written:
        assert (shipped / relative).read_bytes() == (tmp_path / "tiny" / relative).read_bytes()


def test_tasks_write_from_a_hub_dataset(tmp_path, local_hub):
    """An annotated dataset pushed to the Hub is written into a task family by its repo id."""
    from sftknow_eval import hub
    from sftknow_eval.cli import main
    from sftknow_eval.probe.annotated import load_annotated, shipped_annotated

    hub.push_folder(shipped_annotated(), "study/tiny-mastery", repo_type="dataset")
    assert main(["tasks", "write", "--annotated", "study/tiny-mastery", "--name", "fromhub",
                 "--out", str(tmp_path / "fam")]) == 0
    family = json.loads((tmp_path / "fam" / "family.json").read_text())
    assert family["mastery_model"] == "tiny-world"
    in_domain_test = sum(f.split == "test" and f.domain == "in"
                         for f in load_annotated(shipped_annotated())[0])
    assert sum(family["items"]["fromhub_id"].values()) == in_domain_test == 1200


def test_unknown_scheme_is_refused(tmp_path):
    from sftknow_eval.cli import main
    from sftknow_eval.facts import write_jsonl

    facts = bucketed_test_facts({"D0": 2})
    write_jsonl(facts, tmp_path / "ann" / "facts" / "test.jsonl")
    (tmp_path / "ann" / "probe_config.json").write_text(json.dumps({
        "complete": True, "files": {"test": "facts/test.jsonl"}, "facts": len(facts),
        "model_key": "tiny", "scheme": "mystery"}))
    assert main(["tasks", "write", "--annotated", str(tmp_path / "ann"), "--name", "x",
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
