"""First-run access: with no token configured the first start creates an admin token (hash stored, token logged
once with how to use it); `anomalyd tokens create|list|revoke`; the UI login says where tokens come from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from daemon.api import routers
from daemon.api.app import STATIC_DIR
from daemon.cli import main
from daemon.config.settings import load_config
from daemon.process.service import Service
from tests.daemon.test_pipeline import BrightnessDetector


def write_config(tmp_path: Path, tokens: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""[mqtt]
enabled = false
[database]
url = "sqlite:///var/t.db"
[storage]
dir = "var/artifacts"
[api]
bind = "127.0.0.1:0"
{tokens}
""")
    return path


def start(config: Path) -> Service:
    service = Service(load_config(config, environ={}), detector=BrightnessDetector(image_size=32), sources=[],
                      routers=routers())
    service.start()
    return service


def logged_token(caplog) -> str | None:
    for record in caplog.records:
        message = record.getMessage()
        if "No API token was configured" in message:
            return message.split("shown this once", 1)[1].split("\n\n")[1].strip()
    return None


def test_first_start_creates_an_admin_token_once(tmp_path, caplog):
    config = write_config(tmp_path)
    caplog.set_level(logging.INFO, logger="anomalyd")
    service = start(config)
    try:
        token = logged_token(caplog)
        assert token and token.startswith("adt_")
        message = next(r.getMessage() for r in caplog.records if "No API token" in r.getMessage())
        assert "Authorization: Bearer" in message and "anomalyd tokens create" in message
        assert f"http://127.0.0.1:{service.http_port}/" in message
        stored = tmp_path / "var" / "api_tokens.json"
        text = stored.read_text()
        assert token not in text  # only the hash is kept
        assert json.loads(text)["tokens"][0]["role"] == "admin"
        assert stored.stat().st_mode & 0o077 == 0
        base = f"http://127.0.0.1:{service.http_port}"
        assert httpx.get(f"{base}/api/inspections").status_code == 401
        assert httpx.get(f"{base}/api/inspections", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{base}/api/inspections", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        service.stop()

    caplog.clear()
    service = start(config)  # a second start creates no other token and prints none
    try:
        assert logged_token(caplog) is None
        assert len(json.loads((tmp_path / "var" / "api_tokens.json").read_text())["tokens"]) == 1
    finally:
        service.stop()


def test_no_bootstrap_when_tokens_are_configured(tmp_path, caplog):
    config = write_config(tmp_path, '[[api.tokens]]\nname = "ops"\nrole = "admin"\ntoken = "s3cret"\n')
    caplog.set_level(logging.INFO, logger="anomalyd")
    service = start(config)
    try:
        assert logged_token(caplog) is None
        assert not (tmp_path / "var" / "api_tokens.json").exists()
    finally:
        service.stop()


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tokens_create_list_revoke_with_a_running_daemon(tmp_path, capsys):
    config = write_config(tmp_path, '[[api.tokens]]\nname = "ops"\nrole = "admin"\ntoken = "s3cret"\n')
    service = start(config)
    try:
        base = f"http://127.0.0.1:{service.http_port}"
        code, out, err = run(capsys, "tokens", "create", "line-lead", "--role", "operator", "--json",
                             "--config", str(config))
        assert code == 0, err
        created = json.loads(out)
        assert created["role"] == "operator"
        headers = {"Authorization": f"Bearer {created['token']}"}
        assert httpx.get(f"{base}/api/inspections", headers=headers).status_code == 200  # no restart needed
        assert httpx.post(f"{base}/api/retrain", headers=headers).status_code == 403  # operator < admin

        code, out, _ = run(capsys, "tokens", "list", "--json", "--config", str(config))
        listed = {item["name"]: item for item in json.loads(out)}
        assert listed["ops"]["source"] == "config [[api.tokens]]" and listed["line-lead"]["role"] == "operator"
        assert created["token"] not in out

        code, _, err = run(capsys, "tokens", "create", "line-lead", "--config", str(config))
        assert code == 1 and "exists already" in err
        code, _, err = run(capsys, "tokens", "create", "bad name!", "--config", str(config))
        assert code == 2
        code, _, err = run(capsys, "tokens", "revoke", "ops", "--config", str(config))
        assert code == 1 and "[[api.tokens]]" in err
        code, out, _ = run(capsys, "tokens", "revoke", "line-lead", "--config", str(config))
        assert code == 0 and "revoked" in out
        assert httpx.get(f"{base}/api/inspections", headers=headers).status_code == 401
        code, _, err = run(capsys, "tokens", "revoke", "line-lead", "--config", str(config))
        assert code == 1 and "line-lead" in err
    finally:
        service.stop()


@pytest.mark.parametrize("phrase", ["first start", "anomalyd tokens create", "[[api.tokens]]"])
def test_login_explains_where_tokens_come_from(phrase):
    assert phrase in (STATIC_DIR / "index.html").read_text()
