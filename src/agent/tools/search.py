"""``search`` tool: full-text search over the SQLite FTS5 database of ``data.build_tool_database``.

The database folder (DATABASE_DIR, holding ``documents.sqlite``) is, first found wins: the
trajectory's ``create_kwargs["database_dir"]`` (verl's per-sample ``tools_kwargs``), the tool
config's ``database_dir`` (``agent/config/tool_config.yaml`` fills it from ``$DATABASE_DIR``), then
the ``DATABASE_DIR`` environment variable at call time.

Query semantics: the model's text is split on whitespace; words without a letter or digit are
dropped; each remaining word becomes an FTS5 string (double quotes around it, inner quotes doubled),
so FTS5 operators, column filters and SQL in the text are only ever words. The strings are joined
with OR, so a document matching any word is found and bm25 ranks those matching more, and rarer,
words first; a word in the title counts twice as much as one in the text. The query is passed as
a bound parameter and the database is opened read-only (``mode=ro``). The answer is the top
``top_k`` documents, ``[rank] title`` then the text, cut to ``max_response_length`` characters.

Every failure (no words in the query, no usable database) is the tool's answer ``error: ...``;
``execute`` never raises into the agent loop.

CLI, for launch scripts (exit 0 when the folder holds a usable database, else 2 with the reason)::

    python -m agent.tools.search --check DATABASE_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.rollout_trace import rollout_trace_op

from data.build_tool_database import DATABASE_FILE, TABLE

DATABASE_ENV = "DATABASE_DIR"
DEFAULT_MAX_RESPONSE_LENGTH = 1000
DEFAULT_TOP_K = 3
# OR over more words ranks by little more than noise and costs one index lookup per word.
MAX_QUERY_WORDS = 32
# bm25 weights of the columns id (not indexed), title, text.
_COLUMN_WEIGHTS = "0.0, 2.0, 1.0"
_BUILD_HINT = "build one with: python -m data.build_tool_database --input FILE.jsonl|DIR --output"


def connect_read_only(database_file: Path) -> sqlite3.Connection:
    """A connection to ``database_file`` that SQLite itself refuses to write through."""
    return sqlite3.connect(f"{database_file.resolve().as_uri()}?mode=ro", uri=True)


def check_database_dir(path: str | os.PathLike) -> Path:
    """The database file in folder ``path``; ValueError naming the path when it is not usable."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"database folder {folder} does not exist; {_BUILD_HINT} {folder}")
    database_file = folder / DATABASE_FILE
    if not database_file.is_file():
        raise ValueError(f"database folder {folder} holds no {DATABASE_FILE}; {_BUILD_HINT} {folder}")
    try:
        connection = connect_read_only(database_file)
        try:
            first = connection.execute(f"SELECT id, title, text FROM {TABLE} LIMIT 1").fetchone()
        finally:
            connection.close()
    except sqlite3.DatabaseError as err:
        message = f"{database_file} is not a search database ({err}); {_BUILD_HINT} {folder}"
        raise ValueError(message) from None
    if first is None:
        raise ValueError(f"{database_file} holds no documents; {_BUILD_HINT} {folder}")
    return database_file


def fts_query(text: str) -> str:
    """The FTS5 query for the model's ``text`` (see the module docstring); ValueError if it has no words."""
    words = [word for word in text.split() if any(char.isalnum() for char in word)][:MAX_QUERY_WORDS]
    if not words:
        raise ValueError("the query has no words to search for")
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)


def search(database_file: Path, query: str, top_k: int) -> list[tuple[str, str]]:
    """``(title, text)`` of the best ``top_k`` documents for the model's ``query``, best first."""
    connection = connect_read_only(database_file)
    try:
        return connection.execute(
            f"SELECT title, text FROM {TABLE} WHERE {TABLE} MATCH ? "
            f"ORDER BY bm25({TABLE}, {_COLUMN_WEIGHTS}) LIMIT ?",
            (fts_query(query), top_k),
        ).fetchall()
    finally:
        connection.close()


def format_results(results: list[tuple[str, str]], max_chars: int) -> str:
    """The tool's answer for ``results``, at most ``max_chars`` characters."""
    if not results:
        return "no documents match the query"
    answer = "\n\n".join(f"[{rank}] {title}\n{text}" for rank, (title, text) in enumerate(results, start=1))
    return answer[:max_chars]


def _positive_int(config: dict, key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"search tool config: {key} must be a positive integer, got {value!r}")
    return value


class SearchTool(BaseTool):
    """verl tool ``search(query: str)`` over a DATABASE_DIR (see the module docstring)."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema):
        super().__init__(config, tool_schema)
        self.max_response_length = _positive_int(config, "max_response_length", DEFAULT_MAX_RESPONSE_LENGTH)
        self.top_k = _positive_int(config, "top_k", DEFAULT_TOP_K)
        self._database_dirs: dict[str, str | None] = {}

    def _database_dir(self, create_kwargs: dict) -> str | None:
        configured = create_kwargs.get("database_dir") or self.config.get("database_dir")
        return configured or os.environ.get(DATABASE_ENV)

    async def create(self, instance_id: str | None = None, **kwargs) -> tuple[str, ToolResponse]:
        """Start one trajectory's instance, remembering its database folder."""
        instance_id = instance_id or str(uuid4())
        self._database_dirs[instance_id] = self._database_dir(kwargs.get("create_kwargs") or {})
        return instance_id, ToolResponse()

    def _answer(self, database_dir: str | None, parameters: Any) -> str:
        if not isinstance(parameters, dict) or not isinstance(parameters.get("query"), str):
            return 'error: expected the arguments {"query": "..."} with a string query'
        if not database_dir:
            return f"error: no search database configured (set {DATABASE_ENV} or the tool's database_dir)"
        try:
            results = search(check_database_dir(database_dir), parameters["query"], self.top_k)
        except (ValueError, sqlite3.DatabaseError) as err:
            return f"error: {err}"
        return format_results(results, self.max_response_length)

    @rollout_trace_op
    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs
    ) -> tuple[ToolResponse, float, dict]:
        """Answer one call; the reward is 0 and there are no metrics."""
        database_dir = self._database_dirs.get(instance_id) or self._database_dir({})
        # SQLite blocks; a thread keeps the agent loop's other trajectories running meanwhile.
        text = await asyncio.to_thread(self._answer, database_dir, parameters)
        return ToolResponse(text=text), 0.0, {}

    async def release(self, instance_id: str, **kwargs) -> None:
        """Forget the instance's database folder."""
        self._database_dirs.pop(instance_id, None)


def main(argv: Sequence[str] | None = None) -> int:
    """``--check DIR``: exit 0 when DIR holds a usable database, else print why and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m agent.tools.search", description="Check a database.")
    parser.add_argument("--check", required=True, type=Path, metavar="DATABASE_DIR", help="folder to check")
    args = parser.parse_args(argv)
    try:
        check_database_dir(args.check)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
