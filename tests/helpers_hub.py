"""A local stand-in for the Hugging Face Hub's upload endpoints, enough for ``HfApi.create_repo`` and
``upload_folder`` (regular files inline in the commit, large ones through the LFS batch API), so the
push tests run against a real HTTP server and the real client, never the network. ``HF_ENDPOINT``
points the client at it; ``HF_HUB_DISABLE_XET`` keeps it on the LFS protocol this stand-in speaks."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_ABOVE = 1 << 20  # files over 1 MiB go through LFS, as the Hub decides for weights


@dataclass
class Repo:
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubStandIn:
    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.refuse: int | None = None  # answer every call with this status (a refusing Hub)
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, doc: object = None) -> None:
        data = json.dumps(doc if doc is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return False
        if self.hub.refuse:
            self._send(self.hub.refuse, {"error": "refused by the stand-in"})
            return False
        return True

    def do_PUT(self) -> None:  # noqa: N802 - the LFS upload of one object
        self.hub.requests.append(f"PUT {self.path}")
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
        data = self._body()
        if not m or hashlib.sha256(data).hexdigest() != m.group(1):
            return self._send(400, {"error": "bad object"})
        self.hub.lfs[m.group(1)] = data
        self._send(200)

    def do_POST(self) -> None:  # noqa: N802
        self.hub.requests.append(f"POST {self.path}")
        if not self._authorised():
            return
        body = self._body()
        if self.path == "/api/repos/create":
            doc = json.loads(body)
            repo_id = f"{doc.get('organization') or 'me'}/{doc['name']}"
            private = doc.get("visibility") == "private" or bool(doc.get("private"))
            self.hub.repos.setdefault(repo_id, Repo(private=private))
            return self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if self.path == "/api/validate-yaml":  # the model card's metadata
            return self._send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
        if m and m.group(2) == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["size"] > LFS_ABOVE else "regular", "shouldIgnore": False}
                for f in files]})
        if m and m.group(2) == "commit":
            return self._commit(m.group(1), body)
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.path)
        if m:
            objects = json.loads(body)["objects"]
            return self._send(200, {"objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}"}}} for o in objects]})
        self._send(404, {"error": f"the stand-in has no {self.path}"})

    def _commit(self, repo_id: str, body: bytes) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._send(404, {"error": f"{repo_id} does not exist"})
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                repo.files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                repo.files[value["path"]] = self.hub.lfs[value["oid"]]
            elif item["key"] == "header":
                repo.commits.append(value["summary"])
        oid = hashlib.sha1(body).hexdigest()
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "success": True, "commitMessage": repo.commits[-1] if repo.commits else ""})
