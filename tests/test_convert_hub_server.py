"""A tiny local stand-in for the Hugging Face Hub HTTP API, for testing `convert_checkpoint.py --push-to-hub` offline.

It speaks the subset that huggingface_hub's `create_repo`, `upload_folder` and `hf_hub_download` (hence
`from_pretrained`) use: repo creation, model-card metadata validation, preupload (every file is a "regular" upload,
so no LFS / Xet storage is involved), NDJSON commits with base64 file contents, `resolve` HEAD/GET, and repo info.
It binds to 127.0.0.1 only, keeps everything in memory, checks a bearer token, and stops itself after `lifetime_s`
at the latest.
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest


class LocalHub:
    """`with LocalHub(token) as hub:` serves at `hub.endpoint` until the block ends or `lifetime_s` passes."""

    def __init__(self, token: str = "hf_local_test_token", lifetime_s: float = 120.0):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "sha": str}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------------------------------------ request handling

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

        return Handler

    def _dispatch(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlparse(request.path).path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        authorized = request.headers.get("Authorization") == f"Bearer {self.token}"
        parts = path.strip("/").split("/")
        try:
            if method == "POST" and path == "/api/repos/create":
                status, headers, payload = self._create_repo(json.loads(body), authorized)
            elif method == "POST" and path == "/api/validate-yaml":
                status, headers, payload = self._validate_yaml(json.loads(body))
            elif method == "POST" and len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                status, headers, payload = self._preupload(f"{parts[2]}/{parts[3]}", json.loads(body), authorized)
            elif method == "POST" and len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                status, headers, payload = self._commit(f"{parts[2]}/{parts[3]}", body, authorized)
            elif method in ("GET", "HEAD") and len(parts) >= 4 and parts[:2] == ["api", "models"]:
                status, headers, payload = self._repo_info(f"{parts[2]}/{parts[3]}", authorized)
            elif method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                status, headers, payload = self._resolve(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), authorized)
            else:
                status, headers, payload = 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"no route {path}"}
        except (ValueError, KeyError) as error:
            status, headers, payload = 400, {}, {"error": f"bad request: {error}"}
        self.requests.append((method, path, status))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        if not isinstance(payload, bytes):
            request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if method != "HEAD":
            request.wfile.write(data)

    def _repo(self, repo_id: str, authorized: bool) -> dict | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and not authorized):
            return None
        return repo

    @staticmethod
    def _repo_not_found(repo_id: str):
        return 404, {"X-Error-Code": "RepoNotFound"}, {"error": f"Repository {repo_id} not found"}

    def _create_repo(self, payload: dict, authorized: bool):
        if not authorized:
            return 401, {}, {"error": "Invalid credentials"}
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            return 409, {}, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.repos[repo_id] = {"private": private, "files": {}, "sha": "0" * 40}
        return 200, {}, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    @staticmethod
    def _validate_yaml(payload: dict):
        content = payload["content"]
        if not content.startswith("---\n") or "\n---\n" not in content[4:]:
            return 400, {}, {"errors": [{"message": "README.md metadata must be a YAML block between --- lines"}]}
        return 200, {}, {"warnings": []}

    def _preupload(self, repo_id: str, payload: dict, authorized: bool):
        if not authorized or self._repo(repo_id, authorized) is None:
            return self._repo_not_found(repo_id)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        return 200, {}, {"files": files}

    def _commit(self, repo_id: str, body: bytes, authorized: bool):
        repo = self._repo(repo_id, authorized)
        if not authorized or repo is None:
            return self._repo_not_found(repo_id)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {}, {"error": "a commit starts with its header"}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return 400, {}, {"error": f"unsupported commit operation {line['key']}"}
            repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        digest = hashlib.sha1(repo["sha"].encode())
        for name, content in sorted(repo["files"].items()):
            digest.update(name.encode() + hashlib.sha256(content).digest())
        repo["sha"] = digest.hexdigest()
        url = f"{self.endpoint}/{repo_id}/commit/{repo['sha']}"
        return 200, {}, {"commitUrl": url, "commitOid": repo["sha"], "pullRequestUrl": None}

    def _repo_info(self, repo_id: str, authorized: bool):
        repo = self._repo(repo_id, authorized)
        if repo is None:
            return self._repo_not_found(repo_id)
        siblings = [{"rfilename": name} for name in sorted(repo["files"])]
        return 200, {}, {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": repo["private"],
                         "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}

    def _resolve(self, repo_id: str, filename: str, authorized: bool):
        repo = self._repo(repo_id, authorized)
        if repo is None:
            return self._repo_not_found(repo_id)
        content = repo["files"].get(filename)
        if content is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["sha"]}, {"error": "Entry not found"}
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        return 200, {"X-Repo-Commit": repo["sha"], "ETag": etag}, content


def test_local_hub_refuses_unauthenticated_writes_and_stops():
    import urllib.error
    import urllib.request

    with LocalHub(token="secret", lifetime_s=30) as hub:
        request = urllib.request.Request(f"{hub.endpoint}/api/repos/create", data=b'{"name": "x"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=5)
        assert error.value.code == 401
        assert hub.endpoint.startswith("http://127.0.0.1:")
    with pytest.raises(OSError):  # stopped: nothing listens any more
        urllib.request.urlopen(f"{hub.endpoint}/api/models/a/b", timeout=2)
