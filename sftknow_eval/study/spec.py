"""The study spec: one YAML file naming the base model, facts, probe, grid, SFT recipe, eval,
KL, restoration, analysis and push settings, loaded into dataclasses and validated.

Every section is a dataclass below; its docstring documents the fields. Unknown keys, wrong
types and bad values are refused with the YAML path of the offending key named, e.g.
``recipes/study/tiny.yaml: grid.sizez: unknown key (known: categories, sizes, seeds, ...)``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from sftknow_eval.errors import UserError
from sftknow_eval.probe.categories import CATEGORIES, SCHEMES
from sftknow_eval.recipe_files import RECIPES_ROOT, find_yaml

SHIPPED = "shipped"  # the tiny world's own model, facts or annotations
STUDY_DIR = RECIPES_ROOT / "study"
DEFAULT_SPEC = STUDY_DIR / "tiny.yaml"
BACKENDS = ("hf", "vllm")
LAUNCHERS = ("python", "accelerate")


@dataclass
class ModelSection:
    """The base model.

    path    Hub id or local folder, or ``shipped`` for the tiny world's base model.
    key     the name mastery is filed under (must match the annotations' model key).
    revision  Hub revision to pin (recorded in the report).
    """

    path: str = SHIPPED
    key: str = "tiny-world"
    revision: str | None = None


@dataclass
class ProbeSection:
    """How facts get their mastery categories (docs/METHOD.md §2).

    annotated   an existing probe output folder (or ``shipped``): no probing, the study reads
                it. When null, the study probes ``facts`` with the settings below.
    facts       fact sources for probing (paths, folders, Hub ids, or ``shipped``).
    backend, model_args, batch_size, device   lm-eval backend strings (model_args gets
                ``pretrained=<model.path>`` prepended).
    scheme, templates, samples, temperature, max_new_tokens, seed   probe settings.
    """

    annotated: str | None = SHIPPED
    facts: list[str] = field(default_factory=lambda: [SHIPPED])
    backend: str = "hf"
    model_args: str = ""
    batch_size: int | str = 64
    device: str | None = None
    scheme: str = "ye2025"
    templates: int = 21
    samples: int | None = None
    temperature: float | None = None
    max_new_tokens: int = 32
    seed: int = 0


@dataclass
class GridSection:
    """The SFT grid: one training set (and model) per category x size x seed.

    categories  training categories (one mastery category each, docs/METHOD.md §3).
    sizes       training set sizes (ints, or ``all``).
    seeds       random draws; the seed picks the data and seeds the trainer.
    allow_smaller  take all of a category when it holds fewer facts than a size asks.
    split       the annotated split the training pool is drawn from.
    """

    categories: list[str] = field(default_factory=lambda: ["D0", "D2", "D4"])
    sizes: list[int | str] = field(default_factory=lambda: [60, 240])
    seeds: list[int] = field(default_factory=lambda: [0])
    allow_smaller: bool = False
    split: str = "train"


@dataclass
class TrainSection:
    """Fine-tuning: a TRL recipe (``recipes/sft/`` name or path), with overrides.

    launcher    ``python`` (in this process) or ``accelerate`` (``accelerate launch`` per cell).
    accelerate_config  ``--config_file`` for accelerate: a file, or a shipped config by name
                (``fsdp``, ``deepspeed-zero3``: recipes/accelerate/).
    The study always overrides ``model_name_or_path`` (the base model) and ``seed``.
    """

    recipe: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    launcher: str = "python"
    accelerate_config: str | None = None


@dataclass
class EvalSection:
    """CBQA evaluation with lm-eval on the study's task family (docs/METHOD.md §4).

    backend     lm-eval model backend, ``hf`` or ``vllm``.
    model_args  extra lm-eval model args (``pretrained=<model>`` is prepended).
    subprocess  run each evaluation as an ``lm_eval`` process (frees GPU memory between
                models; vllm wants it); otherwise in this process, sharing one TaskManager.
    family      the task family name; ``splits`` the annotated splits it is written from.
    limit       items per bucket task (a smoke test); null for all.
    """

    backend: str = "hf"
    model_args: str = ""
    batch_size: int | str = 64
    device: str | None = "cpu"
    subprocess: bool = False
    family: str = "sftknow_study"
    splits: list[str] = field(default_factory=lambda: ["test"])
    limit: int | None = None


@dataclass
class KLSection:
    """Token-level analysis (docs/METHOD.md §5): first-answer-token KL on the test facts of one
    category, for every fine-tuned model."""

    enabled: bool = True
    category: str = "D4"
    full_vocab: bool = False
    batch_size: int = 64


@dataclass
class RestoreSection:
    """Parameter restoration (docs/METHOD.md §6), one model per (fine-tuned model, k).

    k           percentages of the region's elements reset to base values.
    sizes       the training sizes whose models are restored; ``largest`` (the grid's largest
                size), ``all``, or a list.
    categories  the training categories whose models are restored (default: all of the grid).
    seeds       the seeds whose models are restored (default: all).
    region, strategy  as in ``sftknow-eval restore``.
    choose_on   an annotated split (``dev``) to choose k on, per restored model: the fine-tune
                (k = 0) and every k variant scored on it per bucket with the eval settings, the
                highest macro Acc kept (ties to the smaller k, as ``restore --choose-on``);
                null (default): no choice. Never a split the study evaluates or trains on.
    """

    k: list[float] = field(default_factory=lambda: [1.0, 5.0, 20.0])
    sizes: str | list[int | str] = "largest"
    categories: list[str] | None = None
    seeds: list[int] | None = None
    region: str = "transformer"
    strategy: str = "top"
    choose_on: str | None = None


@dataclass
class AnalysisSection:
    """Update statistics (relative change concentration, layer and module shares) for the
    models being restored (``updates``)."""

    updates: bool = True


@dataclass
class PushSection:
    """Where to push fine-tuned and restored models (``org``/<study>-<cell>); null: nowhere."""

    org: str | None = None
    private: bool = True


@dataclass
class StudySpec:
    """A whole study. ``name`` names the run folder (``runs/study/<name>`` unless ``out``)."""

    name: str = "study"
    description: str = ""
    out: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    grid: GridSection = field(default_factory=GridSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    kl: KLSection = field(default_factory=KLSection)
    restore: RestoreSection | None = field(default_factory=RestoreSection)
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    push: PushSection = field(default_factory=PushSection)
    source: str | None = field(default=None, metadata={"internal": True})

    # -- derived ---------------------------------------------------------------------------

    def run_dir(self, override: str | os.PathLike[str] | None = None) -> Path:
        return Path(override or self.out or Path("runs") / "study" / self.name)

    def restored_sizes(self) -> list[int | str]:
        if self.restore is None:
            return []
        sizes = self.restore.sizes
        if sizes == "largest":
            return [largest_size(self.grid.sizes)]
        if sizes == "all":
            return list(self.grid.sizes)
        return list(sizes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


def largest_size(sizes: list[int | str]) -> int | str:
    return "all" if "all" in sizes else max(int(s) for s in sizes)


# -- loading -------------------------------------------------------------------------------
# A small hand-written converter: TRL's and transformers' YAML parsers (HfArgumentParser) take
# flat dataclasses only, and the study spec is nested by section.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        present = [o for o in options if o is not type(None)]
        if len(present) == 1:  # Optional[X]: X's own error names the bad key
            return _convert(value, present[0], where)
        for option in present:
            try:
                return _convert(value, option, where)
            except UserError:
                continue
        names = " or ".join(_type_name(o) for o in options)
        raise UserError(f"{where}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'spec'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise UserError(f"{names}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"(known: {', '.join(known)})")
    values = {}
    for name, value in data.items():
        values[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**values)


def spec_from_dict(data: dict[str, Any], source: str = "<dict>") -> StudySpec:
    """Build and validate a spec; UserError names the source file and the key."""
    if not data:
        raise UserError(f"{source}: the spec is empty; a study names at least its grid "
                        "(categories, sizes, seeds): start from recipes/study/tiny.yaml")
    if isinstance(data, dict) and "grid" in data and not data["grid"]:
        raise UserError(f"{source}: grid: empty; name its categories, sizes and seeds (or leave "
                        "the section out for the default grid)")
    try:
        spec = _build(StudySpec, data, "")
        validate(spec)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
    spec.source = source
    return spec


def find_spec(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A spec file by path, or a shipped spec by name (``tiny``: recipes/study/tiny.yaml)."""
    if name_or_path is None:
        return DEFAULT_SPEC
    return find_yaml(name_or_path, STUDY_DIR, "study spec")


def load_spec(name_or_path: str | os.PathLike[str] | None = None) -> StudySpec:
    """Read a study spec YAML (default: the tiny world's, recipes/study/tiny.yaml)."""
    path = find_spec(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from None
    return spec_from_dict(data or {}, str(path))


def validate(spec: StudySpec) -> None:
    """Values the types cannot check: names, ranges, choices, emptiness."""
    if not spec.name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"name: {spec.name!r} must be letters, digits, '-' and '_'")
    probe = spec.probe
    if probe.scheme not in SCHEMES:
        raise UserError(f"probe.scheme: {probe.scheme!r} is not one of {', '.join(SCHEMES)}")
    if probe.annotated is None and not probe.facts:
        raise UserError("probe: give `annotated` (an annotated folder) or `facts` to probe")
    counts = {"probe.templates": probe.templates, "probe.samples": probe.samples,
              "probe.max_new_tokens": probe.max_new_tokens, "kl.batch_size": spec.kl.batch_size}
    for key, count in counts.items():
        if count is not None and count < 1:
            raise UserError(f"{key}: {count} must be at least 1")
    for key, size in (("probe.batch_size", probe.batch_size),
                      ("eval.batch_size", spec.eval.batch_size)):
        if (size < 1) if isinstance(size, int) else not size.startswith("auto"):
            raise UserError(f"{key}: {size!r} must be a positive integer or 'auto'")
    categories = CATEGORIES[probe.scheme]
    grid = spec.grid
    for name in ("categories", "sizes", "seeds"):
        values = getattr(grid, name)
        if not values:
            raise UserError(f"grid.{name}: must not be empty")
        if len({str(v) for v in values}) != len(values):
            raise UserError(f"grid.{name}: lists a value twice ({values})")
    for category in grid.categories:
        if category not in categories:
            raise UserError(f"grid.categories: {category!r} is not a {probe.scheme} category "
                            f"({', '.join(categories)})")
    for size in grid.sizes:
        if size != "all" and (not isinstance(size, int) or size < 1):
            raise UserError(f"grid.sizes: {size!r} must be a positive integer or 'all'")
    if spec.train.launcher not in LAUNCHERS:
        raise UserError(f"train.launcher: {spec.train.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if spec.eval.backend not in BACKENDS:
        raise UserError(f"eval.backend: {spec.eval.backend!r} is not one of {', '.join(BACKENDS)}")
    if not spec.eval.family.replace("_", "").isalnum():
        raise UserError(f"eval.family: {spec.eval.family!r} must be letters, digits and '_'")
    if spec.eval.limit is not None and spec.eval.limit < 1:
        raise UserError("eval.limit: must be at least 1 (or null for every item)")
    if spec.kl.enabled and spec.kl.category not in categories:
        raise UserError(f"kl.category: {spec.kl.category!r} is not a {probe.scheme} category")
    if not spec.eval.splits:
        raise UserError("eval.splits: must not be empty (the annotated splits to evaluate on)")
    restore = spec.restore
    if restore is not None:
        # restore's own checks (a restore.k of 100 is refused like --k 100)
        from sftknow_eval.weights.regions import region_pattern
        from sftknow_eval.weights.topk import STRATEGIES, validate_k

        if not restore.k:
            raise UserError("restore.k: must not be empty (or set restore: null)")
        for k in restore.k:
            try:
                validate_k(k)
            except UserError as error:
                raise UserError(f"restore.k: {k:g} is not a percentage restore accepts "
                                f"({error})") from None
        try:
            region_pattern(restore.region)
        except UserError as error:
            raise UserError(f"restore.region: {error}") from None
        if isinstance(restore.sizes, str) and restore.sizes not in ("largest", "all"):
            raise UserError(f"restore.sizes: {restore.sizes!r}: use 'largest', 'all' or a list")
        if isinstance(restore.sizes, list):
            missing = [s for s in restore.sizes if s not in grid.sizes]
            if missing:
                raise UserError(f"restore.sizes: {missing} not in grid.sizes {grid.sizes}")
        for name in ("sizes", "categories", "seeds"):
            if getattr(restore, name) == []:
                raise UserError(f"restore.{name}: empty, so nothing would be restored; leave it "
                                "out (every model of the grid) or set restore: null")
        for name in ("categories", "seeds"):
            chosen = getattr(restore, name)
            missing = [v for v in chosen or [] if v not in getattr(grid, name)]
            if missing:
                raise UserError(f"restore.{name}: {missing} not in grid.{name}")
        if restore.strategy not in STRATEGIES:
            raise UserError(f"restore.strategy: {restore.strategy!r} is not one of "
                            f"{', '.join(STRATEGIES)}")
        _validate_choose_on(spec)


def _validate_choose_on(spec: StudySpec) -> None:
    """The split k is chosen on: a plain name, neither evaluated (test data never chooses)
    nor the training pool's."""
    split = spec.restore.choose_on if spec.restore else None
    if split is None:
        return
    if not split.replace("_", "").isalnum():
        raise UserError(f"restore.choose_on: {split!r} must be a split name (letters, digits, "
                        "'_'), e.g. dev")
    if split in spec.eval.splits:
        raise UserError(f"restore.choose_on: {split!r} is one of eval.splits "
                        f"({', '.join(spec.eval.splits)}): k is chosen on held-out dev facts, "
                        "never on the split it is reported on; use dev")
    if split == spec.grid.split:
        raise UserError(f"restore.choose_on: {split!r} is the split SFT sets are drawn from "
                        "(grid.split); use dev")
