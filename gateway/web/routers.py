"""The routers ``create_app`` includes: add a room's router here (one line each)."""

from __future__ import annotations

from fastapi import APIRouter


def all_routers() -> list[APIRouter]:
    """Every built-in router, imported lazily so ``gateway.web`` loads only what it serves."""
    routers: list[APIRouter] = []
    from gateway.web import admin, dashboard, ops

    routers += [ops.router, admin.router, dashboard.router]
    from gateway.web import jobs, qido, stow, wado

    routers += [stow.router, qido.router, wado.router, jobs.router]
    return routers
