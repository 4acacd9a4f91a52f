"""The token comes from the environment or a file, and never travels unprotected."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from importer.cli import main
from importer.errors import ConfigurationError, InvalidSettingError
from importer.pipeline import run_import
from importer.settings import Settings, Token, check_api_url
from importer.simulator import SimulatorConfig, run_simulator
from tests.helpers import image_urls, manifest_of, settings_for


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


def test_api_url_is_stored_without_trailing_slash() -> None:
    """The normalised URL is the one kept: no `//v2/images` from a trailing slash."""
    assert Settings(token=Token("t"), api_url="https://api.example.com/").api_url == (
        "https://api.example.com"
    )


@pytest.mark.anyio
async def test_trailing_slash_reaches_the_real_paths() -> None:
    """A run pointed at `http://host:port/` sends its requests to `/v2/images`, and succeeds."""
    async with run_simulator(SimulatorConfig.demo()) as sim:
        report = await run_import(
            manifest_of(*image_urls(2)), settings_for(sim.base_url + "/", max_attempts=1)
        )
        served = sim.world.state()["requests"]
    assert report.all_available
    assert served.get("POST /v2/images") == 2


def test_settings_read_the_api_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Settings()` takes DIGITALOCEAN_API_URL as the command line does, else DigitalOcean's."""
    monkeypatch.setenv("DIGITALOCEAN_API_URL", "http://127.0.0.1:9999/")
    assert Settings(token=Token("t")).api_url == "http://127.0.0.1:9999"
    monkeypatch.delenv("DIGITALOCEAN_API_URL")
    assert Settings(token=Token("t")).api_url == "https://api.digitalocean.com"


@pytest.mark.parametrize(
    "knob", ["first_poll", "poll_interval", "image_timeout", "deadline", "request_timeout"]
)
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_durations_must_be_positive(knob: str, value: float) -> None:
    """A zero, negative or NaN duration is refused, naming the setting, not replaced."""
    overrides: dict[str, Any] = {knob: value}
    with pytest.raises(InvalidSettingError, match=f"^{knob} must be positive") as caught:
        replace(Settings(token=Token("t")), **overrides)
    assert caught.value.setting == knob
    assert isinstance(caught.value, ConfigurationError)


def test_setting_errors_can_speak_in_flag_names() -> None:
    """`renamed` gives the same error under the name the caller knows (a CLI flag)."""
    with pytest.raises(InvalidSettingError) as caught:
        Settings(token=Token("t"), image_timeout=0)
    assert str(caught.value.renamed("--timeout")) == "--timeout must be positive, got 0"


@pytest.mark.parametrize(
    "url",
    [
        "http://u:PWSECRET@127.0.0.1:9",
        "https://user@api.example.com",
        "http://127.0.0.1:9/?key=QSECRET",
        "https://api.example.com/#frag",
        "http://127.0.0.1:notaport",
    ],
)
def test_api_urls_with_credentials_a_query_or_a_bad_port_are_refused(url: str) -> None:
    """Only the base URL is accepted: nothing secret can reach a report or a state file."""
    with pytest.raises(ConfigurationError) as caught:
        check_api_url(url)
    assert "SECRET" not in str(caught.value)


def test_the_cli_refuses_an_api_url_with_credentials_in_one_line(tmp_path: Path) -> None:
    """`run --api-url` with a password: exit 2, one line, the password not shown."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text("images:\n  - {name: a, url: 'https://h/a.raw', region: nyc3}\n")
    result = CliRunner().invoke(
        main,
        ["run", str(manifest), "--api-url", "http://u:PWSECRET@127.0.0.1:9/?key=QSECRET"],
        env={"DIGITALOCEAN_TOKEN": "tok123456"},
    )
    assert result.exit_code == 2
    assert "SECRET" not in result.output
    assert len(result.output.strip().splitlines()) == 1
