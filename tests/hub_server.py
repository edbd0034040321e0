"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only, 127.0.0.1, a free port).

It speaks the subset of the Hub's API that ``huggingface_hub`` uses to create repos, commit files (regular
and LFS), tag commits, list refs / commits / trees, and download files (HEAD, GET, ``Range``). Everything is
kept in memory. Tests can inspect what was served and inject faults:

    hub = FakeHub(tokens={"hf_good"}).start()
    hub.fail("GET", r"/api/models/.*/revision/", kind="500")   # the next matching request gets a 500
    hub.fail("GET", r"/resolve/", kind="drop")                 # ... or a dropped connection
    hub.served_bytes("org/name", "adapter_model.safetensors")  # body bytes sent for that file
    hub.stop()

Hostile behaviours, for the tests that show Hub answers are untrusted:

    hub.fail("GET", r"/refs$", kind="echo")                     # a 400 quoting the request's Authorization header
    hub.rewrite(r"/revision/", lambda doc: {**doc, "sha": "zz"})  # tamper with JSON answers of matching paths
    hub.file_headers = {"ETag": '"../../../../x"'}              # override headers of file answers (HEAD and GET)
    hub.oversize = 1 << 20                                     # whole-file GETs send 1 MiB more than the file ...
    hub.oversize, hub.declare_size = None, False               # ... or never end, and say no Content-Length
    hub.range_padding = 16                                     # ranged answers send 16 bytes more than asked

Run ``python tests/hub_server.py [--port PORT] [--token TOKEN]`` to serve on a free port (or PORT), e.g. for manual
CLI checks; it prints the ``HF_ENDPOINT=...`` line to use, and with ``--token`` accepts only that token (401
otherwise). ``--help`` says so.
It proves compatibility with the client, not with the real Hub (no Xet, no CDN redirects, no rate limits).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import socket
import sys
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit


if TYPE_CHECKING:
    import pytest


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    """One file in a commit: inline bytes for regular files, a sha256 into the LFS store for LFS files."""

    size: int
    blob_id: str
    data: bytes | None = None
    lfs_sha256: str | None = None


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, StoredFile]
    title: str
    message: str
    date: str
    author: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (commit, message)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    kind: str  # "500" | "drop" | "drop-after" | "echo"
    remaining: int


