"""EntityQuestions (Sciavolino et al., EMNLP 2021): fetch the official archive into the layout
our readers read, check it, and the filter that reproduces the counts Ye et al. report.

``fetch_entity_questions(out)`` downloads ``dataset.zip`` (or reads a local copy), checks that
all 24 relations x 3 splits are there with the official row counts and that every row loads
with ``readers.read_entity_questions_file``, and writes ``out/{train,dev,test}/P*.<split>.json``
(the archive's bytes) plus ``README.md`` and ``manifest.json``, atomically: a failure leaves
nothing behind. ``paper_subset(facts)`` keeps what the paper counts (one answer per row, each
question once per split); ``paper_filter=True`` writes only those rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sftknow_eval.atomic import atomic_folder
from sftknow_eval.errors import FactFormatError, UserError
from sftknow_eval.facts import Fact
from sftknow_eval.relations import RELATIONS

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://nlp.cs.princeton.edu/projects/entity-questions/dataset.zip"
REPOSITORY = "https://github.com/princeton-nlp/EntityQuestions"
CITATION = ("Sciavolino, Zhong, Lee and Chen, Simple Entity-Centric Questions Challenge Dense "
            "Retrievers, EMNLP 2021")
LICENSE = "MIT"
COPYRIGHT = "Copyright (c) 2021 Princeton Natural Language Processing"
SPLITS: tuple[str, ...] = ("train", "dev", "test")
MANIFEST = "manifest.json"

# Rows per file of the official archive (train, dev, test), counted from its files.
_OFFICIAL = {
    "P17": (8000, 1000, 1000), "P19": (8000, 1000, 1000), "P20": (8000, 1000, 1000),
    "P26": (8000, 1000, 1000), "P36": (7084, 885, 886), "P40": (8000, 1000, 1000),
    "P50": (8000, 1000, 1000), "P69": (8000, 1000, 1000), "P106": (8000, 1000, 1000),
    "P112": (4072, 509, 510), "P127": (8000, 1000, 1000), "P131": (8000, 1000, 1000),
    "P136": (8000, 1000, 1000), "P159": (8000, 1000, 1000), "P170": (6952, 869, 870),
    "P175": (8000, 1000, 1000), "P176": (8000, 1000, 1000), "P264": (8000, 1000, 1000),
    "P276": (8000, 1000, 1000), "P407": (5162, 645, 646), "P413": (8000, 1000, 1000),
    "P495": (8000, 1000, 1000), "P740": (7527, 940, 942), "P800": (1763, 220, 221),
}
OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    pid: dict(zip(SPLITS, counts, strict=True)) for pid, counts in _OFFICIAL.items()
}

# What Ye et al. (2025) report for in-domain train / in-domain test / out-of-domain test.
PAPER_COUNTS = {"train_in": 75944, "test_in": 9555, "test_out": 11613}

_MEMBER = re.compile(r"^(?P<split>train|dev|test)/(?P<pid>P\d+)\.(?P=split)\.json$")
_SKIPPED_FOLDERS = ("__MACOSX", "one-off")
_CHUNK = 1 << 20

_MIT_NOTICE = """\
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


# --------------------------------------------------------------------------------------------
# The paper's filter (pure)


def paper_keep(rows: Iterable[tuple[str, int]]) -> list[bool]:
    """Which rows of one split the paper counts, given ``(question, answer_count)`` in reading
    order: rows with exactly one answer, and of those each question text only the first time.

    On the official files this gives exactly Ye et al.'s 75,944 in-domain training, 9,555
    in-domain test and 11,613 out-of-domain test facts (the raw files hold 78,611 / 9,828 /
    12,247). P131 and P276 share a template, so a question may repeat across relations.
    """
    seen: set[str] = set()
    keep = []
    for question, answer_count in rows:
        kept = answer_count == 1 and question not in seen
        if kept:
            seen.add(question)
        keep.append(kept)
    return keep


