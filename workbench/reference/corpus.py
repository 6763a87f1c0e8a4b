"""The reference corpus: text every Python install carries offline, split into train and held-out."""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
              "turtledemo", "ensurepip", "venv"}
_MIN_DOC_CHARS = 80


@dataclass(frozen=True)
class Document:
    """One document of the corpus: a stable id (used for the split) and its text."""

    doc_id: str
    text: str


def _topic_documents() -> list[Document]:
    """The language reference topics shipped in `pydoc_data.topics` (what `help('if')` shows)."""
    from pydoc_data.topics import topics

    return [Document(f"topic:{name}", text.strip()) for name, text in sorted(topics.items())]


def _docstrings(path: str, module: str) -> list[Document]:
    """Module, class and function docstrings of one source file, parsed (never imported)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        text = ast.get_docstring(node, clean=True)
        if text and len(text) >= _MIN_DOC_CHARS:
            name = getattr(node, "name", "")
            docs.append(Document(f"doc:{module}:{name}:{node.lineno if name else 0}", text.strip()))
    return docs


def _module_documents(stdlib: str) -> list[Document]:
    """Docstrings of every pure-Python standard-library module (tests and tools excluded)."""
    docs: list[Document] = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test"):
                continue
            path = os.path.join(root, name)
            module = os.path.relpath(path, stdlib)[:-3].replace(os.sep, ".")
            docs.extend(_docstrings(path, module))
    return docs


def is_heldout(doc_id: str, heldout_percent: int) -> bool:
    """Stable split: a document is held out when the hash of its id falls in the first N percent."""
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < heldout_percent


def load_corpus(heldout_percent: int = 5) -> tuple[list[Document], list[Document]]:
    """Return (train, held-out) documents from `pydoc_data.topics` and stdlib docstrings."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = _topic_documents() + _module_documents(stdlib)
    seen: set[str] = set()
    unique = []
    for doc in docs:  # the same docstring appears in several places (e.g. overloads)
        if doc.text not in seen:
            seen.add(doc.text)
            unique.append(doc)
    train = [d for d in unique if not is_heldout(d.doc_id, heldout_percent)]
    heldout = [d for d in unique if is_heldout(d.doc_id, heldout_percent)]
    logger.info("corpus: %d train docs (%d chars), %d held-out docs (%d chars)", len(train),
                sum(len(d.text) for d in train), len(heldout), sum(len(d.text) for d in heldout))
    return train, heldout


def join_documents(docs: list[Document]) -> str:
    """Concatenate documents into one text, separated by the end-of-text marker."""
    return "".join(d.text + EOS for d in docs)
