"""Build the SQLite FTS5 database that the ``search`` tool (``agent.tools.search``) reads.

Input: a ``.jsonl`` file with one ``{"id", "title", "text"}`` object per line (blank lines are
skipped), or a folder whose ``*.txt`` and ``*.md`` files are one document each (id = the path
relative to the folder, title = the file name without its suffix).

Output: ``DATABASE_DIR/documents.sqlite`` with one FTS5 table ``documents(id UNINDEXED, title,
text)``, tokenised by ``porter unicode61`` (English stemming over Unicode word characters, accents
folded). It is written to a hidden temporary file in ``DATABASE_DIR`` and renamed into place, so a
reader sees the old database or the complete new one; a build killed outright may leave that
hidden ``.documents.sqlite.tmp-*`` file behind, never a half database.

CLI (prints the written database file)::

    python -m data.build_tool_database --input FILE.jsonl|DIR --output DATABASE_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

DATABASE_FILE = "documents.sqlite"
TABLE = "documents"
TEXT_SUFFIXES = (".txt", ".md")
# Often enough to show a multi-million-document build is alive, rarely enough not to flood the log.
PROGRESS_EVERY = 10_000

_SCHEMA = (
    f"CREATE VIRTUAL TABLE {TABLE} USING fts5(id UNINDEXED, title, text, "
    "tokenize = 'porter unicode61 remove_diacritics 2')"
)


def _progress(message: str) -> None:
    # stderr keeps stdout for the database path that scripts capture.
    print(f"[build_tool_database] {message}", file=sys.stderr, flush=True)


def check_document(document: Any) -> tuple[str, str, str]:
    """``(id, title, text)`` of one document; ValueError naming the missing or mistyped key."""
    if not isinstance(document, dict):
        raise ValueError(f'expected an object with keys "id", "title", "text", got {type(document).__name__}')
    missing = [key for key in ("id", "title", "text") if key not in document]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    doc_id = document["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise ValueError(f'"id" must be a string or an integer, got {type(doc_id).__name__}')
    for key in ("title", "text"):
        if not isinstance(document[key], str):
            raise ValueError(f'"{key}" must be a string, got {type(document[key]).__name__}')
    return str(doc_id), document["title"], document["text"]


def read_jsonl(path: Path) -> Iterator[dict]:
    """Documents of a jsonl file, one per non-blank line; errors name the file and line."""
    count = 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({err.reason})") from None
            if not line.strip():
                continue
            try:
                document = json.loads(line)
                check_document(document)
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: {err}") from None
            count += 1
            yield document
    if count == 0:
        raise ValueError(f"{path} holds no documents")


def read_folder(folder: Path) -> Iterator[dict]:
    """One document per ``*.txt`` / ``*.md`` file under ``folder``, in sorted path order."""
    files = sorted(path for path in folder.rglob("*") if path.suffix in TEXT_SUFFIXES and path.is_file())
    if not files:
        raise ValueError(f"{folder} holds no {' or '.join(TEXT_SUFFIXES)} files")
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None
        yield {"id": path.relative_to(folder).as_posix(), "title": path.stem, "text": text}


def read_documents(source: Path) -> Iterator[dict]:
    """Documents of a jsonl file or a folder of text files (see the module docstring)."""
    if source.is_dir():
        return read_folder(source)
    if source.is_file():
        return read_jsonl(source)
    raise ValueError(f"input {source} does not exist")


def _rows(documents: Iterable[Any]) -> Iterator[tuple[str, str, str]]:
    count = 0
    for count, document in enumerate(documents, start=1):
        try:
            yield check_document(document)
        except ValueError as err:
            raise ValueError(f"document {count}: {err}") from None
        if count % PROGRESS_EVERY == 0:
            _progress(f"{count} documents indexed")
    if count == 0:
        raise ValueError("no documents to index")


def _write(database: Path, documents: Iterable[Any]) -> int:
    connection = sqlite3.connect(database)
    try:
        # A temporary file needs no crash journal: a failed build is deleted, not recovered.
        connection.execute("PRAGMA journal_mode = OFF")
        connection.execute(_SCHEMA)
        connection.executemany(f"INSERT INTO {TABLE} (id, title, text) VALUES (?, ?, ?)", _rows(documents))
        count = connection.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        # Merging the index segments once makes every later query faster.
        connection.execute(f"INSERT INTO {TABLE} ({TABLE}) VALUES ('optimize')")
        connection.commit()
    finally:
        connection.close()
    return count


def build_database(documents: Iterable[dict], output_dir: str | os.PathLike) -> Path:
    """Index ``documents`` (dicts with ``id``, ``title``, ``text``) into ``output_dir``; the file path.

    Any existing database there is replaced only once the new one is complete.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{DATABASE_FILE}.tmp-", dir=output_dir)
    os.close(handle)
    temporary, target = Path(name), output_dir / DATABASE_FILE
    try:
        count = _write(temporary, documents)
        # mkstemp makes the file private; the database is read by rollout workers like any data file.
        temporary.chmod(0o644)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _progress(f"wrote {count} documents to {target}")
    return target


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; prints the written database file."""
    parser = argparse.ArgumentParser(
        prog="python -m data.build_tool_database", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input", required=True, type=Path, help="a .jsonl file or a folder of text files")
    parser.add_argument("--output", required=True, type=Path, help="DATABASE_DIR to write into")
    args = parser.parse_args(argv)
    try:
        print(build_database(read_documents(args.input), args.output))
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
