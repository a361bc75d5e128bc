"""dpo_core/hub.py: `--push_to_hub` against a local HTTP server standing in for the Hugging Face Hub
(`HF_ENDPOINT=http://127.0.0.1:PORT`), answering what `create_repo`, `create_branch`, `preupload` and
`create_commit` of huggingface_hub expect. Nothing reaches the real hub: what the real hub does with the
commit (LFS for large files, its checks) is not exercised."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import run_script, small_dataset, subprocess_env

from dpo_core.config import TrainArguments
from dpo_core.errors import ConfigError

TOKEN = "hf_secretTESTtoken0123456789abcdefXYZ"


class FakeHub:
    """Records every request: (method, path, headers, body); answers minimal valid JSON."""

    def __init__(self):
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                hub.requests.append(("GET", self.path, dict(self.headers), b""))
                if self.path.startswith("/api/whoami"):
                    return self._answer(200, {"name": "alice", "type": "user"})
                self._answer(404, {"error": "not found"})

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path, dict(self.headers), body))
                base = f"http://127.0.0.1:{self.server.server_port}"
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    name = json.loads(body)["name"]
                    org = json.loads(body).get("organization") or "alice"
                    return self._answer(200, {"url": f"{base}/{org}/{name}", "name": f"{org}/{name}"})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    return self._answer(200, {"commitUrl": f"{base}/{repo}/commit/abc123", "commitOid": "abc123",
                                              "success": True})
                if path == "/api/validate-yaml":  # upload_folder checks a README.md's front matter first
                    return self._answer(200, {"errors": [], "warnings": []})
                if "/branch/" in path:
                    return self._answer(200, {})
                self._answer(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def commits(self) -> list[dict]:
        """Each commit: {"path": request path, "files": {path_in_repo: bytes}, "header": {...}}."""
        out = []
        for method, path, _, body in self.requests:
            if method == "POST" and "/commit/" in path:
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines
                         if x["key"] == "file"}
                header = next(x["value"] for x in lines if x["key"] == "header")
                out.append({"path": path, "files": files, "header": header})
        return out


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.server.shutdown()


def test_hub_flags_are_validated():
    with pytest.raises(ConfigError, match="--hub_model_id unused: add --push_to_hub"):
        TrainArguments(hub_model_id="me/model")
    with pytest.raises(ConfigError, match="hub_strategy"):
        TrainArguments(push_to_hub=True, hub_strategy="every_save")
    from dpo_core.hub import check_hub_args, hub_repo_id

    with pytest.raises(ConfigError, match="--save_steps"):
        check_hub_args(TrainArguments(push_to_hub=True, hub_strategy="checkpoint"))
    assert hub_repo_id(TrainArguments(push_to_hub=True, output_dir="runs/my-dpo")) == "my-dpo"  # transformers' default


@pytest.mark.slow
def test_push_uploads_the_run_and_checkpoints_with_the_env_token_only(hub, tiny_model_dir, tmp_path):
    data = small_dataset(tmp_path / "data", n_train=16, n_test=8)
    out = tmp_path / "run"
    proc = run_script("dpo.py", [
        "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--eval_split", "test",
        "--output_dir", str(out), "--max_length", "64", "--max_steps", "2", "--save_steps", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--push_to_hub",
        "--hub_model_id", "alice/tiny-dpo", "--hub_private_repo", "--hub_revision", "exp1",
        "--hub_strategy", "checkpoint"],
        env=subprocess_env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1"))
    create = [json.loads(body) for method, path, _, body in hub.requests if path.startswith("/api/repos/create")]
    assert create and all(c["name"] == "tiny-dpo" and c["organization"] == "alice" and (c.get("private") is True or c.get("visibility") == "private")
                          for c in create)
    assert any("/api/models/alice/tiny-dpo/branch/exp1" in path for _, path, _, _ in hub.requests)
    commits = hub.commits()
    assert [c["path"].split("?")[0] for c in commits] == ["/api/models/alice/tiny-dpo/commit/exp1"] * 3
    # two checkpoints into last-checkpoint/, then the output directory without its checkpoints
    for commit in commits[:2]:
        assert commit["files"] and all(p.startswith("last-checkpoint/") for p in commit["files"])
        assert "last-checkpoint/COMPLETE" in commit["files"] and "last-checkpoint/trainer_state.json" in commit["files"]
    final = commits[2]["files"]
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "config.yaml",
            "train_results.json", "training_curves.png"} <= set(final)
    assert not any(p.startswith("checkpoints/") or p.endswith(".tmp") for p in final)
    assert any(p.startswith("logs/") for p in final)
    card = final["README.md"].decode()
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-dpo")' in card
    # the token: in every request's Authorization header, in no file, no log, no uploaded byte
    for _, path, headers, _ in hub.requests:
        assert headers.get("authorization", headers.get("Authorization")) == f"Bearer {TOKEN}", path
    for file in out.rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file
    assert TOKEN not in proc.stdout + proc.stderr
    for commit in commits:
        assert all(TOKEN.encode() not in content for content in commit["files"].values())
    assert Path(out / "README.md").read_text() == card
