"""A small Hugging Face hub on 127.0.0.1 for the hf:// tests: the two API routes HfApi.model_info uses and
`resolve/` with HTTP ranges. It records every file request (and its Range header).

`redirect=True` answers `resolve/` as the hub does for stored files: a redirect to where the bytes are
(`/cdn/...` here), which serves the ranges. `fail(n, status)` answers the next n file requests with that
status (a 503 of an overloaded server, say)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubRepo:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.files: dict[str, bytes] = {}
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as fh:
                self.files[name] = fh.read()
        digest = hashlib.sha1()
        for name, data in self.files.items():
            digest.update(name.encode() + b"\0" + data)
        self.sha = digest.hexdigest()  # the "commit" the revision resolves to

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        entry = {"rfilename": name, "size": len(data), "blobId": _git_blob_sha1(data)}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


class HubServer:
    def __init__(self, redirect: bool = False) -> None:
        self.repos: dict[str, HubRepo] = {}
        # {"method", "repo", "revision", "file", "range", "status", "bytes", "route": "resolve" | "cdn"}
        self.requests: list[dict] = []
        self.redirect = redirect
        self._failures: list[int] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, head=False)

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, repo_id: str, directory: str) -> HubRepo:
        repo = self.repos[repo_id] = HubRepo(directory)
        return repo

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._failures += [status] * count

    def file_requests(self, repo_id: str | None = None) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r.get("file") and (repo_id is None or r["repo"] == repo_id)]

    # --- routes ---------------------------------------------------------------------------------------

    def _send(self, h, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _handle(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$", path)
        if m:
            repo = self.repos.get(m.group(1))
            rev = m.group(2) or "main"
            if repo is None or rev not in ("main", repo.sha):
                return self._send(h, 404, b'{"error": "Repository not found"}',
                                  {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}, head)
            body = json.dumps({"id": m.group(1), "modelId": m.group(1), "sha": repo.sha, "private": False,
                               "siblings": [repo.sibling(n) for n in repo.files]}).encode()
            with self._lock:
                self.requests.append({"method": h.command, "repo": m.group(1), "api": True})
            return self._send(h, 200, body, {"Content-Type": "application/json"}, head)
        m = re.match(r"^/(?:cdn/)?([^/]+/[^/]+)/(?:resolve/)?([^/]+)/(.+)$", path)
        route = "cdn" if path.startswith("/cdn/") else "resolve"
        if not m or m.group(1) not in self.repos or (route == "resolve" and "/resolve/" not in path):
            return self._send(h, 404, b"not found", head=head)
        repo, rev, name = self.repos[m.group(1)], m.group(2), m.group(3)
        if rev not in ("main", repo.sha) or name not in repo.files:
            return self._send(h, 404, b"not found", head=head)
        data = repo.files[name]
        rng = h.headers.get("Range")
        record = {"method": h.command, "repo": m.group(1), "revision": rev, "file": name, "range": rng,
                  "size": len(data), "route": route}
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            record["status"] = failure
            with self._lock:
                self.requests.append(record)
            return self._send(h, failure, b"try again", head=head)
        if route == "resolve" and self.redirect:
            record["status"] = 302
            with self._lock:
                self.requests.append(record)
            return self._send(h, 302, b"", {"Location": f"/cdn/{m.group(1)}/{repo.sha}/{name}"}, head)
        headers = {"ETag": f'"{repo.sibling(name)["blobId"]}"', "X-Repo-Commit": repo.sha,
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if rng:
            r = re.match(r"^bytes=(\d+)-(\d*)$", rng)
            start = int(r.group(1))
            end = min(int(r.group(2)) if r.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                record["status"] = 416
                with self._lock:
                    self.requests.append(record)
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            body = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            record.update(status=206, bytes=len(body))
            with self._lock:
                self.requests.append(record)
            return self._send(h, 206, body, headers, head)
        record.update(status=200, bytes=len(data))
        with self._lock:
            self.requests.append(record)
        return self._send(h, 200, data, headers, head)
