"""The one door to the Hugging Face Hub: pull a model (resolve), check it, push a folder.

Everything remote goes through huggingface_hub's ``HfApi`` / ``snapshot_download`` /
``hf_hub_download``; a local folder passes straight through, and ``HF_ENDPOINT`` (a mirror,
or the test suite's local server) serves the same code. Tokens come only from the
environment (``HF_TOKEN``) or huggingface_hub's own lookup; they are never printed,
logged or written by this module.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    get_token,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    NotASafetensorsRepoError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from sftknow_eval.errors import UserError

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json")
CONFIG_PATTERNS: tuple[str, ...] = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
CARD_PATTERNS: tuple[str, ...] = ("README.md",)
# What a pull fetches by default: safetensors weights (never pickles), config, tokenizer, card.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    WEIGHT_PATTERNS + CONFIG_PATTERNS + TOKENIZER_PATTERNS + CARD_PATTERNS
)
REPO_TYPES: tuple[str, ...] = ("model", "dataset")
# Created by the Hub itself in every new repo; not "content" for the overwrite check.
HUB_SYSTEM_FILES: frozenset[str] = frozenset({".gitattributes"})


# ---------------------------------------------------------------------------------------
# environment


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now, or as huggingface_hub read it at import."""
    if os.environ.get("HF_HUB_OFFLINE") is not None:
        return _env_true("HF_HUB_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str | None:
    """HF_ENDPOINT read at call time (None: huggingface_hub's default)."""
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _api(token: str | None = None) -> HfApi:
    return HfApi(endpoint=_endpoint(), token=token)


def _local_folder(id_or_path: str | os.PathLike[str]) -> Path | None:
    """The folder when ``id_or_path`` names a local directory; a UserError for a missing path."""
    text = os.fspath(id_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or path.exists()
    if looks_like_path:
        if path.exists():
            raise UserError(f"{text}: expected a model folder, found a file")
        raise UserError(f"{text}: no such folder (and not a Hub repo id)")
    return None


# ---------------------------------------------------------------------------------------
# ids


def validate_repo_id(repo_id: str, *, require_namespace: bool = False) -> str:
    """Check a Hub repo id (``name`` or ``namespace/name``); UserError naming the problem."""
    if not isinstance(repo_id, str) or not repo_id:
        raise UserError(f"invalid repo id {repo_id!r}: expected 'namespace/name'")
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"invalid repo id {repo_id!r}: {error}") from None
    if require_namespace and repo_id.count("/") != 1:
        raise UserError(
            f"invalid repo id {repo_id!r}: pushing needs 'namespace/name' (e.g. my-org/model)"
        )
    return repo_id


def _hub_error(error: Exception, what: str, revision: str | None) -> UserError:
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(error, RevisionNotFoundError):
        return UserError(f"{what}: revision {revision!r} not found on the Hub")
    if isinstance(error, GatedRepoError):
        return UserError(f"{what}: gated repo; accept its terms on the Hub and set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        return UserError(
            f"{what}: repository not found{at} (check the id; a private repo needs HF_TOKEN)"
        )
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return UserError(
            f"{what}{at} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "HF_HUB_OFFLINE is set: download it once online, or pass a local folder"
        )
    if isinstance(error, EntryNotFoundError):
        return UserError(f"{what}{at}: {error}")
    return UserError(f"{what}: the Hub could not be reached or refused the request: {error}")


# ---------------------------------------------------------------------------------------
# pull


def resolve_model(
    id_or_path: str | os.PathLike[str],
    revision: str | None = None,
    *,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder holding the model: a local folder as is, else a Hub snapshot.

    The snapshot holds only ``allow_patterns`` (default: safetensors weights and index,
    config, generation config, tokenizer files, card), pinned at ``revision`` (a branch,
    tag or commit sha). With HF_HUB_OFFLINE set, only the cache is used.
    """
    local = _local_folder(id_or_path)
    if local is not None:
        return local
    repo_id = validate_repo_id(os.fspath(id_or_path))
    patterns = list(allow_patterns) if allow_patterns is not None else list(DEFAULT_ALLOW_PATTERNS)
    offline = is_offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            endpoint=_endpoint(),
            local_files_only=offline,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise _hub_error(error, repo_id, revision) from None
    path = Path(folder)
    if allow_patterns is None and not any(path.glob("*.safetensors")):
        raise UserError(
            f"{repo_id}: no safetensors weights in the repo (pickle checkpoints are not downloaded)"
        )
    logger.info("model %s (revision %s) at %s", repo_id, revision or "main", path)
    return path


def resolve_dataset(id_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder holding a dataset repo's files: a local folder as is, else a Hub snapshot
    of the dataset repo (all files; HF_HUB_OFFLINE honoured)."""
    local = _local_folder(id_or_path)
    if local is not None:
        return local
    repo_id = validate_repo_id(os.fspath(id_or_path))
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                   endpoint=_endpoint(), local_files_only=is_offline())
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise _hub_error(error, repo_id, revision) from None
    logger.info("dataset %s (revision %s) at %s", repo_id, revision or "main", folder)
    return Path(folder)


def model_revision(id_or_path: str | os.PathLike[str]) -> str | None:
    """The commit sha of a Hub model (for cards), None for a local folder.

    Offline, the sha of the cached snapshot of ``main`` is returned, or None if there is none.
    """
    if _local_folder(id_or_path) is not None:
        return None
    repo_id = validate_repo_id(os.fspath(id_or_path))
    if is_offline():
        try:
            folder = snapshot_download(repo_id, local_files_only=True)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
            return None
        return Path(folder).name
    try:
        return _api().model_info(repo_id).sha
    except HfHubHTTPError as error:
        raise _hub_error(error, repo_id, None) from None


# ---------------------------------------------------------------------------------------
# check


def _architecture_problem(
    config: dict[str, Any], architectures: tuple[str, ...] | None
) -> str | None:
    found = list(config.get("architectures") or [])
    if architectures is not None:
        if not set(found) & set(architectures):
            return f"architecture {found or 'unknown'} is not one of {list(architectures)}"
        return None
    if not any(name.endswith("ForCausalLM") for name in found):
        return f"architecture {found or 'unknown'} is not a causal language model (*ForCausalLM)"
    return None


def _local_safetensors_summary(folder: Path) -> dict[str, Any]:
    """Tensor count, parameter count per dtype and weight files, read from headers only."""
    from safetensors import safe_open

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    dtypes: dict[str, int] = {}
    tensors = 0
    for name in files:
        with safe_open(folder / name, framework="numpy") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                dtype = tensor.get_dtype()
                dtypes[dtype] = dtypes.get(dtype, 0) + count
                tensors += 1
    return {"weight_files": files, "tensors": tensors, "parameters_by_dtype": dtypes}


def check_model(
    id_or_path: str | os.PathLike[str],
    revision: str | None = None,
    *,
    architectures: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Read a model's config and safetensors headers without downloading its weights.

    Fails in seconds (UserError) when the architecture is not a causal LM (or not one of
    ``architectures``) or when there are no safetensors weights. Returns a summary:
    source, id, revision (commit sha or None), architectures, model_type, num_parameters,
    parameters_by_dtype, weight_files, tensors, config.
    """
    local = _local_folder(id_or_path)
    if local is not None:
        config_path = local / "config.json"
        if not config_path.is_file():
            raise UserError(f"{local}: no config.json (not a transformers model folder)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        summary = _local_safetensors_summary(local)
        source, name, sha = "local", str(local), None
    else:
        repo_id = validate_repo_id(os.fspath(id_or_path))
        offline = is_offline()
        try:
            config_file = hf_hub_download(
                repo_id, "config.json", revision=revision, endpoint=_endpoint(),
                local_files_only=offline,
            )
            config = json.loads(Path(config_file).read_text(encoding="utf-8"))
            if offline:
                # Headers come from the cached snapshot when there is no network.
                summary = _local_safetensors_summary(Path(config_file).parent)
                sha = Path(config_file).parent.name
            else:
                api = _api()
                sha = api.model_info(repo_id, revision=revision).sha
                meta = api.get_safetensors_metadata(repo_id, revision=sha or revision)
                summary = {
                    "weight_files": sorted(meta.files_metadata),
                    "tensors": sum(len(f.tensors) for f in meta.files_metadata.values()),
                    "parameters_by_dtype": dict(meta.parameter_count),
                }
        except NotASafetensorsRepoError:
            raise UserError(f"{repo_id}: no safetensors weights on the Hub") from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
            raise _hub_error(error, repo_id, revision) from None
        source, name = "hub", repo_id
    problem = _architecture_problem(config, architectures)
    if problem:
        raise UserError(f"{name}: {problem}")
    if not summary["weight_files"]:
        raise UserError(f"{name}: no safetensors weights (pickle checkpoints are refused)")
    return {
        "source": source,
        "id": name,
        "revision": sha,
        "architectures": list(config.get("architectures") or []),
        "model_type": config.get("model_type"),
        "num_parameters": sum(summary["parameters_by_dtype"].values()),
        **summary,
        "config": config,
    }


# ---------------------------------------------------------------------------------------
# push


def _require_token() -> str:
    token = get_token()  # HF_TOKEN, else huggingface_hub's stored login; never echoed
    if not token:
        raise UserError(
            "pushing to the Hub needs a token: set HF_TOKEN in the environment "
            "(a write token from https://huggingface.co/settings/tokens)"
        )
    return token


def _push_token(repo_id: str, repo_type: str) -> str:
    """What every push needs before any request: a known repo type, a ``namespace/name`` id,
    network access and a token (returned, never shown)."""
    if repo_type not in REPO_TYPES:
        raise UserError(f"repo type {repo_type!r}: expected one of {list(REPO_TYPES)}")
    validate_repo_id(repo_id, require_namespace=True)
    if is_offline():
        raise UserError("cannot push: HF_HUB_OFFLINE is set")
    return _require_token()


def _existing_content(api: HfApi, repo_id: str, repo_type: str, overwrite: bool) -> set[str]:
    """The files a repo already holds (Hub system files aside); a UserError when there are
    some and ``overwrite`` is off. Raises RepositoryNotFoundError for a repo not there yet."""
    existing = set(api.list_repo_files(repo_id, repo_type=repo_type)) - HUB_SYSTEM_FILES
    if existing and not overwrite:
        shown = ", ".join(sorted(existing)[:5]) + (" ..." if len(existing) > 5 else "")
        raise UserError(
            f"{repo_type} repo {repo_id} already has content ({shown}); refusing to "
            "overwrite it (pass overwrite=True / --overwrite to replace it)"
        )
    return existing


def _push_error(error: HfHubHTTPError, repo_id: str, repo_type: str) -> UserError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(
            f"the Hub refused the token for {repo_type} repo {repo_id} (HTTP {status}): "
            "check that HF_TOKEN has write access to that namespace"
        )
    return _hub_error(error, repo_id, None)


def check_push_target(repo_id: str, *, repo_type: str = "model", overwrite: bool = False) -> None:
    """Fail before any work when :func:`push_folder` to ``repo_id`` would fail on its inputs:
    an invalid id, offline mode, no token, or a repo that already has content (without
    ``overwrite``). Creates nothing; a repo that does not exist yet is fine."""
    api = _api(_push_token(repo_id, repo_type))
    try:
        _existing_content(api, repo_id, repo_type, overwrite)
    except RepositoryNotFoundError:
        return  # the push creates it
    except HfHubHTTPError as error:
        raise _push_error(error, repo_id, repo_type) from None


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = True,
    repo_type: str = "model",
    commit_message: str | None = None,
    overwrite: bool = False,
) -> str:
    """Upload ``folder`` as the content of the Hub repo ``repo_id``; returns the commit URL.

    The repo is created if missing (private by default). A repo that already holds other
    files is refused unless ``overwrite=True``, which makes the repo mirror the folder
    (remote files absent from the folder are deleted in the same commit). The same rules,
    checked before a long run: :func:`check_push_target`.
    """
    source = Path(folder)
    if not source.is_dir():
        raise UserError(f"{source}: no such folder to push")
    if not any(p.is_file() for p in source.rglob("*")):
        raise UserError(f"{source}: nothing to push (empty folder)")
    api = _api(_push_token(repo_id, repo_type))
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        existing = _existing_content(api, repo_id, repo_type, overwrite)
        info = api.upload_folder(
            folder_path=source,
            repo_id=repo_id,
            repo_type=repo_type,
            commit_message=commit_message or f"Upload {source.name} with sftknow-eval",
            delete_patterns=["*"] if existing else None,
        )
    except HfHubHTTPError as error:
        raise _push_error(error, repo_id, repo_type) from None
    logger.info("pushed %s to %s", source, info.commit_url)
    return str(info.commit_url)


# ---------------------------------------------------------------------------------------
# model cards of existing repos


def load_model_card(repo_id: str, revision: str | None = None, *,
                    strict: bool = False) -> ModelCard:
    """The model card (README.md) of the Hub repo ``repo_id``; an empty card if it has none.
    ``strict``: malformed metadata raises (yaml.YAMLError / ValueError) instead of being dropped."""
    validate_repo_id(repo_id)
    try:
        return ModelCard.load(repo_id, token=get_token(), ignore_metadata_errors=not strict)
    except EntryNotFoundError:
        return ModelCard.from_template(ModelCardData())
    except HfHubHTTPError as error:
        raise _hub_error(error, repo_id, revision) from None


def push_model_card(repo_id: str, card: ModelCard, commit_message: str) -> str:
    """Replace the README.md of the Hub repo ``repo_id`` with ``card``; returns the commit URL."""
    validate_repo_id(repo_id, require_namespace=True)
    if is_offline():
        raise UserError("cannot push: HF_HUB_OFFLINE is set")
    api = _api(_require_token())
    try:
        info = api.upload_file(path_or_fileobj=str(card).encode("utf-8"), path_in_repo="README.md",
                               repo_id=repo_id, commit_message=commit_message)
    except HfHubHTTPError as error:
        raise _hub_error(error, repo_id, None) from None
    return str(info.commit_url)
