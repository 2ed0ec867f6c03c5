"""Secrets hygiene (issue 12, item 7): secret-valued settings from env vars and files,
errors that name the key path and never the value, and a full ``sluice run`` with planted
secrets (admin token, TLS key password, API key, basic password) whose every output (stdout,
stderr, the access log, admin ``/config`` and ``/reload`` answers), through failed
requests, a failed and a good reload, holds none of them."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import textwrap
from pathlib import Path

import bcrypt
import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel

from sluice.secrets import Secret, SecretText

from .proc import Running, ThreadOrigin, poll, sluice

TOKEN = "adm1n-T0KEN-planted-7f3a"
KEY_PASSWORD = "k3y-PASSWORD-planted-91c2"
WRONG_KEY_PASSWORD = "wr0ng-key-PASSWORD-planted-5d"
API_KEY = "ap1-KEY-planted-44b8"
BASIC_PASSWORD = "bas1c-PASSWORD-planted-c0de"


class _Model(BaseModel):
    secret: Secret | None = None


def test_a_secret_comes_inline_from_an_env_var_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_TEST_SECRET", "from-env")
    (tmp_path / "s").write_text("from-file\n")
    got = [_Model(secret=v).secret for v in ("inline", {"env": "SLUICE_TEST_SECRET"}, {"file": str(tmp_path / "s")})]
    assert got == ["inline", "from-env", "from-file"]  # the file's trailing newline dropped
    assert all(isinstance(s, SecretText) for s in got)
    assert repr(_Model(secret="hunter2")) == "_Model(secret='[redacted]')"  # reprs (errors, tracebacks) hide it


def _check(tmp_path: Path, body: str, env: dict | None = None):
    path = tmp_path / "check.toml"
    path.write_text(textwrap.dedent(body))
    return sluice("check", str(path), env=env)


@pytest.mark.parametrize(("admin", "expected"), [
    ('token = { env = "SLUICE_TEST_UNSET_VAR" }', "admin.token: environment variable SLUICE_TEST_UNSET_VAR is not set"),
    ('token = { file = "/nonexistent/token" }',
     "admin.token: cannot read /nonexistent/token: No such file or directory"),
    ('token = { vault = "x" }', 'admin.token: a secret is a string, { env = "NAME" } or { file = "/path" }'),
])
def test_a_missing_source_is_a_config_error_by_key_path(tmp_path, admin, expected):
    out = _check(tmp_path, f"""
        [admin]
        enabled = true
        {admin}
        [[listeners]]
        address = "127.0.0.1:0"
        filters = ["router"]
        [clusters.app]
        endpoints = ["127.0.0.1:9"]
        [[routes]]
        match = {{ prefix = "/" }}
        cluster = "app"
        """)
    assert out.returncode != 0 and expected in out.stdout + out.stderr


@pytest.mark.parametrize(("admin", "tls", "where"), [
    (f'token = ["{TOKEN}"]', "", "admin.token"),
    (f'token = "{TOKEN}"\nrequire_token_for_reads = "{TOKEN}"', "", "admin.require_token_for_reads"),
    ("", f'tls = {{ cert = "/nonexistent/c.pem", key = "/nonexistent/k.pem", key_password = "{TOKEN}" }}',
     "listeners[0].tls"),
])
def test_config_errors_never_echo_a_secret(tmp_path, admin, tls, where):
    """An inline secret in (or beside) a setting that fails: the error names the key, not the value."""
    out = _check(tmp_path, f"""
        [admin]
        enabled = true
        {admin}
        [[listeners]]
        address = "127.0.0.1:0"
        filters = ["router"]
        {tls}
        [clusters.app]
        endpoints = ["127.0.0.1:9"]
        [[routes]]
        match = {{ prefix = "/" }}
        cluster = "app"
        """)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and where in text
    assert TOKEN not in text


def _planted() -> dict[str, str]:
    return {"admin token": TOKEN, "key password": KEY_PASSWORD, "wrong key password": WRONG_KEY_PASSWORD,
            "api key": API_KEY, "basic password": BASIC_PASSWORD,
            "basic credentials, base64": base64.b64encode(f"alice:{BASIC_PASSWORD}".encode()).decode()}


def found_in(text: str) -> list[str]:
    """Which planted secrets ``text`` holds (a prefix of 12 characters counts)."""
    return [what for what, secret in _planted().items() if secret[:12] in text]


def _tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    key_path, cert_path, ca_path = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(KEY_PASSWORD.encode())))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return cert_path, key_path, ca_path


def test_a_full_run_never_shows_a_planted_secret(tmp_path):
    cert, key, ca = _tls(tmp_path)
    password_file = tmp_path / "key-password"
    password_file.write_text(KEY_PASSWORD + "\n")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(BASIC_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    access_log = tmp_path / "access.log"
    config = tmp_path / "sluice.toml"
    with ThreadOrigin(body=b"ok") as origin:
        config.write_text(textwrap.dedent(f"""
            [server]
            drain_timeout = 1

            [admin]
            enabled = true
            address = "127.0.0.1:0"
            token = "{TOKEN}"

            [[listeners]]
            name = "api"
            address = "127.0.0.1:0"
            filters = ["access_log", "api_key", "router"]
            tls = {{ cert = "{cert}", key = "{key}", key_password = {{ file = "{password_file}" }} }}

            [[listeners]]
            name = "staff"
            address = "127.0.0.1:0"
            filters = ["access_log", "basic", "router"]

            [filters.access_log]
            path = "{access_log}"
            flush_interval = 0.05
            fields = ["method", "path", "status", "flags"]
            request_headers = ["authorization", "x-api-key", "cookie", "proxy-authorization"]

            [filters.api_key]
            keys = {{ ci = "{hashlib.sha256(API_KEY.encode()).hexdigest()}" }}
            forward_key = true

            [filters.basic]
            htpasswd = "{htpasswd}"
            forward_credentials = true

            [clusters.app]
            endpoints = ["{origin.address}"]

            [[routes]]
            match = {{ prefix = "/" }}
            cluster = "app"
            """))
        # the test can fail: the sources hold every secret it looks for
        assert set(found_in(config.read_text() + password_file.read_text())) == {"admin token", "key password"}
        answers: list[str] = []
        with Running("-c", str(config)) as proxy:
            poll(lambda: any('"admin listening"' in line for line in proxy.stderr), what="the admin", proxy=proxy)
            started = next(json.loads(line) for line in proxy.stderr if '"started"' in line)
            api, staff = started["listeners"]["api"], started["listeners"]["staff"]
            admin = next(json.loads(line)["url"] for line in proxy.stderr if '"admin listening"' in line)
            bearer = {"authorization": f"Bearer {TOKEN}"}
            with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
                statuses = [
                    client.get(api + "/a", headers={"x-api-key": API_KEY, "cookie": f"s={API_KEY}"}).status_code,
                    client.get(api + "/b", headers={"x-api-key": API_KEY + "-wrong"}).status_code,
                    client.get(staff + "/c", auth=("alice", BASIC_PASSWORD)).status_code,
                    client.get(staff + "/d", auth=("alice", BASIC_PASSWORD + "-wrong")).status_code,
                    client.get(staff + "/e", headers={"proxy-authorization": f"Basic {API_KEY}"}).status_code,
                    client.post(admin + "/reload", headers={"authorization": f"Bearer {TOKEN}x"}).status_code,
                ]
                assert statuses == [200, 401, 200, 401, 401, 401]
                # a reload that fails (the key's password is now wrong), then a good one
                password_file.write_text(WRONG_KEY_PASSWORD)
                failed = client.post(admin + "/reload", headers=bearer)
                password_file.write_text(KEY_PASSWORD)
                good = client.post(admin + "/reload", headers=bearer)
                shown = client.get(admin + "/config", headers=bearer)
                answers += [failed.text, good.text, shown.text]
                assert failed.status_code != 200 and good.status_code == 200 and shown.status_code == 200
                assert client.get(api + "/f", headers={"x-api-key": API_KEY}).status_code == 200
            poll(lambda: access_log.exists() and access_log.read_text().count("\n") >= 6, what="the access log")
        logged = access_log.read_text()
        outputs = {"stdout": "".join(proxy.stdout), "stderr": "".join(proxy.stderr), "access log": logged,
                   "admin answers": "\n".join(answers)}
        assert "listeners[0].tls" in answers[0] or "listeners[0].tls" in outputs["stderr"]  # the failure said where
        leaks = {where: found_in(text) for where, text in outputs.items() if found_in(text)}
        assert leaks == {}
        assert '"authorization": "[redacted]"' in logged and '"x-api-key": "[redacted]"' in logged


def test_the_redis_password_is_a_secret_too(monkeypatch):
    from sluice.errors import ConfigError
    from sluice.plugins.redis_state import RedisConfig
    from sluice.shared import open_backend

    monkeypatch.setenv("SLUICE_TEST_REDIS_PASSWORD", "r3dis-PASSWORD-planted")
    config = RedisConfig.model_validate({"password": {"env": "SLUICE_TEST_REDIS_PASSWORD"}})
    assert config.password == "r3dis-PASSWORD-planted" and "r3dis" not in repr(config)
    with pytest.raises(ConfigError) as info:
        open_backend({"backend": "redis", "password": {"env": "SLUICE_TEST_UNSET_VAR"}})
    assert "shared.password: environment variable SLUICE_TEST_UNSET_VAR is not set" in str(info.value)
