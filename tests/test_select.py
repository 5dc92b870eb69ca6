"""SFT set selection: balance across relations, sizes, seeds, mixed sets, errors, file format."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from probe_helpers import FakeLM, make_fact

from sftknow_eval.errors import UserError
from sftknow_eval.probe.run import ModelSpec, probe_facts
from sftknow_eval.prompts import qa_completion, qa_prompt
from sftknow_eval.relations import IN_DOMAIN, OUT_OF_DOMAIN
from sftknow_eval.select.balance import balanced_quotas, equal_shares
from sftknow_eval.select.sets import (
    meta_path,
    parse_categories,
    parse_size,
    select_facts,
    select_sft_set,
)


def pool(sizes: dict[str, dict[str, int]]) -> list:
    """Facts with given category counts per relation: {relation: {category: n}}."""
    facts, index = [], 0
    for relation, per_category in sizes.items():
        for category, count in per_category.items():
            for _ in range(count):
                facts.append(make_fact(index, relation, category=category))
                index += 1
    return facts


EVEN = {r: {"D0": 30, "D2": 30, "D4": 5} for r in IN_DOMAIN}


def test_equal_shares_and_water_filling() -> None:
    rng = random.Random(0)
    assert sorted(equal_shares(7, ["a", "b", "c"], rng).values()) == [2, 2, 3]
    quotas = balanced_quotas({"a": 2, "b": 100, "c": 100}, 60, random.Random(0))
    assert quotas == {"a": 2, "b": 29, "c": 29}
    with pytest.raises(ValueError):
        balanced_quotas({"a": 1}, 2, rng)


def test_balanced_across_in_domain_relations() -> None:
    facts = pool(EVEN) + pool({r: {"D2": 40} for r in OUT_OF_DOMAIN[:3]})
    selection = select_facts(facts, "base", ["D2"], 240, seed=0)
    assert len(selection.facts) == 240
    assert set(selection.per_relation) == set(IN_DOMAIN)
    assert set(selection.per_relation.values()) == {24}
    assert all(f.category("base") == "D2" and f.split == "train" for f in selection.facts)
    odd = select_facts(facts, "base", ["D2"], 65, seed=0)
    assert sorted(Counter(odd.per_relation.values()).items()) == [(6, 5), (7, 5)]


def test_short_relation_is_water_filled() -> None:
    sizes = {r: {"D1": 30} for r in IN_DOMAIN}
    sizes[IN_DOMAIN[0]] = {"D1": 2}
    selection = select_facts(pool(sizes), "base", ["D1"], 200, seed=3)
    assert selection.per_relation[IN_DOMAIN[0]] == 2
    assert sum(selection.per_relation.values()) == 200
    assert max(selection.per_relation.values()) - min(
        v for r, v in selection.per_relation.items() if r != IN_DOMAIN[0]) <= 1


def test_seeds() -> None:
    facts = pool(EVEN)
    a = [f.id for f in select_facts(facts, "base", ["D0"], 60, seed=0).facts]
    b = [f.id for f in select_facts(list(reversed(facts)), "base", ["D0"], 60, seed=0).facts]
    c = [f.id for f in select_facts(facts, "base", ["D0"], 60, seed=1).facts]
    assert a == b and set(a) != set(c)


def test_size_larger_than_category() -> None:
    facts = pool(EVEN)  # D4: 5 per relation, 50 in all
    with pytest.raises(UserError, match="category D4 holds 50 facts .* but 60 were asked for"):
        select_facts(facts, "base", ["D4"], 60, seed=0)
    smaller = select_facts(facts, "base", ["D4"], 60, seed=0, allow_smaller=True)
    assert len(smaller.facts) == 50 and smaller.per_category == {"D4": 50}


def test_all_and_mixed() -> None:
    facts = pool(EVEN)
    everything = select_facts(facts, "base", ["D0"], "all", seed=0)
    assert len(everything.facts) == 300
    mixed = select_facts(facts, "base", ["D0", "D4"], 60, seed=0)
    assert mixed.per_category == {"D0": 30, "D4": 30}
    assert set(mixed.per_relation.values()) == {6}
    assert parse_categories("mixed", "ye2025") == ["D0", "D1", "D2", "D3", "D4"]
    assert parse_categories("D0, D4", "ye2025") == ["D0", "D4"]


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="unknown category 'D7'"):
        parse_categories("D7", "ye2025")
    with pytest.raises(UserError, match="HighlyKnown"):
        parse_categories("D1", "slick")
    with pytest.raises(UserError, match="integer or 'all'"):
        parse_size("lots")
    with pytest.raises(UserError, match="at least 1"):
        parse_size("0")
    assert [parse_size(s) for s in ("60", 1920, "ALL")] == [60, 1920, "all"]


def test_select_from_annotated_folder(tmp_path: Path) -> None:
    facts = [make_fact(i * 10 + j, r, known=[0, 3, 10][j % 3])
             for i, r in enumerate(IN_DOMAIN) for j in range(9)]
    facts.append(make_fact(999, "P26", split="test", known=10))
    spec = ModelSpec(model_args="pretrained=org/base", key="org/base")
    probe_facts(facts, spec, tmp_path / "ann", lm=FakeLM(), progress=False)
    out = tmp_path / "sets" / "d4-20.jsonl"
    rows, meta = select_sft_set(tmp_path / "ann", "D4", 20, 0, out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows and len(rows) == 20
    by_id = {f.id: f for f in facts}
    for row in rows:
        fact = by_id[row["id"]]
        assert row == {"prompt": qa_prompt(fact.question), "completion": qa_completion(fact.object),
                       "id": fact.id, "relation": fact.relation, "category": "D4"}
    sidecar = json.loads(meta_path(out).read_text())
    assert sidecar == meta
    assert {k: sidecar[k] for k in ("category", "size_requested", "size", "seed", "source",
                                    "base_model", "scheme")} == {
        "category": "D4", "size_requested": 20, "size": 20, "seed": 0,
        "source": str(tmp_path / "ann"), "base_model": "org/base", "scheme": "ye2025"}
    with pytest.raises(UserError, match="--allow-smaller"):
        select_sft_set(tmp_path / "ann", "D4", 31, 0, tmp_path / "big.jsonl")
    assert not (tmp_path / "big.jsonl").exists()
    _, small = select_sft_set(tmp_path / "ann", "D4", 31, 0, tmp_path / "big.jsonl", allow_smaller=True)
    assert small["size_requested"] == 31 and small["size"] == 30
    with pytest.raises(UserError, match="not a probe output folder"):
        select_sft_set(tmp_path / "sets", "D4", 20, 0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sftknow_eval.cli import main

    facts = [make_fact(i * 10 + j, r, known=[0, 10][j % 2]) for i, r in enumerate(IN_DOMAIN)
             for j in range(4)]
    probe_facts(facts, ModelSpec(model_args="pretrained=x/y"), tmp_path / "ann", lm=FakeLM(),
                progress=False)
    out = tmp_path / "d0.jsonl"
    assert main(["select", "--annotated", str(tmp_path / "ann"), "--category", "D0", "--size", "10",
                 "--seed", "2", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 10
    assert main(["select", "--annotated", str(tmp_path / "ann"), "--category", "D9", "--size", "10",
                 "--out", str(out)]) == 2
    assert "unknown category 'D9'" in capsys.readouterr().err
