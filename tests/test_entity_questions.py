"""EntityQuestions: the real files load whole, and `sftknow-eval data entity-questions` fetches
them (from a zip of the fixture excerpt, served on 127.0.0.1) atomically, refusing bad archives."""

from __future__ import annotations

import functools
import io
import json
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sftknow_eval import cli
from sftknow_eval.data import entity_questions as eq
from sftknow_eval.errors import FactFormatError, UserError
from sftknow_eval.readers import load_facts, read_entity_questions_file
from sftknow_eval.relations import IN_DOMAIN, RELATIONS

FIXTURE = Path(__file__).parent / "fixtures" / "entity_questions"
SPLITS = ("train", "dev", "test")
ROWS_PER_FILE = 3
FIXTURE_COUNTS = {pid: dict.fromkeys(SPLITS, ROWS_PER_FILE) for pid in RELATIONS}

# The first training row of every relation, read from the real files:
# (relation, subject, object, aliases).
FIRST_TRAIN_ROWS = [
    ("P17", "Painblanc", "France", ["France"]),
    ("P19", "Donnie Neuenberger", "Brandywine", ["Brandywine"]),
    ("P20", "Leone Emanuele Bardare", "Naples", ["Naples"]),
    ("P26", "Umberto I of Italy", "Margherita of Savoy", ["Margherita of Savoy"]),
    ("P36", "Pennsylvania", "Harrisburg", ["Harrisburg"]),
    ("P40", "Shlomo Zalman Auerbach", "Ezriel Auerbach", ["Ezriel Auerbach"]),
    ("P50", "The Elenium", "David Eddings", ["David Eddings"]),
    ("P69", "Henry Howard, 19th Earl of Suffolk", "Winchester College", ["Winchester College"]),
    ("P106", "Vidar Kleppe", "politician", ["politician"]),
    ("P112", "Hudson Institute", "Herman Kahn", ["Herman Kahn"]),
    ("P127", "Nintendo Software Technology", "Nintendo", ["Nintendo"]),
    ("P131", "Vendelsömalm", "Haninge Municipality", ["Haninge Municipality"]),
    ("P136", "Switch On!", "J-pop", ["J-pop"]),
    ("P159", "Pyrrha Jewelry", "Vancouver", ["Vancouver"]),
    ("P170", "Adoration of the Shepherds", "Le Nain Brothers", ["Le Nain Brothers"]),
    ("P175", "Bicho", "Caetano Veloso", ["Caetano Veloso"]),
    ("P176", "Hudson Hornet", "Hudson Motor Car Company", ["Hudson Motor Car Company"]),
    ("P264", "Lloyd Thaxton Goes Surfing with The Challengers", "Sundazed Records",
     ["Sundazed Records"]),
    ("P276", "Landscape with Philemon and Baucis", "Kunsthistorisches Museum",
     ["Kunsthistorisches Museum"]),
    ("P407", "The Times", "English", ["English"]),
    ("P413", "Raquel Cabezón", "midfielder", ["midfielder"]),
    ("P495", "Embrace of the Vampire", "United States of America", ["United States of America"]),
    ("P740", "Società Italiana Ernesto Breda", "Milan", ["Milan"]),
    ("P800", "James Leslie Mitchell", "Sunset Song", ["Sunset Song"]),
]

# Rows with several answers (the first is the object, all are accepted), from the real files.
MULTI_ANSWER_ROWS = [
    ("P26", "dev", "Abraham", "Hagar", ["Hagar", "Sarah", "Keturah"]),
    ("P131", "dev", "Kathiramangalam, Thanjavur district", "Thanjavur district",
     ["Thanjavur district", "Tamil Nadu"]),
    ("P112", "train", "Cadillac", "Henry M. Leland", ["Henry M. Leland", "Henry Ford"]),
    ("P800", "test", "Jean Racine", "Andromaque",
     ["Andromaque", "Esther", "Athalie", "Les Plaideurs", "Alexandre le Grand", "Berenice"]),
]


def _facts(split: str) -> list:
    return load_facts(FIXTURE / "dataset" / split)  # skip_bad is off: any bad row raises