def paper_subset(facts: Iterable[Fact]) -> list[Fact]:
    """The facts the paper counts (see ``paper_keep``), judged within each split in the order
    given (``load_facts`` reads files by name, rows in file order). Needs facts read from
    EntityQuestions files, which record ``meta["answer_count"]``."""
    facts = list(facts)
    missing = [fact.id for fact in facts if "answer_count" not in fact.meta]
    if missing:
        raise UserError(
            f"paper_subset needs facts read from EntityQuestions files (meta.answer_count); "
            f"{len(missing)} fact(s) lack it, e.g. {missing[0]!r}"
        )
    by_split: dict[str, list[int]] = {}
    for index, fact in enumerate(facts):
        by_split.setdefault(fact.split, []).append(index)
    kept: set[int] = set()
    for indices in by_split.values():
        flags = paper_keep((facts[i].question, facts[i].meta["answer_count"]) for i in indices)
        kept.update(i for i, flag in zip(indices, flags, strict=True) if flag)
    return [fact for index, fact in enumerate(facts) if index in kept]


# --------------------------------------------------------------------------------------------
# Getting the archive


def _local_path(url: str) -> Path | None:
    """The file a ``file://`` URL or a plain path names; None for an HTTP(S) URL."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme in ("http", "https"):
        return None
    if len(parts.scheme) <= 1:  # a plain path (or a Windows drive letter)
        return Path(url).expanduser()
    raise UserError(f"--url {url!r}: use an http(s):// or file:// URL, or a path to a local zip")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, *, progress: bool) -> str:
    """Stream ``url`` into ``dest`` with a progress bar; return the sha256 of what arrived."""
    import requests
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    received = 0
    try:
        with requests.get(url, stream=True, timeout=(15, 120)) as response:
            response.raise_for_status()
            total = int(response.headers.get("Content-Length") or 0) or None
            with dest.open("wb") as handle, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=Path(urlsplit(url).path).name or "download", disable=not progress,
            ) as bar:
                for chunk in response.iter_content(chunk_size=_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as error:
        raise UserError(f"could not download {url}: {error}") from None
    if total is not None and received != total:
        raise UserError(f"could not download {url}: got {received} of {total} bytes")
    return digest.hexdigest()


def _archive_members(archive: zipfile.ZipFile, source: str) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The archive's ``<split>/P*.<split>.json`` members by (relation, split), and the names of
    relation files it holds for relations we do not know."""
    found: dict[tuple[str, str], str] = {}
    unknown: list[str] = []
    for name in archive.namelist():
        parts = name.split("/")
        if name.endswith("/") or any(part in _SKIPPED_FOLDERS for part in parts) or len(parts) < 2:
            continue
        match = _MEMBER.match("/".join(parts[-2:]))
        if not match:
            continue
        key = (match["pid"], match["split"])
        if match["pid"] not in RELATIONS:
            unknown.append(name)
        elif key in found:
            raise UserError(f"{source}: the archive holds {parts[-1]} twice ({found[key]} and {name})")
        else:
            found[key] = name
    return found, unknown


def _rows(data: bytes, member: str, source: str) -> list[Any]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{source}: {member} is not valid JSON ({error})") from None
    if not isinstance(rows, list):
        raise UserError(f"{source}: {member} is not a JSON list of {{question, answers}}")
    return rows


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty; pass --force to replace it")


def _missing_parents(out: Path) -> list[Path]:
    """The ancestors of ``out`` that do not exist yet, deepest first."""
    missing = []
    parent = out.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


# --------------------------------------------------------------------------------------------
# The command's work


def fetch_entity_questions(
    out: str | os.PathLike[str],
    *,
    url: str = DEFAULT_URL,
    force: bool = False,
    paper_filter: bool = False,
    expected_counts: Mapping[str, Mapping[str, int]] | None = OFFICIAL_COUNTS,
    progress: bool = True,
) -> dict[str, Any]:
    """Download (or read) the EntityQuestions archive and write it to ``out``; return the
    manifest that is also written as ``out/manifest.json``.

    ``url`` may be http(s)://, file:// or a local path. ``expected_counts`` maps relation ->
    split -> rows (default: the official archive's; None skips the count check). An existing
    non-empty ``out`` is replaced only with ``force``. On any error nothing is left behind.
    """
    out = Path(out)
    _check_out(out, force)
    created_parents = _missing_parents(out)
    try:
        with atomic_folder(out) as staging:
            manifest = _fetch_into(staging, url, paper_filter, expected_counts, progress)
    except BaseException:
        for parent in created_parents:  # deepest first; only those this call created
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return manifest


