"""Token checks: every configured token compared, write and read tokens kept apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from adw_backend.errors import Unauthorized
from adw_backend.service import Service
from adw_backend.settings import Settings


def test_tokens(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'b.db'}",
        tokens=(SecretStr("write-one"), SecretStr("write-two")),
        read_tokens=(SecretStr("reader"),),
    )
    service = Service(settings, None)
    for header in ("Bearer write-one", "bearer write-two", "Bearer  write-two "):
        service.authorize(header, write=True)
    service.authorize("Bearer reader", write=False)
    with pytest.raises(Unauthorized, match="this token may not write"):
        service.authorize("Bearer reader", write=True)
    # A prefix, a longer value, the same length, another scheme, nothing.
    for header in ("Bearer write-on", "Bearer write-one1", "Bearer write-ono", "Basic write-one"):
        with pytest.raises(Unauthorized):
            service.authorize(header, write=False)
    with pytest.raises(Unauthorized, match="missing Authorization"):
        service.authorize(None, write=False)
    service.store.close()
