"""The token comes from the environment or a file, and never travels unprotected."""

from __future__ import annotations

from pathlib import Path

import pytest

from importer.errors import ConfigurationError
from importer.settings import Settings, Token, check_api_url


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DIGITALOCEAN_TOKEN is read, surrounding white space dropped."""
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", "  dop_v1_abc\n")
    assert Token.from_env_or_file().value == "dop_v1_abc"


def test_token_file_wins_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--token-file is used instead of the environment when given."""
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", "from-env")
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert Token.from_env_or_file(path).value == "from-file"


def test_missing_token_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a token the error names the variable and the flag."""
    monkeypatch.delenv("DIGITALOCEAN_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match=r"DIGITALOCEAN_TOKEN.*--token-file"):
        Token.from_env_or_file()


def test_unreadable_token_file(tmp_path: Path) -> None:
    """A token file that cannot be read is a configuration error, not a traceback."""
    with pytest.raises(ConfigurationError, match="cannot read the token file"):
        Token.from_env_or_file(tmp_path / "missing")


def test_token_never_shows_in_repr() -> None:
    """Neither repr nor str of a token, or of settings holding it, contains the secret."""
    token = Token("dop_v1_supersecret")
    settings = Settings(token=token)
    for text in (repr(token), str(token), repr(settings), str(settings)):
        assert "supersecret" not in text


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9", "https://api.example.com"],
)
def test_token_may_go_to_https_or_loopback(url: str) -> None:
    """https anywhere, plain http only to a loopback address."""
    assert check_api_url(url + "/") == url


@pytest.mark.parametrize(
    "url", ["http://api.digitalocean.com", "http://10.0.0.1:80", "ftp://x", "nope"]
)
def test_token_never_goes_over_plain_http_elsewhere(url: str) -> None:
    """Plain http to a non-loopback host, or a non-http URL, is refused."""
    with pytest.raises(ConfigurationError):
        check_api_url(url)


def test_settings_reject_nonsense() -> None:
    """Zero or negative knobs are refused with the knob's name."""
    with pytest.raises(ConfigurationError, match="concurrency"):
        Settings(token=Token("t"), concurrency=0)
