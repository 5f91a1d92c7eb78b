"""The care-guidance knowledge base: every class x risk x language entry exists and cites its source."""

from __future__ import annotations

import copy

import pytest

from infra.config import load_config
from serving.pipeline import KnowledgeError, check_knowledge, guidance, knowledge, resolve_language


def test_every_class_risk_and_language_has_cited_guidance():
    kb = knowledge()
    classes = load_config("demo").classes.names
    assert kb["languages"] == ["en", "ko", "vi"]
    assert check_knowledge(kb, classes) == []
    for label in classes:
        for risk in ("low", "medium", "high"):
            for lang in kb["languages"]:
                for fallback in (False, True):
                    g = guidance(label, risk, lang, fallback)
                    assert g["text"] and g["references"], (label, risk, lang)
                    assert g["source"].startswith(f"knowledge base v2: classes.{label}.{lang} + risk.{risk}.{lang}")
                    assert (f"fallback.{lang}" in g["source"]) == fallback
                    assert ("(translated from en)" in g["source"]) == (lang != "en")
    assert kb["classes"]["mel"]["vi"]["name"].startswith("U hắc tố")


def test_gaps_and_wrong_citations_are_named():
    kb = copy.deepcopy(knowledge())
    classes = load_config("demo").classes.names
    del kb["classes"]["mel"]["vi"]
    kb["classes"]["nv"]["ko"]["source"] = "classes.bcc.en"  # cites another class's entry
    kb["classes"]["df"]["en"]["source"] = ["ham10000", "wikipedia"]  # a reference the file does not hold
    del kb["risk"]["high"]["vi"]["text"]
    kb["languages"].append("fr")
    problems = check_knowledge(kb, classes)
    assert "classes.mel.vi: missing" in problems
    assert "classes.nv.ko: a translation from en must cite classes.nv.en (cites 'classes.bcc.en')" in problems
    assert "classes.df.en: cites 'wikipedia', which is not in references" in problems
    assert "risk.high.vi: missing" in problems
    assert "translations.fr: the language's origin and review state are missing" in problems
    assert "classes.akiec.fr: missing" in problems and "fallback.fr: missing" in problems


def test_a_request_language_is_its_primary_subtag_or_refused():
    assert resolve_language("ko-KR", "en") == "ko" and resolve_language("VI", "en") == "vi"
    assert resolve_language(None, "en") == "en"
    with pytest.raises(KnowledgeError, match="language='fr' is not offered; use one of en, ko, vi"):
        resolve_language("fr", "en")
