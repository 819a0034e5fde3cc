from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings, get_settings


@pytest.mark.parametrize("environment", ["production", "test"])
def test_settings_refuse_default_secrets_outside_development(environment: str) -> None:
    with pytest.raises(ValidationError, match="INFERATECH_SECRET_KEY"):
        Settings(environment=environment)  # type: ignore[arg-type]


def test_settings_accept_default_secrets_in_development() -> None:
    assert Settings(environment="development").secret_key.get_secret_value()


def test_settings_refuse_short_secrets_in_production() -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(
            environment="production",
            secret_key="short",
            key_pepper="p" * 20,
            storage_events_secret="s" * 20,
        )  # type: ignore[arg-type]


def test_settings_accept_real_secrets_in_production() -> None:
    s = Settings(
        environment="production",
        secret_key="k" * 32,
        key_pepper="p" * 32,
        storage_events_secret="e" * 32,
        webhook_secret="w" * 32,
    )  # type: ignore[arg-type]
    assert s.max_model_bytes == 8 * 1024**3


def test_settings_read_environment_with_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("INFERATECH_MAX_MODEL_BYTES", "1234")
    monkeypatch.setenv("INFERATECH_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    s = get_settings()
    assert s.max_model_bytes == 1234
    assert s.effective_database_url == f"sqlite:///{tmp_path}/inferatech.db"
    assert s.effective_storage_url == (tmp_path / "objects").as_uri()


def test_settings_refuse_part_size_below_s3_minimum() -> None:
    with pytest.raises(ValidationError, match="5 MiB"):
        Settings(multipart_part_size=1024)


def test_settings_never_print_secrets() -> None:
    s = Settings(secret_key="super-secret-value-123")  # type: ignore[arg-type]
    assert "super-secret-value-123" not in repr(s)
    assert "super-secret-value-123" not in str(s.model_dump())


@pytest.mark.parametrize("ttl", [-1, 31, 3600])
def test_settings_refuse_an_auth_cache_ttl_outside_0_to_30(ttl: int) -> None:
    with pytest.raises(ValidationError, match="auth_cache_ttl_s"):
        Settings(auth_cache_ttl_s=ttl)


def test_settings_auth_cache_defaults_to_ten_seconds_and_can_be_off() -> None:
    assert Settings().auth_cache_ttl_s == 10
    assert Settings(auth_cache_ttl_s=0).auth_cache_ttl_s == 0