#: an endless body (``oversize=None``) stops here if the client never hangs up
ENDLESS_LIMIT = 1 << 30


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class FakeHub:
    """The server's state and its controls. ``tokens``: accepted tokens (None accepts any token and none).
    ``anonymous``: whether a request without a token may read public repos (as on the Hub); False answers it 401,
    as the Hub answers a private repo (``--token`` on the command line)."""

    def __init__(self, *, tokens: set[str] | None = None, user: str = "tester", anonymous: bool = True) -> None:
        self.tokens = tokens
        self.anonymous = anonymous
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.served: Counter[tuple[str, str]] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.rewrites: list[tuple[re.Pattern[str], Callable[[Any], Any]]] = []
        #: headers that replace or add to those of every file answer (``/resolve/``)
        self.file_headers: dict[str, str] = {}
        #: bytes a whole-file GET sends beyond the file (0: none; None: no end until the client hangs up)
        self.oversize: int | None = 0
        #: whether an oversized answer says its length (Content-Length) or is delimited by closing the connection
        self.declare_size = True
        #: bytes a ranged (206) answer sends beyond the range it was asked for
        self.range_padding = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # ------------------------------------------------------------------ controls

    def start(self, port: int = 0) -> FakeHub:
        server = _Server(("127.0.0.1", port), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail(self, method: str, pattern: str, *, kind: str = "500", times: int = 1) -> None:
        """Make the next ``times`` requests whose method and path match answer 500 (``500``), lose the connection
        before handling them (``drop``), or handle them and then lose the connection before answering
        (``drop-after``: the request took effect but the client never hears so), or answer 400 with an error message
        quoting the request's Authorization header (``echo``: a server that leaks what it was sent)."""
        if kind not in ("500", "drop", "drop-after", "echo"):
            raise ValueError(kind)
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(pattern), kind, times))

    def rewrite(self, pattern: str, fn: Callable[[Any], Any]) -> None:
        """Pass every successful JSON answer to a request whose path matches ``pattern`` through ``fn`` (a hostile
        server: a non-hex commit id, a file named ``../../x``, escape sequences in a commit title...)."""
        with self.lock:
            self.rewrites.append((re.compile(pattern), fn))

    def stored_bytes(self) -> bytes:
        """Every byte the server holds (regular files, LFS objects, commit titles and messages, tag messages):
        what a test searches for a secret that must never reach the Hub."""
        with self.lock:
            parts = list(self.lfs.values())
            for repo in self.repos.values():
                parts += [m.encode() for _, m in repo.tags.values()]
                for c in repo.commits.values():
                    parts += [c.title.encode(), c.message.encode(), *(f.data or b"" for f in c.files.values())]
                    parts += [p.encode() for p in c.files]
        return b"\n".join(parts)

    def served_bytes(self, repo_id: str, path: str) -> int:
        """Body bytes of ``path`` sent by GET .../resolve/... so far (HEAD and metadata excluded)."""
        return self.served[(repo_id, path)]

    def file_size(self, repo_id: str, path: str, revision: str = "main") -> int:
        repo = self.repos[("model", repo_id)]
        return repo.commits[self._resolve(repo, revision)].files[path].size

    def hits(self, method: str, pattern: str) -> list[dict[str, Any]]:
        rx = re.compile(pattern)
        return [r for r in self.requests if r["method"] == method and rx.search(r["path"])]

    # --------------------------------------------------------------- repo logic

    def _take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if f.remaining > 0 and f.method == method and f.pattern.search(path):
                    f.remaining -= 1
                    return f.kind
        return None

    def _repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev][0]
        if rev in repo.commits:
            return rev
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix):
                return self._resolve(repo, rev[len(prefix) :])
        raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return False
            repo = Repo(repo_id, repo_type, private)
            self.repos[(repo_type, repo_id)] = repo
            init = StoredFile(len(GITATTRIBUTES), git_blob_sha1(GITATTRIBUTES), data=GITATTRIBUTES)
            self._add_commit(repo, "main", None, {".gitattributes": init}, "initial commit", "")
            return True

    def _add_commit(
        self, repo: Repo, branch: str, parent: str | None, files: dict[str, StoredFile], title: str, message: str
    ) -> str:
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[oid] = Commit(oid, parent, files, title, message, _now(), self.user)
        repo.branches[branch] = oid
        return oid

    def commit(self, repo: Repo, branch: str, lines: list[dict[str, Any]]) -> str:
        header: dict[str, Any] = {}
        ops: list[tuple[str, dict[str, Any]]] = []
        for line in lines:
            if line.get("key") == "header":
                header = line["value"]
            else:
                ops.append((line["key"], line["value"]))
        with self.lock:
            head = repo.branches.get(branch)
            if head is None:
                raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HttpError(412, f"A commit has happened since. Please refresh and try again. ({head})")
            files = dict(repo.commits[head].files)
            for key, value in ops:
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path] = StoredFile(len(data), git_blob_sha1(data), data=data)
                elif key == "lfsFile":
                    oid, size = value["oid"], int(value["size"])
                    if oid not in self.lfs:
                        raise HttpError(400, f"LFS object {oid} was not uploaded")
                    pointer = lfs_pointer(oid, size)
                    files[path] = StoredFile(size, git_blob_sha1(pointer), lfs_sha256=oid)
                elif key == "deletedFile":
                    files.pop(path, None)
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise HttpError(400, f"unknown commit line {key!r}")
            title = header.get("summary") or "commit"
            return self._add_commit(repo, branch, head, files, title, header.get("description") or "")

    def file_entry(self, path: str, f: StoredFile) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": f.size, "oid": f.blob_id}
        if f.lfs_sha256:
            entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": len(lfs_pointer(f.lfs_sha256, f.size))}
        return entry

    def content(self, f: StoredFile) -> bytes:
        return f.data if f.data is not None else self.lfs[f.lfs_sha256 or ""]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (as one refusing an oversized answer does) is not an error of the server's."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ----------------------------------------------------------------- plumbing

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined,no-any-return]

    def _read_body(self) -> bytes:
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
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", **headers: str) -> None:
        if self._record.get("status") == 0:
            self._record["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, **headers: str) -> None:
        if status < 400:
            for pattern, fn in list(self.hub.rewrites):
                if pattern.search(self._record["path"]):
                    doc = fn(doc)
        self._send(status, json.dumps(doc).encode(), **headers)

    def _dispatch(self, method: str) -> None:
        body = self._read_body()  # always drain, or keep-alive breaks
        url = urlsplit(self.path)
        record: dict[str, Any] = {
            "method": method,
            "path": url.path,
            "range": self.headers.get("Range"),
            "auth": self.headers.get("Authorization"),
            "status": 0,
        }
        self._record = record
        self.hub.requests.append(record)
        fault = self.hub._take_fault(method, url.path)
        if fault == "drop":
            record["status"] = -1
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "500":
            record["status"] = 500
            self._json(500, {"error": "injected fault"})
            return
        if fault == "echo":
            record["status"] = 400
            auth = self.headers.get("Authorization", "")
            echoed = f"bad request: token {auth.removeprefix('Bearer ')} is not valid here (Authorization: {auth})"
            body = {"error": f"\x1b[31m{echoed}\x1b]0;pwned\x07\x1b[2J\r\u202e", "url": self.path}
            self._json(400, body, X_Error_Message=echoed)
            return
        if fault == "drop-after":
            self.wfile = io.BytesIO()  # handle it, then answer nothing
            self.close_connection = True
        try:
            authorized = self._check_token(url.path)
            self._route(method, url.path, parse_qs(url.query), body, authorized, record)
        except HttpError as e:
            record["status"] = e.status
            headers = {"X_Error_Message": e.message}
            if e.code:
                headers["X_Error_Code"] = e.code
            self._json(e.status, {"error": e.message}, **headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            record["status"] = 500
            self._json(500, {"error": traceback.format_exc()})
        if fault == "drop-after":
            record["status"] = -1
            self.connection.shutdown(socket.SHUT_RDWR)

    def _check_token(self, path: str) -> bool:
        """True when a valid token came; raises 401 for a wrong one (as the Hub does) and for writes without one."""
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if path.startswith("/lfs-upload/"):  # a pre-signed URL: no token
            return True
        if self.hub.tokens is None:
            return True
        if token is not None and token not in self.hub.tokens:
            raise HttpError(401, BAD_TOKEN_MESSAGE)
        if token is None and self.command in ("POST", "PUT", "DELETE") and path != "/api/validate-yaml":
            raise HttpError(401, "You must be authenticated to do this")
        if token is None and not self.hub.anonymous:
            raise HttpError(401, "You must be authenticated to access this resource")
        return token is not None

    # ------------------------------------------------------------------- routes

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, auth: bool, record: dict[str, Any]
    ) -> None:
        hub = self.hub
        if path == "/api/whoami-v2":
            self._json(200, {"name": hub.user, "type": "user", "orgs": [], "auth": {"type": "access_token"}})
        elif path == "/api/validate-yaml":
            self._json(200, {"errors": [], "warnings": []})
        elif path == "/api/repos/create" and method == "POST":
            self._create_repo(json.loads(body or b"{}"))
        elif path == "/api/repos/delete" and method == "DELETE":
            doc = json.loads(body or b"{}")
            repo_id = f"{doc.get('organization') or hub.user}/{doc['name']}"
            if hub.repos.pop((doc.get("type") or "model", repo_id), None) is None:
                raise HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
            self._json(200, {})
        elif path.startswith("/lfs-upload/") and method == "PUT":
            sha = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != sha:
                raise HttpError(400, "sha256 of the uploaded body does not match")
            hub.lfs[sha] = body
            self._json(200, {})
        elif path.startswith("/api/"):
            self._api(method, [unquote(p) for p in path.split("/")[2:]], query, body, auth, record)
        elif (m := re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)) is not None:
            self._lfs_batch(json.loads(body))
        elif (m := re.match(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$", path)) is not None:
            kind = (m[1] or "models")[:-1]
            repo = hub._repo(kind, f"{m[2]}/{m[3]}", auth)
            self._resolve_file(repo, unquote(m[4]), unquote(m[5]), record)
        else:
            raise HttpError(404, f"no route for {method} {path}")

    def _create_repo(self, doc: dict[str, Any]) -> None:
        repo_id = f"{doc.get('organization') or self.hub.user}/{doc['name']}"
        private = bool(doc.get("private")) or doc.get("visibility") == "private"
        url = f"{self.hub.url}/{repo_id}"
        if self.hub.create_repo(doc.get("type") or "model", repo_id, private):
            self._json(200, {"url": url, "name": repo_id})
        else:
            self._json(409, {"url": url, "error": "You already created this model repo"})

    def _lfs_batch(self, doc: dict[str, Any]) -> None:
        objects = []
        for obj in doc.get("objects", []):
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

    def _api(
        self, method: str, parts: list[str], query: dict[str, list[str]], body: bytes, auth: bool, rec: dict[str, Any]
    ) -> None:
        hub = self.hub
        if len(parts) < 3 or parts[0] not in ("models", "datasets", "spaces"):
            raise HttpError(404, "unknown API route")
        kind, repo_id, rest = parts[0][:-1], f"{parts[1]}/{parts[2]}", parts[3:]
        if rest and rest[0].startswith("xet-"):
            raise HttpError(501, "Xet is not supported by this test server: set HF_HUB_DISABLE_XET=1")
        repo = hub._repo(kind, repo_id, auth)
        action = rest[0] if rest else "info"
        if action in ("info", "revision") and method == "GET":
            rev = rest[1] if len(rest) > 1 else "main"
            self._json(200, self._info(repo, rev, "true" in query.get("blobs", [])))
        elif action == "refs":
            ref = lambda kind_, name, oid: {"name": name, "ref": f"refs/{kind_}/{name}", "targetCommit": oid}  # noqa: E731
            self._json(
                200,
                {
                    "branches": [ref("heads", n, o) for n, o in sorted(repo.branches.items())],
                    "tags": [ref("tags", n, o) for n, (o, _) in sorted(repo.tags.items())],
                    "converts": [],
                    "pullRequests": [],
                },
            )
        elif action == "commits":
            oid: str | None = hub._resolve(repo, rest[1] if len(rest) > 1 else "main")
            history = []
            while oid is not None:
                c = repo.commits[oid]
                history.append(
                    {
                        "id": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "date": c.date,
                        "authors": [{"user": c.author}],
                    }
                )
                oid = c.parent
            self._json(200, history)
        elif action == "tree":
            commit = repo.commits[hub._resolve(repo, rest[1] if len(rest) > 1 else "main")]
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            self._json(200, self._tree(commit, prefix, recursive))
        elif action == "paths-info" and method == "POST":
            commit = repo.commits[hub._resolve(repo, rest[1])]
            form = parse_qs(body.decode())
            paths = form.get("paths", []) or (json.loads(body).get("paths", []) if body.startswith(b"{") else [])
            self._json(200, [hub.file_entry(p, commit.files[p]) for p in paths if p in commit.files])
        elif action == "preupload" and method == "POST":
            files = json.loads(body).get("files", [])
            self._json(
                200,
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                            "shouldIgnore": False,
                            "oid": None,
                        }
                        for f in files
                    ]
                },
            )
        elif action == "commit" and method == "POST":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            oid = hub.commit(repo, rest[1], lines)
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})
        elif action == "tag":
            self._tag(repo, method, rest[1], json.loads(body or b"{}"))
        elif action == "branch":
            with hub.lock:
                if method == "DELETE":
                    repo.branches.pop(rest[1], None)
                else:
                    start = json.loads(body or b"{}").get("startingPoint") or "main"
                    repo.branches[rest[1]] = hub._resolve(repo, start)
            self._json(200, {})
        else:
            raise HttpError(404, f"unknown API route {method} {'/'.join(parts)}")

    def _tag(self, repo: Repo, method: str, rev: str, doc: dict[str, Any]) -> None:
        hub = self.hub
        with hub.lock:
            if method == "DELETE":
                if repo.tags.pop(rev, None) is None:
                    raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            else:
                name = doc["tag"]
                if name in repo.tags:
                    raise HttpError(409, f"Tag {name} already exists")
                repo.tags[name] = (hub._resolve(repo, rev), doc.get("message") or "")
        self._json(200, {})

    def _info(self, repo: Repo, rev: str, blobs: bool) -> dict[str, Any]:
        oid = self.hub._resolve(repo, rev)
        commit = repo.commits[oid]
        siblings = []
        for path, f in sorted(commit.files.items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=f.size, blobId=f.blob_id)
                if f.lfs_sha256:
                    s["lfs"] = {
                        "sha256": f.lfs_sha256,
                        "size": f.size,
                        "pointerSize": len(lfs_pointer(f.lfs_sha256, f.size)),
                    }
            siblings.append(s)
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "lastModified": commit.date,
            "createdAt": repo.commits[min(repo.commits, key=lambda o: repo.commits[o].date)].date,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        }

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        base = prefix + "/" if prefix else ""
        for path, f in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base) :]
            if "/" in rest and not recursive:
                dirs.add(base + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                dirs.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
            out.append(self.hub.file_entry(path, f))
        out += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0} for d in dirs]
        if prefix and not out:
            raise HttpError(404, f"{prefix} does not exist", "EntryNotFound")
        return out

    def _resolve_file(self, repo: Repo, rev: str, path: str, record: dict[str, Any]) -> None:
        hub = self.hub
        with hub.lock:
            oid = hub._resolve(repo, rev)
            f = repo.commits[oid].files.get(path)
            if f is None:
                raise HttpError(404, f"Entry not found: {path}", "EntryNotFound")
            data = hub.content(f)
        etag = f.lfs_sha256 or f.blob_id
        headers = {"X_Repo_Commit": oid, "ETag": f'"{etag}"', "Accept_Ranges": "bytes"}
        headers.update({k.replace("-", "_"): v for k, v in hub.file_headers.items()})
        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if rng and (m := re.match(r"bytes=(\d*)-(\d*)$", rng.strip())):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            else:
                start = max(0, len(data) - int(m[2]))
            if start >= len(data) and len(data) > 0:
                record["status"] = 416
                self._send(416, b"", Content_Range=f"bytes */{len(data)}")
                return
            status = 206
            headers["Content_Range"] = f"bytes {start}-{end}/{len(data)}"
        record["status"] = status
        if status == 200 and hub.oversize != 0:
            self._send_oversized(repo, path, data, headers)
            return
        padding = hub.range_padding if status == 206 else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1 + padding))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if padding:  # a ranged answer longer than the range it says it holds
            data = data[: end + 1] + bytes(padding)
            end += padding
        view = memoryview(data)
        pos = start
        while pos <= end:  # stream outside the metadata lock
            n = min(1 << 20, end + 1 - pos)
            with hub.lock:  # counted before it goes out, so a client that got it never sees a stale count
                hub.served[(repo.repo_id, path)] += n
            self.wfile.write(view[pos : pos + n])
            pos += n

    def _send_oversized(self, repo: Repo, path: str, data: bytes, headers: dict[str, str]) -> None:
        """The file, then ``hub.oversize`` more bytes (or bytes without end), with or without a Content-Length."""
        hub = self.hub
        extra = ENDLESS_LIMIT if hub.oversize is None else hub.oversize
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if hub.declare_size and hub.oversize is not None:
            self.send_header("Content-Length", str(len(data) + extra))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command == "HEAD":
            return
        chunk = b"\0" * (1 << 16)
        body = [data]
        sent, total = 0, len(data) + extra
        try:
            while sent < total:
                piece = body.pop() if body else chunk[: total - sent]
                with hub.lock:
                    hub.served[(repo.repo_id, path)] += len(piece)
                self.wfile.write(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@contextlib.contextmanager
def serving(
    monkeypatch: pytest.MonkeyPatch, *, tokens: set[str] | None, token: str | None, anonymous: bool = True
) -> Iterator[FakeHub]:
    """A fresh server accepting ``tokens`` (and requests without one when ``anonymous``), with huggingface_hub
    pointed at it and ``HF_TOKEN`` set to ``token``.

    conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, and the endpoint, Xet switch, offline
    flag and cache folder are module constants read at import: patch the constants, not only the environment.
    The saved login is looked for beside the per-test cache (none unless a test writes one), and retries pause
    10 ms.
    """
    server = FakeHub(tokens=tokens, anonymous=anonymous).start()
    point_at(monkeypatch, server.url, token=token)
    try:
        yield server
    finally:
        server.stop()


def point_at(monkeypatch: pytest.MonkeyPatch, url: str, *, token: str | None) -> None:
    """Point huggingface_hub (constants and environment) at the server at ``url``, ``HF_TOKEN`` set to ``token``
    (unset for None), online, Xet off, retries pausing 10 ms (see :func:`serving`)."""
    from huggingface_hub import constants

    from adapterhub_cli.stores.hf import client as hub_client

    cache = os.environ["HF_HUB_CACHE"]  # the per-test cache conftest set up
    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_CACHE": cache,
        "HF_TOKEN_PATH": str(Path(cache).parent / "token"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    for name, value in {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(name, value)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_client, "BACKOFF_SECONDS", 0.01)


def main(argv: list[str] | None = None) -> None:
    """``python tests/hub_server.py [--port PORT] [--token TOKEN]``: serve until interrupted (see ``--help``)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python tests/hub_server.py",
        description="A small Hugging Face Hub-compatible server for trying push / pull / versions by hand: in "
        "memory, on 127.0.0.1, until Ctrl-C. It prints the environment to point huggingface_hub (and adapters) "
        "at it. It proves compatibility with the client, not with the real Hub.",
        epilog="example: python tests/hub_server.py --token hf_test & then, in the printed environment: "
        "adapters push ./my-lora org/my-lora --version 0.1.0 --token hf_test",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="accept only this token: a request without it or with another gets 401, as the Hub answers "
        "(default: any token and none are accepted)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number (0 to 65535; 0 picks a free one)")
    if args.token is not None and not args.token.strip():
        parser.error("--token is empty: give the token to accept, or leave --token out to accept any")
    tokens = {args.token} if args.token else None
    try:
        hub = FakeHub(tokens=tokens, anonymous=tokens is None).start(args.port)
    except OSError as e:
        parser.error(f"cannot listen on 127.0.0.1:{args.port}: {e.strerror or e}")
    print(f"serving a Hub-compatible server at {hub.url} (Ctrl-C stops it); use it with:", flush=True)
    print(f"export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1", flush=True)
    if args.token:
        print("export HF_TOKEN=<the token given with --token>", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
