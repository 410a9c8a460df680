"""A small Hub-compatible HTTP server for tests: the real huggingface_hub client talks to it.

It keeps repos in memory (branches -> commits -> files) and implements the endpoints that
huggingface_hub 2.x calls to create repos and branches, upload (preupload, LFS batch, commit),
read repo info and trees, and download (resolve). `tokens` (if set) are the accepted write tokens;
private repos need one to be seen. Every request is logged in `requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


class Repo:
    def __init__(self, private: bool):
        self.private = private
        empty = hashlib.sha1(b"initial").hexdigest()
        self.commits: dict[str, dict[str, bytes]] = {empty: {}}
        self.refs: dict[str, str] = {"main": empty}
        self.lfs_paths: set[str] = set()
        self.prs = 0

    def resolve(self, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.tokens: set[str] | None = None
        self.requests: list[tuple[str, str]] = []
        self.uploaded_bytes = 0


def make_handler(state: HubState, endpoint: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # ------------------------------------------------------------ helpers
        def _send(self, status, body=b"", headers=None, content_type="application/json"):
            if isinstance(body, dict | list):
                body = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status, code=None, message="error"):
            headers = (
                {"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message}
            )
            self._send(status, {"error": message}, headers)

        def _body(self) -> bytes:
            return self.body

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[7:] if auth.startswith("Bearer ") else None

        def _authorized(self) -> bool:
            return state.tokens is None or self._token() in state.tokens

        def _repo(self, repo_id) -> Repo | None:
            repo = state.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _commit_at(self, repo_id, rev) -> str | None:
            """The commit `rev` names in `repo_id`, or None after answering 404."""
            repo = self._repo(repo_id)
            if repo is None:
                return None
            commit = repo.resolve(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
            return commit

        def _need_write(self) -> bool:
            if self._token() is None or not self._authorized():
                self._error(401, None, "Invalid credentials in Authorization header")
                return False
            return True

        # ------------------------------------------------------------ routing
        def do_HEAD(self):
            self._route("HEAD")

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def _route(self, method):
            # always drain the body: leftover bytes would be read as the next request on this connection
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            url = urlparse(self.path)
            path, query = url.path, parse_qs(url.query)
            state.requests.append((method, path))
            routes = [
                ("POST", r"^/api/repos/create$", self.create_repo),
                ("POST", r"^/api/validate-yaml$", lambda: self._send(200, {})),
                ("POST", r"^/api/models/([^/]+/[^/]+)/preupload/(.+)$", self.preupload),
                ("POST", r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", self.lfs_batch),
                ("PUT", r"^/lfs-upload/([0-9a-f]{64})$", self.lfs_upload),
                ("POST", r"^/lfs-verify/([0-9a-f]{64})$", lambda oid: self._send(200, {})),
                (
                    "POST",
                    r"^/api/models/([^/]+/[^/]+)/commit/(.+)$",
                    lambda r, rev: self.commit(r, rev, query),
                ),
                ("POST", r"^/api/models/([^/]+/[^/]+)/branch/(.+)$", self.create_branch),
                ("GET", r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", self.tree),
                ("GET", r"^/api/models/([^/]+/[^/]+)/revision/(.+)$", self.info),
                ("GET", r"^/api/models/([^/]+/[^/]+)$", lambda r: self.info(r, "main")),
                ("HEAD", r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.resolve),
                ("GET", r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.resolve),
            ]
            for verb, pattern, handler in routes:
                match = re.match(pattern, path)
                if verb == method and match:
                    return handler(*match.groups())
            self._error(404, None, f"no route for {method} {path}")

        # ------------------------------------------------------------ endpoints
        def create_repo(self):
            payload = json.loads(self._body() or b"{}")
            if not self._need_write():
                return
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            if repo_id in state.repos:  # the Hub names the existing repo in its 409 answer
                return self._send(
                    409, {"error": "You already created this model repo", "url": f"{endpoint[0]}/{repo_id}"}
                )
            state.repos[repo_id] = Repo(bool(payload.get("private")))
            self._send(200, {"url": f"{endpoint[0]}/{repo_id}", "name": repo_id})

        def create_branch(self, repo_id, branch):
            self._body()
            if not self._need_write():
                return
            repo = self._repo(repo_id)
            if repo is None:
                return
            branch = unquote(branch)
            if branch in repo.refs:
                return self._error(409, None, "Reference already exists")
            repo.refs[branch] = repo.refs["main"]
            self._send(200, {})

        def preupload(self, repo_id, rev):
            payload = json.loads(self._body())
            repo = self._repo(repo_id)
            if repo is None:
                return
            commit = repo.resolve(rev)
            files = repo.commits.get(commit, {}) if commit else {}
            out = []
            for f in payload["files"]:
                lfs = f["path"].endswith(".safetensors")
                existing = files.get(f["path"])
                oid = None
                if existing is not None:
                    oid = hashlib.sha256(existing).hexdigest() if lfs else git_sha1(existing)
                out.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            self._send(200, {"files": out, "commitOid": commit})

        def lfs_batch(self, repo_id):
            payload = json.loads(self._body())
            if not self._need_write():
                return
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in state.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{endpoint[0]}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{endpoint[0]}/lfs-verify/{obj['oid']}"},
                    }
                objects.append(entry)
            self._send(
                200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
            )

        def lfs_upload(self, oid):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "sha256 mismatch")
            state.lfs[oid] = data
            state.uploaded_bytes += len(data)
            self._send(200, {})

        def commit(self, repo_id, rev, query):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not self._need_write():
                return
            repo = self._repo(repo_id)
            if repo is None:
                return
            rev = unquote(rev)
            parent = repo.resolve(rev)
            if parent is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(repo.commits[parent])
            for line in lines:
                kind, value = line["key"], line["value"]
                if kind == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = data
                    state.uploaded_bytes += len(data)
                elif kind == "lfsFile":
                    if value["oid"] not in state.lfs:
                        return self._error(400, None, f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = state.lfs[value["oid"]]
                elif kind == "deletedFile":
                    files.pop(value["path"], None)
            sha = hashlib.sha1(json.dumps([parent, lines]).encode()).hexdigest()
            repo.commits[sha] = files
            pr_url = None
            if query.get("create_pr"):
                repo.prs += 1
                repo.refs[f"refs/pr/{repo.prs}"] = sha
                pr_url = f"{endpoint[0]}/{repo_id}/discussions/{repo.prs}"
            else:
                repo.refs[rev] = sha
            self._send(
                200,
                {
                    "commitUrl": f"{endpoint[0]}/{repo_id}/commit/{sha}",
                    "commitOid": sha,
                    "pullRequestUrl": pr_url,
                },
            )

        def info(self, repo_id, rev):
            commit = self._commit_at(repo_id, rev)
            if commit is None:
                return
            repo = state.repos[repo_id]
            self._send(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])],
                },
            )

        def tree(self, repo_id, rev, prefix):
            commit = self._commit_at(repo_id, rev)
            if commit is None:
                return
            repo = state.repos[repo_id]
            entries = []
            for p, data in sorted(repo.commits[commit].items()):
                if prefix and not p.startswith(prefix):
                    continue
                entry = {"type": "file", "path": p, "size": len(data), "oid": git_sha1(data)}
                if p.endswith(".safetensors"):
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                entries.append(entry)
            self._send(200, entries)

        def resolve(self, repo_id, rev, path):
            commit = self._commit_at(repo_id, rev)
            if commit is None:
                return
            repo = state.repos[repo_id]
            data = repo.commits[commit].get(unquote(path))
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            etag = hashlib.sha256(data).hexdigest() if path.endswith(".safetensors") else git_sha1(data)
            self._send(
                200,
                data,
                {"X-Repo-Commit": commit, "ETag": f'"{etag}"'},
                content_type="application/octet-stream",
            )

    return Handler


class HubServer:
    """Start on a free port of 127.0.0.1; `url` is the endpoint; stop() shuts it down."""

    def __init__(self, port: int = 0):
        self.state = HubState()
        endpoint: list[str] = [""]
        self._server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self.state, endpoint))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        endpoint[0] = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
