"""sftknow_eval.hub against the local Hub server, through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sftknow_eval import hub
from sftknow_eval.errors import UserError


def _tree_digest(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def test_repo_id_validation() -> None:
    assert hub.validate_repo_id("my-org/model-1") == "my-org/model-1"
    assert hub.validate_repo_id("gpt2") == "gpt2"
    for bad in ["", "a/b/c", "org/bad name", "org/--x", "org/name..x"]:
        with pytest.raises(UserError, match="invalid repo id"):
            hub.validate_repo_id(bad)
    with pytest.raises(UserError, match="namespace/name"):
        hub.validate_repo_id("model-only", require_namespace=True)


def test_local_folder_passes_through(tiny_model_dir: Path) -> None:
    assert hub.resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert hub.model_revision(tiny_model_dir) is None
    summary = hub.check_model(tiny_model_dir)
    assert summary["architectures"] == ["LlamaForCausalLM"]
    assert summary["num_parameters"] > 0 and summary["weight_files"] == ["model.safetensors"]
    with pytest.raises(UserError, match="no such folder"):
        hub.resolve_model("./does/not/exist")


def test_push_pull_round_trip(local_hub, tiny_model_dir: Path) -> None:
    url = hub.push_folder(tiny_model_dir, "study/tiny-model")
    assert url.startswith(local_hub.url) and "/study/tiny-model/commit/" in url
    sha = url.rsplit("/", 1)[-1]

    remote = local_hub.files("study/tiny-model")
    assert "model.safetensors" in remote and "config.json" in remote
    assert local_hub.state.repos[("model", "study/tiny-model")].private  # private by default
    # the weights went through the LFS protocol, small JSON files as regular commits
    assert any(path.startswith("/__lfs/upload/") for _, path in local_hub.state.requests)

    assert hub.model_revision("study/tiny-model") == sha
    summary = hub.check_model("study/tiny-model")
    assert summary["revision"] == sha and summary["model_type"] == "llama"
    assert summary["num_parameters"] == hub.check_model(tiny_model_dir)["num_parameters"]

    pulled = hub.resolve_model("study/tiny-model", revision=sha)
    assert pulled.name == sha
    names = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
    assert sorted(p.name for p in pulled.iterdir()) == names
    assert _tree_digest(pulled, names) == _tree_digest(tiny_model_dir, names)


def test_offline_uses_cache_only(local_hub, tiny_model_dir: Path, monkeypatch) -> None:
    hub.push_folder(tiny_model_dir, "study/offline-model")
    online = hub.resolve_model("study/offline-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(local_hub.state.requests)
    assert hub.resolve_model("study/offline-model") == online
    assert len(local_hub.state.requests) == before  # no request left the machine
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        hub.resolve_model("study/never-downloaded")


def test_check_fails_fast_on_wrong_architecture(local_hub, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                    "model_type": "bert"}))
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(folder / "model.safetensors"))
    hub.push_folder(folder, "study/encoder")
    with pytest.raises(UserError, match="not a causal language model"):
        hub.check_model("study/encoder")
    # it read only the config and the safetensors header, never the whole weights file
    gets = [p for m, p in local_hub.state.requests if m == "GET" and p.startswith("/__cdn/")]
    assert len(gets) == 1  # one ranged read of the header


def test_push_refuses_existing_content_unless_overwrite(local_hub, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a.txt").write_text("one")
    (second / "b.txt").write_text("two")
    hub.push_folder(first, "study/things")
    with pytest.raises(UserError, match="already has content.*a.txt"):
        hub.push_folder(second, "study/things")
    assert set(local_hub.files("study/things")) == {".gitattributes", "a.txt"}
    hub.push_folder(second, "study/things", overwrite=True)
    assert set(local_hub.files("study/things")) == {".gitattributes", "b.txt"}


def test_push_without_token(local_hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match="HF_TOKEN") as caught:
        hub.push_folder(tmp_path, "study/no-token")
    assert "hf_" not in str(caught.value)
    assert not local_hub.state.repos


def test_push_with_rejected_token_does_not_leak_it(local_hub, tmp_path: Path,
                                                   monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match="refused the token") as caught:
        hub.push_folder(tmp_path, "study/bad-token")
    assert "hf_wrong_secret_value" not in str(caught.value)


def test_push_bad_repo_id_and_missing_folder(local_hub, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match="invalid repo id"):
        hub.push_folder(tmp_path, "not a repo id")
    with pytest.raises(UserError, match="no such folder"):
        hub.push_folder(tmp_path / "missing", "study/x")


def test_dataset_repo_round_trip(local_hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    folder = tmp_path / "probe"
    folder.mkdir()
    rows = [{"prompt": "q", "completion": " a", "category": "D2"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# probe\n")
    url = hub.push_folder(folder, "study/probe-data", repo_type="dataset", private=False)
    assert "/datasets/study/probe-data/commit/" in url
    info = HfApi().dataset_info("study/probe-data")
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "train.jsonl", "README.md"}
    path = hf_hub_download("study/probe-data", "train.jsonl", repo_type="dataset")
    assert Path(path).read_bytes() == (folder / "train.jsonl").read_bytes()
    assert sorted(HfApi().list_repo_files("study/probe-data", repo_type="dataset")) == [
        ".gitattributes", "README.md", "train.jsonl"]