def _fetch_into(staging: Path, url: str, paper_filter: bool,
                expected_counts: Mapping[str, Mapping[str, int]] | None, progress: bool) -> dict[str, Any]:
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise UserError(f"--url {url}: no such file")
        archive_path = local
        sha256 = _sha256(local)
    else:
        download = staging / ".download"
        download.mkdir()
        archive_path = download / (Path(urlsplit(url).path).name or "dataset.zip")
        sha256 = _download(url, archive_path, progress=progress)
    try:
        files = _extract(archive_path, url, staging, paper_filter, expected_counts)
    finally:
        if local is None:
            shutil.rmtree(staging / ".download", ignore_errors=True)
    manifest = _manifest(url, sha256, files, paper_filter)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (staging / "README.md").write_text(_readme(manifest), encoding="utf-8")
    staging.chmod(0o777 & ~_umask())  # a temporary folder is private; the output is not
    return manifest


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _extract(archive_path: Path, source: str, staging: Path, paper_filter: bool,
             expected_counts: Mapping[str, Mapping[str, int]] | None) -> list[dict[str, Any]]:
    """Check the archive and write its relation files; one summary dict per file."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{source} is not a readable zip archive ({error})") from None
    with archive:
        members, unknown = _archive_members(archive, source)
        missing = [f"{split}/{pid}.{split}.json" for split in SPLITS for pid in RELATIONS
                   if (pid, split) not in members]
        if missing:
            raise UserError(f"{source} is not the EntityQuestions archive: {len(missing)} of the "
                            f"{len(RELATIONS) * len(SPLITS)} relation files are missing "
                            f"({_some(missing, ', ')})")
        if unknown:
            logger.warning("skipping %d file(s) of relations outside the 24: %s", len(unknown),
                           ", ".join(unknown))
        contents = {key: _read_member(archive, member, source) for key, member in members.items()}
    if expected_counts is not None:
        wrong = []
        for split in SPLITS:
            for pid in RELATIONS:
                got, expected = len(contents[(pid, split)][1]), expected_counts.get(pid, {}).get(split)
                if got != expected:
                    wrong.append(f"{pid}.{split}.json has {got} rows, expected {expected}")
        if wrong:
            raise UserError(f"{source}: row counts differ from the official archive's: {_some(wrong, '; ')}")
    files: list[dict[str, Any]] = []
    for split in SPLITS:
        (staging / split).mkdir()
        # Name order, as the readers read a folder, so paper_keep sees rows in that order.
        pids = sorted(RELATIONS, key=lambda pid: f"{pid}.{split}.json")
        keep = None
        if paper_filter:
            keep = iter(paper_keep((_question(row), _answer_count(row))
                                   for pid in pids for row in contents[(pid, split)][1]))
        for pid in pids:
            data, rows = contents[(pid, split)]
            target = staging / split / f"{pid}.{split}.json"
            if keep is None:
                target.write_bytes(data)  # the archive's bytes, unchanged
                kept = len(rows)
            else:
                chosen = [row for row in rows if next(keep)]
                target.write_text(json.dumps(chosen, indent=4), encoding="utf-8")  # its format
                kept = len(chosen)
            files.append(_check_file(target, members[(pid, split)], source)
                         | {"file": f"{split}/{target.name}", "relation": pid, "split": split,
                            "domain": RELATIONS[pid].domain, "rows": len(rows), "kept": kept})
    return files


def _read_member(archive: zipfile.ZipFile, member: str, source: str) -> tuple[bytes, list[Any]]:
    try:
        data = archive.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise UserError(f"{source}: cannot read {member} ({error}); the archive is damaged or "
                        "incomplete, download it again") from None
    return data, _rows(data, member, source)


def _check_file(path: Path, member: str, source: str) -> dict[str, Any]:
    """Read a written file with the project's reader: every row must load."""
    from sftknow_eval.readers import read_entity_questions_file

    try:
        facts = read_entity_questions_file(path)
    except FactFormatError as error:
        raise FactFormatError(f"{source}: {member}", error.line, error.field, error.problem,
                              "item") from None
    return {"answer_in_question": sum(bool(f.meta["answer_in_question"]) for f in facts)}