# --------------------------------------------------------------------------------------------
# Reading the real files


@pytest.mark.parametrize("split", SPLITS)
def test_every_relation_of_every_split_loads_with_no_rejection(split):
    files = sorted((FIXTURE / "dataset" / split).glob(f"P*.{split}.json"))
    assert len(files) == len(RELATIONS)
    facts = _facts(split)
    assert Counter(f.relation for f in facts) == dict.fromkeys(RELATIONS, ROWS_PER_FILE)
    raw = {path.name.split(".")[0]: json.loads(path.read_text(encoding="utf-8")) for path in files}
    for relation in RELATIONS:
        rows = raw[relation]
        loaded = [f for f in facts if f.relation == relation]
        for row, fact in zip(rows, loaded, strict=True):
            assert fact.question == row["question"] and fact.split == split
            assert fact.object == row["answers"][0] and fact.aliases == row["answers"]
            assert fact.domain == ("in" if relation in IN_DOMAIN else "out")
            # The subject is exactly what fills the relation's (real) template.
            assert any(t.format(subject=fact.subject) == row["question"]
                       for t in RELATIONS[relation].questions)


@pytest.mark.parametrize(("relation", "subject", "obj", "aliases"), FIRST_TRAIN_ROWS)
def test_first_training_row_of_each_relation(relation, subject, obj, aliases):
    fact = read_entity_questions_file(FIXTURE / "dataset" / "train" / f"{relation}.train.json")[0]
    assert (fact.relation, fact.subject, fact.object, fact.aliases) == (relation, subject, obj, aliases)
    assert fact.id == f"{relation}.train.000000"
    assert fact.meta["answer_count"] == 1


@pytest.mark.parametrize(("relation", "split", "subject", "obj", "aliases"), MULTI_ANSWER_ROWS)
def test_rows_with_several_answers_accept_them_all(relation, split, subject, obj, aliases):
    fact = next(f for f in _facts(split) if f.relation == relation and f.subject == subject)
    assert (fact.object, fact.aliases, fact.meta["answer_count"]) == (obj, aliases, len(aliases))


def test_p159_reads_the_real_wording_and_still_writes_ours(tmp_path):
    p159 = RELATIONS["P159"]
    assert p159.subject_from_question("Where is the headquarter of Monocar?") == "Monocar"
    assert p159.subject_from_question("Where is the headquarters of Monocar?") == "Monocar"
    assert p159.question_for("Monocar") == "Where is the headquarters of Monocar?"
    assert all(len(r.questions) == 1 for pid, r in RELATIONS.items() if pid != "P159")
    path = tmp_path / "P159.dev.json"
    path.write_text(json.dumps([{"question": "Where is the HQ of Monocar?", "answers": ["Kyiv"]}]))
    with pytest.raises(FactFormatError, match="P159 templates 'Where is the headquarters of "
                       r"\{subject\}\?' or 'Where is the headquarter of \{subject\}\?'"):
        read_entity_questions_file(path)


def test_answers_inside_the_question_are_flagged():
    flagged = {(f.split, f.relation, f.subject) for split in SPLITS for f in _facts(split)
               if f.meta["answer_in_question"]}
    assert ("train", "P36", "Quilmes Partido") in flagged          # -> Quilmes
    assert ("train", "P127", "Nintendo Software Technology") in flagged  # -> Nintendo
    assert ("dev", "P159", "Littleton Coin Company") in flagged     # -> Littleton
    assert ("train", "P17", "Painblanc") not in flagged
    assert ("train", "P36", "Pennsylvania") not in flagged          # -> Harrisburg
    assert len(flagged) == 14


# --------------------------------------------------------------------------------------------
# The paper's filter


def test_paper_keep_drops_several_answers_then_repeated_questions():
    rows = [("a", 1), ("b", 2), ("a", 1), ("c", 1), ("b", 1), ("c", 3)]
    assert eq.paper_keep(rows) == [True, False, False, True, True, False]


