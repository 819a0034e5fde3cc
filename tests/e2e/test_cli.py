"""The `inferatech` CLI against a real embedded stack, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.progress import Progress

from api import cli_upload
from api.cli_client import CliError
from tests.e2e.conftest import MiB, UpProcess, clean_env, run_cli

READY_LINE = re.compile(r"^my-llama ready · id (mdl_\S+) · API key (ik_\S+) \(shown once\)$", re.M)
REJECTED_LINE = re.compile(r"^(\S+) rejected · ([A-Z][A-Z0-9_]+): .+$", re.M)


def _get(stack: UpProcess, token: str, path: str) -> Any:
    reply = httpx.get(f"{stack.url}{path}", headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="module")
def ready_upload(
    cli_env: dict[str, str], account_token: str, gguf_file: Path
) -> subprocess.CompletedProcess[str]:
    return run_cli("models", "upload", str(gguf_file), "--name", "my-llama", env=cli_env)


def test_create_account_prints_token_and_saves_credentials(
    cli_env: dict[str, str], account_token: str, stack: UpProcess
) -> None:
    assert account_token.startswith("iat_")
    path = Path(cli_env["INFERATECH_CONFIG"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": stack.url, "token": account_token}


def test_upload_gguf_reports_ready_with_api_key(
    ready_upload: subprocess.CompletedProcess[str],
) -> None:
    assert ready_upload.returncode == 0, ready_upload.stdout + ready_upload.stderr
    assert READY_LINE.search(ready_upload.stdout), ready_upload.stdout


def test_infer_with_printed_key_through_embedded_stack(
    ready_upload: subprocess.CompletedProcess[str], stack: UpProcess
) -> None:
    match = READY_LINE.search(ready_upload.stdout)
    assert match, ready_upload.stdout
    model_id, key = match.groups()
    body = {"model_id": model_id, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    reply = httpx.post(
        f"{stack.url}/v1/infer", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["completion_tokens"] >= 1


def test_get_model_hides_api_key_after_upload_showed_it(
    ready_upload: subprocess.CompletedProcess[str], cli_env: dict[str, str]
) -> None:
    match = READY_LINE.search(ready_upload.stdout)
    assert match, ready_upload.stdout
    model_id, key = match.groups()
    result = run_cli("models", "get", model_id, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout
    assert key not in result.stdout


def test_list_models_shows_uploaded_model_as_ready(
    ready_upload: subprocess.CompletedProcess[str], cli_env: dict[str, str]
) -> None:
    match = READY_LINE.search(ready_upload.stdout)
    assert match, ready_upload.stdout
    result = run_cli("models", "list", env=cli_env)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if match.group(1) in line)
    assert "my-llama" in row
    assert "ready" in row


def test_upload_text_named_gguf_exits_1_with_rejection_code(
    cli_env: dict[str, str], account_token: str, stack: UpProcess, tmp_path: Path
) -> None:
    bogus = tmp_path / "x.gguf"
    bogus.write_text("this is not a model\n" * 10)
    result = run_cli("models", "upload", str(bogus), "--name", "x", env=cli_env)
    assert result.returncode == 1, result.stdout + result.stderr
    match = REJECTED_LINE.search(result.stdout)
    assert match, result.stdout
    models = _get(stack, account_token, "/v1/models")["data"]
    server = next(m for m in models if m["name"] == "x")
    assert server["status"] == "rejected"
    assert match.group(2) == server["rejection"]["code"]


def test_upload_large_file_uses_multipart_and_reaches_validation(
    cli_env: dict[str, str], account_token: str, stack: UpProcess, tmp_path: Path
) -> None:
    probe = httpx.post(
        f"{stack.url}/v1/models",
        json={"name": "probe", "files": [{"path": "p.gguf", "size_bytes": 11 * MiB}]},
        headers={"Authorization": f"Bearer {account_token}"},
    ).json()
    assert probe["uploads"][0]["method"] == "multipart"
    assert len(probe["uploads"][0]["parts"]) == 3  # 5 + 5 + 1 MiB
    blob = tmp_path / "blob.gguf"
    blob.write_bytes(os.urandom(11 * MiB))
    result = run_cli("models", "upload", str(blob), "--name", "blob", env=cli_env)
    # Random bytes are rejected, but only after every part arrived and complete accepted them.
    assert result.returncode == 1, result.stdout + result.stderr
    assert REJECTED_LINE.search(result.stdout), result.stdout
    models = _get(stack, account_token, "/v1/models")["data"]
    server = next(m for m in models if m["name"] == "blob")
    assert server["total_bytes"] == 11 * MiB
    assert server["files"][0]["uploaded"] is True


def test_upload_directory_skips_hidden_files_when_no_wait(
    cli_env: dict[str, str], account_token: str, stack: UpProcess, gguf_file: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    (bundle / ".git").mkdir(parents=True)
    (bundle / ".git" / "config").write_text("[core]\n")
    (bundle / ".DS_Store").write_bytes(b"\0\1")
    (bundle / "model.gguf").write_bytes(gguf_file.read_bytes())
    result = run_cli(
        "models", "upload", str(bundle), "--name", "dir-llama", "--no-wait", env=cli_env
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"dir-llama uploaded · id (mdl_\S+) · validating", result.stdout)
    assert match, result.stdout
    model = _get(stack, account_token, f"/v1/models/{match.group(1)}")
    assert [f["path"] for f in model["files"]] == ["model.gguf"]


def test_create_and_revoke_key_for_ready_model(
    ready_upload: subprocess.CompletedProcess[str], cli_env: dict[str, str]
) -> None:
    match = READY_LINE.search(ready_upload.stdout)
    assert match, ready_upload.stdout
    created = run_cli("keys", "create", match.group(1), "--name", "ci", env=cli_env)
    assert created.returncode == 0, created.stderr
    key_match = re.search(r"^key (\S+) for mdl_\S+: ik_\S+ \(shown once\)$", created.stdout, re.M)
    assert key_match, created.stdout
    key_id = key_match.group(1)
    revoked = run_cli("keys", "revoke", key_id, env=cli_env)
    assert revoked.returncode == 0, revoked.stderr
    listing = run_cli("keys", "list", env=cli_env).stdout
    row = next(line for line in listing.splitlines() if key_id in line)
    assert "revoked" in row


def test_create_key_with_limits_sends_them_and_refuses_a_raise(
    ready_upload: subprocess.CompletedProcess[str],
    cli_env: dict[str, str],
    stack: UpProcess,
    account_token: str,
) -> None:
    match = READY_LINE.search(ready_upload.stdout)
    assert match, ready_upload.stdout
    flags = ["--rpm", "30", "--tpm", "9000", "--concurrency", "2"]
    created = run_cli("keys", "create", match.group(1), *flags, "--monthly-token-budget",
                      "100000", "--log-payloads", env=cli_env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split()[1]
    key = next(k for k in _get(stack, account_token, "/v1/keys")["data"] if k["id"] == key_id)
    assert (key["rate_limit_rpm"], key["rate_limit_tpm"], key["rate_limit_concurrency"]) == (
        30, 9000, 2)  # fmt: skip
    assert key["monthly_token_budget"] == 100000 and key["log_payloads"] is True
    raised = run_cli("keys", "create", match.group(1), "--rpm", "999999999", env=cli_env)
    assert raised.returncode != 0 and "INVALID_REQUEST" in raised.stderr + raised.stdout


def test_delete_model_makes_get_fail_with_model_not_found(
    cli_env: dict[str, str], account_token: str, tmp_path: Path
) -> None:
    doomed = tmp_path / "doomed.gguf"
    doomed.write_text("soon gone")
    uploaded = run_cli(
        "models", "upload", str(doomed), "--name", "doomed", "--no-wait", env=cli_env
    )
    match = re.search(r"id (mdl_\S+)", uploaded.stdout)
    assert match, uploaded.stdout + uploaded.stderr
    deleted = run_cli("models", "delete", match.group(1), env=cli_env)
    assert deleted.returncode == 0, deleted.stderr
    after = run_cli("models", "get", match.group(1), env=cli_env)
    assert after.returncode == 2
    assert "MODEL_NOT_FOUND" in after.stderr


def test_get_missing_model_prints_error_code_without_traceback(
    cli_env: dict[str, str], account_token: str
) -> None:
    result = run_cli("models", "get", "mdl_doesnotexist", env=cli_env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: MODEL_NOT_FOUND: ")
    assert "Traceback" not in result.stderr + result.stdout


def test_upload_without_token_exits_2_with_hint(stack: UpProcess, tmp_path: Path) -> None:
    env = clean_env(INFERATECH_API_URL=stack.url, INFERATECH_CONFIG=str(tmp_path / "none.json"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    result = run_cli("models", "upload", str(model), "--name", "m", env=env)
    assert result.returncode == 2
    assert "NO_TOKEN" in result.stderr
    assert "accounts create" in result.stderr


def test_list_models_with_bad_token_prints_server_error_envelope(stack: UpProcess) -> None:
    env = clean_env(INFERATECH_API_URL=stack.url, INFERATECH_TOKEN="iat_bogus")
    result = run_cli("models", "list", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: AUTHENTICATION_FAILED: ")


def test_accounts_create_against_unreachable_server_exits_2(tmp_path: Path) -> None:
    env = clean_env(INFERATECH_CONFIG=str(tmp_path / "c.json"))
    result = run_cli("accounts", "create", "--name", "n", "--url", "http://127.0.0.1:9", env=env)
    assert result.returncode == 2
    assert "CONNECTION_FAILED" in result.stderr
    assert not (tmp_path / "c.json").exists()


def test_migrate_creates_schema_when_database_is_new(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    env = clean_env(INFERATECH_DATABASE_URL=f"sqlite:///{db}", INFERATECH_DATA_DIR=str(tmp_path))
    result = run_cli("migrate", env=env)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"account", "model", "api_key", "alembic_version"} <= tables


def _flaky_transport(statuses: list[int], seen: list[bytes]) -> httpx.MockTransport:
    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request.read())
        status = statuses.pop(0)
        return httpx.Response(status, headers={"ETag": '"abc123"'} if status == 200 else {})

    return httpx.MockTransport(reply)


def test_send_part_retries_server_errors_then_returns_bare_etag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_upload, "BACKOFF_S", 0.0)
    source = tmp_path / "f.bin"
    source.write_bytes(bytes(range(256)) * 40)
    seen: list[bytes] = []
    with Progress(disable=True) as progress:
        task = progress.add_task("f", total=1000)
        uploader = cli_upload.Uploader(progress, _flaky_transport([503, 502, 200], seen))
        f = cli_upload.LocalFile("f.bin", source, source.stat().st_size)
        etag = uploader.send("http://storage/part/2", {}, f, 1000, 1000, task)
        completed = progress.tasks[0].completed
    assert etag == "abc123"
    assert seen == [source.read_bytes()[1000:2000]] * 3
    assert completed == 1000  # failed attempts are rolled back, not double-counted


def test_send_part_gives_up_at_once_on_client_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_upload, "BACKOFF_S", 0.0)
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 10)
    seen: list[bytes] = []
    with Progress(disable=True) as progress:
        task = progress.add_task("f", total=10)
        uploader = cli_upload.Uploader(progress, _flaky_transport([403, 200], seen))
        f = cli_upload.LocalFile("f.bin", source, 10)
        with pytest.raises(CliError):
            uploader.send("http://storage/put", {}, f, 0, 10, task)
    assert len(seen) == 1
