"""Readers of fact sources: EntityQuestions files, our jsonl, and datasets; errors on bad rows."""

import json
import logging

import datasets
import pytest

from sftknow_eval.errors import FactFormatError
from sftknow_eval.facts import Fact, read_jsonl, write_jsonl
from sftknow_eval.readers import load_facts, read_entity_questions_file
from sftknow_eval.relations import IN_DOMAIN, OUT_OF_DOMAIN, RELATIONS


def test_relations_match_the_paper_split():
    assert len(RELATIONS) == 24
    assert set(IN_DOMAIN) == {"P17", "P19", "P20", "P36", "P69", "P131", "P159", "P276",
                              "P495", "P740"}
    assert len(OUT_OF_DOMAIN) == 14
    for relation in RELATIONS.values():
        assert len(relation.mapping_templates) >= 8
        assert all("{subject}" in t for t in relation.mapping_templates)
        assert len(set(relation.mapping_templates)) == len(relation.mapping_templates)
        assert relation.templates(3) == relation.mapping_templates[:3]


def _write(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_entity_questions_json_recovers_subjects(tmp_path):
    path = _write(tmp_path / "P17.train.json", [
        {"question": "Which country is Eiffel Tower located in?", "answers": ["France"]},
        {"question": "Which country is Harvard University located in?",
         "answers": ["United States of America", "USA"]},
    ])
    facts = read_entity_questions_file(path)
    assert [f.subject for f in facts] == ["Eiffel Tower", "Harvard University"]
    assert facts[1].object == "United States of America"
    assert facts[1].aliases == ["United States of America", "USA"]
    assert {f.split for f in facts} == {"train"} and {f.domain for f in facts} == {"in"}
    assert facts[0].relation == "P17"


def test_entity_questions_jsonl_and_folder(tmp_path):
    folder = tmp_path / "eq" / "test"
    folder.mkdir(parents=True)
    (folder / "P40.test.jsonl").write_text(
        json.dumps({"question": "Who is Ada Lovelace's child?", "answers": ["Byron King"]}) + "\n",
        encoding="utf-8",
    )
    _write(folder / "P19.test.json", [{"question": "Where was Ada Lovelace born?",
                                       "answers": ["London"]}])
    facts = load_facts(tmp_path / "eq")
    assert {(f.relation, f.subject, f.domain) for f in facts} == {
        ("P40", "Ada Lovelace", "out"), ("P19", "Ada Lovelace", "in")}


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"answers": ["France"]}, "question", "missing field"),
        ({"question": "Which country is X located in?"}, "answers", "missing field"),
        ({"question": "Which country is X located in?", "answers": "France"}, "answers",
         "expected list"),
        ({"question": "Which country is X located in?", "answers": []}, "answers", "empty"),
        ({"question": "Which country is X located in?", "answers": [""]}, "answers", "non-empty"),
        ({"question": "Where was X born?", "answers": ["Paris"]}, "question", "does not match"),
        ({"question": 7, "answers": ["Paris"]}, "question", "non-empty string"),
    ],
)
def test_entity_questions_bad_rows_name_file_line_and_field(tmp_path, row, field, problem):
    path = tmp_path / "P17.dev.jsonl"
    good = {"question": "Which country is Y located in?", "answers": ["Spain"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(FactFormatError) as caught:
        read_entity_questions_file(path)
    message = str(caught.value)
    assert str(path) in message and "line 2" in message and f"field '{field}'" in message
    assert problem in message


def test_skipping_bad_rows_is_explicit_and_counted(tmp_path, caplog):
    path = tmp_path / "P17.dev.jsonl"
    path.write_text(
        json.dumps({"question": "Which country is Y located in?", "answers": ["Spain"]}) + "\n"
        + json.dumps({"question": "Which country is Z located in?", "answers": []}) + "\n"
        + "{not json\n",
        encoding="utf-8",
    )
    with pytest.raises(FactFormatError, match="line 2"):
        load_facts(path)
    with caplog.at_level(logging.WARNING):
        facts = load_facts(path, skip_bad=True)
    assert len(facts) == 1
    assert "skipped 2 malformed row(s)" in caplog.text


def test_json_list_reports_item_number(tmp_path):
    path = _write(tmp_path / "P17.train.json", [
        {"question": "Which country is A located in?", "answers": ["Spain"]},
        {"question": "Which country is B located in?"},
    ])
    with pytest.raises(FactFormatError, match=r"item 2, field 'answers'"):
        read_entity_questions_file(path)


def _fact(index: int, **changes) -> Fact:
    fact = Fact(id=f"P17-{index}", relation="P17", subject=f"S{index}", object="Tessia",
                aliases=["Tessia", "Republic of Tessia"],
                question=f"Which country is S{index} located in?", split="train", domain="in",
                meta={"exposure": index})
    for key, value in changes.items():
        setattr(fact, key, value)
    return fact


def test_jsonl_round_trip(tmp_path):
    facts = [_fact(1), _fact(2, mastery={"tiny": {"score": 0.5, "category": "D2"}})]
    path = write_jsonl(facts, tmp_path / "facts.jsonl")
    assert read_jsonl(path) == facts
    assert load_facts(path)[1].category("tiny") == "D2"
    assert not list(tmp_path.glob(".facts.jsonl.*"))  # no temp file left behind


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("subject"), "subject"),
        (lambda r: r.update(aliases="Tessia"), "aliases"),
        (lambda r: r.update(relation="P9999"), "relation"),
        (lambda r: r.update(domain="sideways"), "domain"),
        (lambda r: r.update(object=""), "object"),
        (lambda r: r.update(mastery=[]), "mastery"),
    ],
)
def test_jsonl_bad_rows(tmp_path, change, field):
    row = _fact(1).to_dict()
    change(row)
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(_fact(0).to_dict()) + "\n" + json.dumps(row) + "\n",
                    encoding="utf-8")
    with pytest.raises(FactFormatError, match=rf"line 2, field '{field}'"):
        read_jsonl(path)


def test_jsonl_duplicate_ids_and_bad_json(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(_fact(1).to_dict()) + "\n" + json.dumps(_fact(1).to_dict()) + "\n")
    with pytest.raises(FactFormatError, match="line 2, field 'id': duplicate"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(FactFormatError, match="line 1: expected a JSON object"):
        read_jsonl(path)


def test_object_is_always_an_alias(tmp_path):
    row = _fact(1).to_dict()
    row["aliases"] = ["Republic of Tessia"]
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert read_jsonl(path)[0].aliases == ["Tessia", "Republic of Tessia"]


def test_datasets_in_memory_and_on_disk(tmp_path):
    rows = [_fact(i).to_dict() for i in range(3)]
    for row in rows:
        row["meta"] = json.dumps(row["meta"])  # Arrow-friendly: nested dicts kept as JSON text
        row["mastery"] = json.dumps(row["mastery"])
    dataset = datasets.Dataset.from_list(rows)
    facts = load_facts(dataset)
    assert [f.id for f in facts] == ["P17-0", "P17-1", "P17-2"]
    assert facts[2].meta == {"exposure": 2}
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_facts(tmp_path / "saved") == facts
    broken = datasets.Dataset.from_list([{**rows[0], "relation": "nope"}])
    with pytest.raises(FactFormatError, match=r"row 0, field 'relation'"):
        load_facts(broken)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_facts(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no facts"):
        load_facts(tmp_path / "empty")