def _some(items: list[str], separator: str, shown: int = 6) -> str:
    more = f"{separator}and {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def _question(row: Any) -> str:
    question = row.get("question") if isinstance(row, dict) else None
    return question.strip() if isinstance(question, str) else ""


def _answer_count(row: Any) -> int:
    answers = row.get("answers") if isinstance(row, dict) else None
    return len(answers) if isinstance(answers, list) else 0


def _manifest(url: str, sha256: str, files: list[dict[str, Any]], paper_filter: bool) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        of_split = [f for f in files if f["split"] == split]
        in_domain = [f for f in of_split if f["domain"] == "in"]
        counts[split] = {
            "in_domain": sum(f["kept"] for f in in_domain),
            "out_of_domain": sum(f["kept"] for f in of_split if f["domain"] == "out"),
            "total": sum(f["kept"] for f in of_split),
            "raw_total": sum(f["rows"] for f in of_split),
            "answer_in_question_in_domain": sum(f["answer_in_question"] for f in in_domain),
        }
    return {
        "dataset": "EntityQuestions",
        "citation": CITATION,
        "source": url,
        "archive_sha256": sha256,
        "repository": REPOSITORY,
        "license": LICENSE,
        "copyright": COPYRIGHT,
        "filter": "paper" if paper_filter else None,
        "counts": counts,
        "files": {f["file"]: f["kept"] for f in files},
    }


def format_counts(manifest: Mapping[str, Any]) -> str:
    """Per-split counts as a small text table, and the answer-in-question share."""
    lines = [f"{'split':<6} {'in-domain':>10} {'out-of-domain':>14} {'total':>9}"]
    for split in SPLITS:
        c = manifest["counts"][split]
        lines.append(f"{split:<6} {c['in_domain']:>10,} {c['out_of_domain']:>14,} {c['total']:>9,}")
    train = manifest["counts"]["train"]
    share = 100.0 * train["answer_in_question_in_domain"] / max(train["in_domain"], 1)
    lines.append(f"answer already in the question (meta.answer_in_question): "
                 f"{train['answer_in_question_in_domain']:,} of {train['in_domain']:,} in-domain "
                 f"training facts ({share:.1f}%)")
    if manifest.get("filter") == "paper":
        lines.append("paper filter: one answer per row, each question once per split")
    return "\n".join(lines)


def _readme(manifest: Mapping[str, Any]) -> str:
    rows = "\n".join(
        f"| {split} | {c['in_domain']:,} | {c['out_of_domain']:,} | {c['total']:,} | "
        f"{c['answer_in_question_in_domain']:,} |"
        for split, c in manifest["counts"].items()
    )
    filtered = ("\nOnly the rows the paper counts were kept (`--paper-filter`: one answer per row, "
                "each question once per split).\n" if manifest.get("filter") == "paper" else "")
    return f"""# EntityQuestions

{manifest['citation']}.

Written by `sftknow-eval data entity-questions`; the sftknow-eval README describes the facts
schema and the readers.

- Source: {manifest['source']} (sha256 `{manifest['archive_sha256']}`)
- Repository: {manifest['repository']}
- Layout: `train/`, `dev/`, `test/`, one `P<id>.<split>.json` per relation (24 relations).
- Load: `sftknow_eval.readers.load_facts("<this folder>/train")`.
{filtered}
| split | in-domain | out-of-domain | total | in-domain answer in question |
|---|---:|---:|---:|---:|
{rows}

## License

{manifest['license']} License

{manifest['copyright']}

{_MIT_NOTICE}"""
