"""The FastAPI application of `pagedq serve`: a stateless producer speaking OpenAI's API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from worker.gateway import batches, completions, files, metrics
from worker.gateway.errors import install_handlers
from worker.gateway.state import Gateway, api_key
from worker.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway.open(settings)
        try:
            yield
        finally:
            await app.state.gateway.close()

    app = FastAPI(title="pagedq", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_handlers(app)
    metrics.install(app)
    keyed = [Depends(api_key)]
    for module in (completions, files, batches, metrics):
        app.include_router(module.router, dependencies=keyed)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
