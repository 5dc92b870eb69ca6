"""A small Hub-compatible HTTP server on 127.0.0.1 for tests: the routes huggingface_hub uses.

Written by hand because no library serves the Hub's HTTP API locally: it speaks just enough
of it for the real huggingface_hub client (with HF_HUB_DISABLE_XET=1) to run create_repo,
upload_folder (preupload, LFS batch + basic PUT + verify, ndjson commit with regular and
LFS files and deletions), model_info / dataset_info / repo_info (siblings, sha),
list_repo_files / list_repo_tree, get_paths_info, hf_hub_download (HEAD/GET on /resolve
with ETag, X-Repo-Commit, Content-Length, Range, and a same-host redirect for LFS files),
snapshot_download and get_safetensors_metadata, for model and dataset repos alike.

Storage: file contents under a temporary folder (one file per git blob / LFS object),
repo history in memory. Bound to 127.0.0.1 only; nothing here reaches the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".npy",
                ".npz", ".gz", ".zip", ".tar", ".h5", ".msgpack", ".onnx", ".model")
LFS_SIZE_LIMIT = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in LFS_SUFFIXES
)
PREFIX_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"


def git_blob_oid(content: bytes) -> str:
    """Git's object id of a blob: sha1 of 'blob <size>\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    size: int
    git_oid: str
    blob: Path
    sha256: str | None = None  # set for LFS files

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size,
                                 "path": path}
        if self.sha256 is not None:
            pointer = lfs_pointer(self.sha256, self.size)
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    files: dict[str, StoredFile]
    date: str = field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    )


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit_at(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class HubState:
    """Repos, their commits and the blob store (a folder)."""

    def __init__(self, root: Path, token: str | None):
        self.root = root
        self.token = token
        (root / "git").mkdir(parents=True, exist_ok=True)
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) log for assertions

    def store_regular(self, content: bytes) -> StoredFile:
        oid = git_blob_oid(content)
        blob = self.root / "git" / oid
        blob.write_bytes(content)
        return StoredFile(size=len(content), git_oid=oid, blob=blob)

    def lfs_object(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"bad LFS oid {sha256!r}")
        return self.root / "lfs" / sha256

    def stored_lfs(self, sha256: str) -> StoredFile | None:
        blob = self.lfs_object(sha256)
        if not blob.is_file():
            return None
        size = blob.stat().st_size
        return StoredFile(size=size, git_oid=git_blob_oid(lfs_pointer(sha256, size)), blob=blob,
                          sha256=sha256)

    def new_commit(self, repo: Repo, title: str, files: dict[str, StoredFile],
                   branch: str = "main") -> Commit:
        parent = repo.branches.get(branch)
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{time.time_ns()}\n"
        seed += "".join(f"{p}:{f.etag}\n" for p, f in sorted(files.items()))
        commit = Commit(sha=hashlib.sha1(seed.encode()).hexdigest(), parent=parent, title=title,
                        files=files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubHTTPServer

    # -- plumbing -----------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
             content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
        self.send(status, json.dumps(payload).encode(), headers, content_type)

    def authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            return False
        return self.state.token is None or header[7:].strip() == self.state.token

    def require_auth(self) -> None:
        if not self.authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.authorized()):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.commit_at(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def dispatch(self, routes: list[tuple[str, Any]]) -> None:
        path = urlsplit(self.path).path
        self.state.requests.append((self.command, path))
        try:
            with self.state.lock:
                for pattern, handler in routes:
                    match = re.fullmatch(pattern, path)
                    if match:
                        handler(**match.groupdict())
                        return
            raise HubError(404, f"no route for {self.command} {path}")
        except HubError as error:
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = error.message
            self.send_json({"error": error.message, **error.extra}, error.status, headers)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    # -- verbs --------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.dispatch(self.read_routes())

    def do_HEAD(self) -> None:
        self.dispatch(self.read_routes())

    def do_POST(self) -> None:
        self.dispatch([
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", self.validate_yaml),
            (rf"/api/(?P<kind>models|datasets)/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            (rf"/api/(?P<kind>models|datasets)/{REPO}/commit/(?P<rev>[^/]+)", self.commit_files),
            (rf"/api/(?P<kind>models|datasets)/{REPO}/paths-info/(?P<rev>[^/]+)", self.paths_info),
            (rf"/(?:(?P<kind>datasets)/)?{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
            (r"/__lfs/verify/(?P<oid>[0-9a-f]{64})", self.lfs_verify),
        ])

    def do_PUT(self) -> None:
        self.dispatch([(r"/__lfs/upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload)])

    def do_DELETE(self) -> None:
        self.dispatch([(r"/api/repos/delete", self.delete_repo)])

    def read_routes(self) -> list[tuple[str, Any]]:
        kinds = "(?P<kind>models|datasets)"
        return [
            (rf"/api/{kinds}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?", self.tree),
            (rf"/api/{kinds}/{REPO}/refs", self.refs),
            (rf"/api/{kinds}/{REPO}/commits/(?P<rev>[^/]+)", self.commits),
            (rf"/(?:(?P<kind>datasets)/)?{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            (r"/__cdn/(?P<sha>[0-9a-f]{40})/(?P<oid>[0-9a-f]{64})", self.cdn),
            # last: the other /api/{kind}s/{repo}/... routes would otherwise read as repo ids
            (rf"/api/{kinds}/{REPO}(?:/revision/(?P<rev>[^/]+))?", self.repo_info),
        ]

    # -- repos --------------------------------------------------------------------------

    def create_repo(self) -> None:
        self.require_auth()
        payload = json.loads(self.read_body() or b"{}")
        repo_type = payload.get("type") or "model"
        name, organization = payload.get("name"), payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else name
        if not name or repo_type not in URL_PREFIX:
            raise HubError(400, "invalid repo name or type")
        url = f"{self.base_url}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.state.repos:
            # the client reads "url" from the body of a 409 too (create_repo with exist_ok)
            raise HubError(409, "You already created this repo", extra={"url": url})
        private = payload.get("visibility", "private" if payload.get("private") else "public")
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private != "public")
        self.state.repos[(repo_type, repo_id)] = repo
        self.state.new_commit(repo, "initial commit",
                              {".gitattributes": self.state.store_regular(GITATTRIBUTES)})
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self) -> None:
        self.require_auth()
        payload = json.loads(self.read_body() or b"{}")
        organization, name = payload.get("organization"), payload.get("name")
        repo_id = f"{organization}/{name}" if organization else name
        key = (payload.get("type") or "model", repo_id)
        if self.state.repos.pop(key, None) is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        self.send(200)

    def validate_yaml(self) -> None:
        self.read_body()
        self.send_json({"errors": [], "warnings": []})

    def repo_info(self, kind: str, repo: str, rev: str | None = None) -> None:
        repo_obj = self.repo(PREFIX_TO_TYPE[kind], repo)
        commit = self.commit(repo_obj, rev or "main")
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = stored.tree_entry(path)
                sibling.update(size=stored.size, blobId=stored.git_oid)
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"],
                                      "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        author = repo.split("/")[0] if "/" in repo else None
        self.send_json({
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24],
            "id": repo,
            "modelId": repo,
            "author": author,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": next(iter(repo_obj.commits.values())).date,
            "private": repo_obj.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        })

    def tree(self, kind: str, repo: str, rev: str, sub: str | None = None) -> None:
        commit = self.commit(self.repo(PREFIX_TO_TYPE[kind], repo), rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = unquote(sub).strip("/") + "/" if sub else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if depth == 1 or recursive:
                    oid = hashlib.sha1(folder.encode()).hexdigest()
                    entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0,
                                                "path": folder})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = stored.tree_entry(path)
        self.send_json(list(entries.values()))

    def paths_info(self, kind: str, repo: str, rev: str) -> None:
        commit = self.commit(self.repo(PREFIX_TO_TYPE[kind], repo), rev)
        body = self.read_body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        result = []
        for path in paths:
            if path in commit.files:
                result.append(commit.files[path].tree_entry(path))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                result.append({"type": "directory", "path": path, "size": 0,
                               "oid": hashlib.sha1(path.encode()).hexdigest()})
        self.send_json(result)

    def refs(self, kind: str, repo: str) -> None:
        repo_obj = self.repo(PREFIX_TO_TYPE[kind], repo)
        self.send_json({
            "branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                         for name, sha in repo_obj.branches.items()],
            "tags": [], "converts": [],
        })

    def commits(self, kind: str, repo: str, rev: str) -> None:
        repo_obj = self.repo(PREFIX_TO_TYPE[kind], repo)
        commit: Commit | None = self.commit(repo_obj, rev)
        history = []
        while commit is not None:
            history.append({"id": commit.sha, "title": commit.title, "message": "",
                            "authors": [], "date": commit.date})
            commit = repo_obj.commits.get(commit.parent) if commit.parent else None
        self.send_json(history)

    # -- upload -------------------------------------------------------------------------

    def preupload(self, kind: str, repo: str, rev: str) -> None:
        self.require_auth()
        repo_obj = self.repo(PREFIX_TO_TYPE[kind], repo)
        commit = self.commit(repo_obj, rev)
        files = []
        for item in json.loads(self.read_body()).get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = path.endswith(LFS_SUFFIXES) or size > LFS_SIZE_LIMIT
            existing = commit.files.get(path)
            if existing is None:
                oid = None
            else:  # the client compares this with its local oid to skip unchanged files
                oid = existing.sha256 if existing.sha256 else existing.git_oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self.send_json({"files": files, "commitOid": commit.sha})

    def lfs_batch(self, repo: str, kind: str | None = None) -> None:
        self.require_auth()
        self.repo("dataset" if kind else "model", repo)
        payload = json.loads(self.read_body())
        if payload.get("operation") != "upload":
            raise HubError(400, "only the upload operation is served")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.state.lfs_object(oid).is_file():
                entry["actions"] = {
                    "upload": {"href": f"{self.base_url}/__lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.base_url}/__lfs/verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self.send_json({"transfer": "basic", "objects": objects},
                       content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str) -> None:
        content = self.read_body()
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        self.state.lfs_object(oid).write_bytes(content)
        self.send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, oid: str) -> None:
        payload = json.loads(self.read_body())
        stored = self.state.stored_lfs(oid)
        if stored is None or stored.size != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {oid} missing or of the wrong size")
        self.send_json({"success": True})

    def commit_files(self, kind: str, repo: str, rev: str) -> None:
        self.require_auth()
        repo_type = PREFIX_TO_TYPE[kind]
        repo_obj = self.repo(repo_type, repo)
        revision = unquote(rev)
        head = self.commit(repo_obj, revision)
        files = dict(head.files)
        title = "commit"
        for line in self.read_body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary") or title
                parent = value.get("parentCommit")
                if parent is not None and parent != head.sha:
                    raise HubError(412, "parent commit is not the head of the branch")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "only base64 file content is served")
                files[value["path"]] = self.state.store_regular(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                stored = self.state.stored_lfs(value["oid"])
                if stored is None:
                    raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = stored
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        branch = revision if revision in repo_obj.branches else "main"
        commit = self.state.new_commit(repo_obj, title, files, branch)
        url = f"{self.base_url}/{URL_PREFIX[repo_type]}{repo}/commit/{commit.sha}"
        self.send_json({"success": True, "commitOid": commit.sha, "commitUrl": url,
                        "pullRequestUrl": None})

    # -- download -----------------------------------------------------------------------

    def resolve(self, repo: str, rev: str, file: str, kind: str | None = None) -> None:
        repo_obj = self.repo("dataset" if kind else "model", repo)
        commit = self.commit(repo_obj, rev)
        path = unquote(file)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound",
                           {"X-Repo-Commit": commit.sha})
        if stored.sha256 is not None:
            # Like the Hub: LFS files redirect to a storage URL; the metadata rides on the 302.
            self.send(302, b"", {
                "Location": f"/__cdn/{commit.sha}/{stored.sha256}",
                "X-Repo-Commit": commit.sha,
                "X-Linked-Etag": f'"{stored.sha256}"',
                "X-Linked-Size": str(stored.size),
                "ETag": f'"{stored.git_oid}"',
            })
            return
        self.send_blob(stored.blob, stored.etag, commit.sha)

    def cdn(self, sha: str, oid: str) -> None:
        stored = self.state.stored_lfs(oid)
        if stored is None:
            raise HubError(404, "no such object")
        self.send_blob(stored.blob, oid, sha)

    def send_blob(self, blob: Path, etag: str, commit_sha: str) -> None:
        content = blob.read_bytes()
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit_sha, "Accept-Ranges": "bytes"}
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(content) - 1, len(content) - 1)
            if start >= len(content):
                raise HubError(416, "range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(content)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start:end + 1], 206
        self.send(status, content, headers, content_type="application/octet-stream")


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), HubHandler)  # loopback only, any free port
        self.state = state


class LocalHub:
    """A running local Hub: ``url`` to put in HF_ENDPOINT, ``state`` to inspect."""

    def __init__(self, root: Path, token: str | None = None):
        self.state = HubState(root, token)
        self.server = HubHTTPServer(self.state)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="local-hub",
                                       daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def files(self, repo_id: str, repo_type: str = "model",
              revision: str = "main") -> dict[str, bytes]:
        """The repo's files at ``revision``, read straight from the store."""
        commit = self.state.repos[(repo_type, repo_id)].commit_at(revision)
        assert commit is not None
        return {path: stored.blob.read_bytes() for path, stored in commit.files.items()}
