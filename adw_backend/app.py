"""The standalone service: the router mounted at the root of its own FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI

from adw_backend.router import create_router
from adw_backend.service import OnApplied
from adw_backend.settings import Settings
from agent import __version__


def create_app(*, settings: Settings, on_applied: OnApplied | None = None) -> FastAPI:
    app = FastAPI(
        title="adw-agent backend",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(create_router(settings=settings, on_applied=on_applied))
    return app