def test_paper_subset_per_split_and_needs_entity_questions_facts():
    facts = [f for split in SPLITS for f in _facts(split)]
    kept = eq.paper_subset(facts)
    assert len(kept) == sum(f.meta["answer_count"] == 1 for f in facts) == len(facts) - 11
    assert all(f.meta["answer_count"] == 1 for f in kept)
    twin = facts[0]
    copy = type(twin)(**{**twin.to_dict(), "id": "copy"})
    assert [f.id for f in eq.paper_subset([twin, copy])] == [twin.id]  # same split: once
    other_split = type(twin)(**{**twin.to_dict(), "id": "other", "split": "dev"})
    assert len(eq.paper_subset([twin, other_split])) == 2
    with pytest.raises(UserError, match="meta.answer_count"):
        eq.paper_subset([type(twin)(**{**twin.to_dict(), "meta": {}})])


# --------------------------------------------------------------------------------------------
# The data command


def _zip_fixture(path: Path, *, drop: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like the official archive: dataset/<split>/P*.<split>.json (+ extras)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted((FIXTURE / "dataset").rglob("P*.json")):
            name = f"dataset/{file.parent.name}/{file.name}"
            if name != drop:
                archive.write(file, name)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 (ephemeral port): (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_command_downloads_checks_and_writes_the_readers_layout(served, tmp_path, monkeypatch, capsys):
    root, base = served
    _zip_fixture(root / "dataset.zip", extra={
        "dataset/one-off/similar/P19/P19_similar.train.json": b"[]",
        "__MACOSX/dataset/train/._P17.train.json": b"\x00\x05",
    })
    monkeypatch.setattr(eq, "OFFICIAL_COUNTS", FIXTURE_COUNTS)  # the CLI checks against this table
    out = tmp_path / "data" / "entity_questions"
    assert cli.main(["data", "entity-questions", "--out", str(out), "--url", f"{base}/dataset.zip"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dev", "manifest.json", "test", "train"]
    assert _leftovers(out.parent) == ["entity_questions"]  # no temporary folder left beside it
    for split in SPLITS:
        for file in (FIXTURE / "dataset" / split).glob("*.json"):
            assert (out / split / file.name).read_bytes() == file.read_bytes()  # the archive's bytes
    train = load_facts(out / "train")
    assert len(train) == 72 and Counter(f.relation for f in train) == dict.fromkeys(RELATIONS, 3)
    assert len(load_facts(out)) == 216  # the whole folder: every split
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    in_domain = 3 * len(IN_DOMAIN)
    assert manifest["counts"]["train"] == {
        "in_domain": in_domain, "out_of_domain": 72 - in_domain, "total": 72, "raw_total": 72,
        "answer_in_question_in_domain": sum(f.meta["answer_in_question"] for f in train
                                            if f.domain == "in")}
    assert manifest["source"] == f"{base}/dataset.zip" and manifest["license"] == "MIT"
    assert len(manifest["archive_sha256"]) == 64 and len(manifest["files"]) == 72
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert eq.COPYRIGHT in readme and manifest["archive_sha256"] in readme
    assert f"train  {in_domain:>10,} {72 - in_domain:>14,} {72:>9,}" in printed
    assert "answer already in the question (meta.answer_in_question)" in printed

    # An existing non-empty output is kept unless --force.
    assert cli.main(["data", "entity-questions", "--out", str(out), "--url", f"{base}/dataset.zip"]) == 2
    assert "--force" in capsys.readouterr().err
    (out / "mine.txt").write_text("x")
    assert cli.main(["data", "entity-questions", "--out", str(out), "--url", f"{base}/dataset.zip",
                     "--force", "--paper-filter"]) == 0
    assert not (out / "mine.txt").exists()
    kept = load_facts(out / "train")
    assert len(kept) == 72 - 2 and all(f.meta["answer_count"] == 1 for f in kept)  # 2 multi-answer
    assert json.loads((out / "manifest.json").read_text())["filter"] == "paper"


def test_official_counts_are_checked(tmp_path, capsys):
    """The real table (not patched) rejects the 3-row excerpt: every file's count is named."""
    assert sum(sum(c.values()) for c in eq.OFFICIAL_COUNTS.values()) == 176560 + 22068 + 22075
    archive = _zip_fixture(tmp_path / "small.zip")
    out = tmp_path / "new" / "eq"
    assert cli.main(["data", "entity-questions", "--out", str(out), "--url", str(archive)]) == 2
    error = capsys.readouterr().err
    assert "row counts differ" in error and "P17.train.json has 3 rows, expected 8000" in error
    assert not (tmp_path / "new").exists()


def _expect_failure(tmp_path: Path, url: str, message: str, **kwargs) -> None:
    out = tmp_path / "fresh" / "eq"
    with pytest.raises(UserError, match=message):
        eq.fetch_entity_questions(out, url=url, expected_counts=FIXTURE_COUNTS, progress=False, **kwargs)
    assert not (tmp_path / "fresh").exists()  # not even the parent it created


def test_bad_downloads_and_archives_leave_nothing(served, tmp_path):
    root, base = served
    good = _zip_fixture(root / "good.zip").read_bytes()
    _expect_failure(tmp_path, f"{base}/absent.zip", r"could not download .*404")
    (root / "notzip.zip").write_bytes(b"<html>not found</html>")
    _expect_failure(tmp_path, f"{base}/notzip.zip", "not a readable zip archive")
    (root / "cut.zip").write_bytes(good[: len(good) // 2])  # an interrupted download
    _expect_failure(tmp_path, f"{base}/cut.zip", "not a readable zip archive")
    _zip_fixture(root / "partial.zip", drop="dataset/dev/P17.dev.json")
    _expect_failure(tmp_path, f"{base}/partial.zip", r"1 of the 72 relation files are missing \(dev/P17")
    kept = tmp_path / "kept"  # --force replaces an output only with a complete new one
    (kept / "train").mkdir(parents=True)
    (kept / "train" / "P17.train.json").write_text("[]")
    with pytest.raises(UserError, match="missing"):
        eq.fetch_entity_questions(kept, url=f"{base}/partial.zip", force=True,
                                  expected_counts=FIXTURE_COUNTS, progress=False)
    assert _leftovers(kept) == ["train"] and _leftovers(tmp_path).count("kept") == 1
    assert not [name for name in _leftovers(tmp_path) if name.startswith(".kept")]


def test_damaged_member_and_bad_rows_are_named(tmp_path):
    plain = io.BytesIO()
    with zipfile.ZipFile(plain, "w", zipfile.ZIP_STORED) as archive:  # stored: bytes findable
        for file in sorted((FIXTURE / "dataset").rglob("P*.json")):
            archive.write(file, f"dataset/{file.parent.name}/{file.name}")
    data = bytearray(plain.getvalue())
    spot = data.index(b"Painblanc")
    data[spot:spot + 9] = b"Pointblan"  # same length, wrong CRC
    (tmp_path / "crc.zip").write_bytes(bytes(data))
    _expect_failure(tmp_path, str(tmp_path / "crc.zip"), r"cannot read dataset/train/P17.train.json")

    bad_rows = json.dumps([{"question": "Where is Paris?", "answers": ["France"]}] * 3).encode()
    archive = _zip_fixture(tmp_path / "rows.zip", drop="dataset/test/P17.test.json",
                           extra={"dataset/test/P17.test.json": bad_rows})
    _expect_failure(tmp_path, archive.as_uri(),
                    r"dataset/test/P17.test.json, item 1, field 'question': does not match")
    with pytest.raises(UserError, match="http"):
        eq.fetch_entity_questions(tmp_path / "x", url="ftp://example.org/dataset.zip")


def test_local_zip_path_and_file_url(tmp_path):
    archive = _zip_fixture(tmp_path / "dataset.zip")
    for index, url in enumerate([str(archive), archive.as_uri()]):
        out = tmp_path / f"out{index}"
        manifest = eq.fetch_entity_questions(out, url=url, expected_counts=FIXTURE_COUNTS, progress=False)
        assert manifest["counts"]["dev"]["total"] == 72
        assert len(load_facts(out / "dev")) == 72
