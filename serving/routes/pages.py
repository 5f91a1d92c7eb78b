"""The web pages: the photo page at ``/`` and the reviewer's page at ``/reviewer``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"
REVIEW_PAGE = Path(__file__).resolve().parent.parent / "static" / "review.html"


router = APIRouter()


@router.get("/reviewer", response_class=HTMLResponse)
def reviewer_page():
    return HTMLResponse(REVIEW_PAGE.read_text(encoding="utf-8"))


@router.get("/", response_class=HTMLResponse)
def page():
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
