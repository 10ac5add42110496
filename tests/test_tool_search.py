"""The ``search`` tool and its database builder: findings, hostile queries, read-only access, bad input."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from tool_calls import call
from verl.tools.schemas import OpenAIFunctionToolSchema
from verl.tools.tool_registry import initialize_tools_from_config

import agent
from agent.tools import search
from agent.tools.search import SearchTool, check_database_dir, connect_read_only
from data import build_tool_database
from data.build_tool_database import DATABASE_FILE, build_database, read_documents

TOOL_CONFIG = Path(agent.__file__).parent / "config" / "tool_config.yaml"
DOCUMENTS = [
    {"id": "water", "title": "Water", "text": "Water boils at 100 degrees Celsius at sea level."},
    {"id": "iron", "title": "Iron", "text": "Iron melts at 1538 degrees Celsius and rusts in water."},
    {"id": 7, "title": "Planets", "text": "Mercury is the planet closest to the sun."},
    {"id": "cafe", "title": "Coffee", "text": "A cafe serves espresso; 水 means water in Japanese."},
    {"id": "kestrel", "title": "Kestrel", "text": "a small falcon"},
    {"id": "bird", "title": "Bird", "text": "kestrel"},
]
HOSTILE_QUERIES = [
    "NEAR(",
    "*",
    '"',
    "'; DROP TABLE documents; --",
    "title:foo",
    "a OR",
    ")",
    "AND NOT",
    "water*",
    '"water" OR "iron',
    "{title text}: water",
    "\x00water",
    "水",
    "١٢٣",
    "Ω≈ç√",
    "water " * 20_000,
    "x" * 100_000,
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    """``lines`` joined as a jsonl file at ``path``."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    """Hex digest of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def database_dir(tmp_path) -> Path:
    """A database of :data:`DOCUMENTS` built from a jsonl file through the CLI."""
    source = write_jsonl(tmp_path / "docs.jsonl", [json.dumps(doc) for doc in DOCUMENTS])
    build_tool_database.main(["--input", str(source), "--output", str(tmp_path / "db")])
    return tmp_path / "db"


def load_tools(monkeypatch, database_dir: Path | None) -> dict:
    """The shipped YAML's tools built by verl's registry, with DATABASE_DIR set or unset."""
    if database_dir is None:
        monkeypatch.delenv("DATABASE_DIR", raising=False)
    else:
        monkeypatch.setenv("DATABASE_DIR", str(database_dir))
    return {tool.name: tool for tool in initialize_tools_from_config(str(TOOL_CONFIG))}


@pytest.fixture
def tool(monkeypatch, database_dir) -> SearchTool:
    """The search tool from the YAML, pointed at :func:`database_dir` through DATABASE_DIR."""
    return load_tools(monkeypatch, database_dir)["search"]


def query_rows(database: Path, sql: str) -> list[tuple]:
    """Rows of ``sql`` run on ``database`` through the tool's read-only connection."""
    connection = connect_read_only(database)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def titles(answer: str) -> list[str]:
    """Titles of the ranked documents in a search answer."""
    return [line.split("] ", 1)[1] for line in answer.splitlines() if line.startswith("[")]


def test_yaml_loads_both_tools_without_database_dir(monkeypatch):
    tools = load_tools(monkeypatch, None)
    assert sorted(tools) == ["calculator", "search"]
    assert tools["search"].config["database_dir"] is None
    assert call(tools["calculator"], {"expression": "6*7"}) == "42"
    assert call(tools["search"], {"query": "water"}).startswith("error: no search database configured")


def test_yaml_takes_database_dir_from_environment(tool, database_dir):
    assert tool.config["database_dir"] == str(database_dir)
    assert (tool.top_k, tool.max_response_length) == (3, 1000)


@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("boiling point of water", "Water"),
        ("melts", "Iron"),
        ("planets sun", "Planets"),  # porter stemming: "planets" finds "planet"
        ("café", "Coffee"),  # accents folded
        ("falcon", "Kestrel"),
        ("kestrel", "Kestrel"),  # a title word outranks the same word in a text
    ],
)
def test_queries_find_the_right_document(tool, query, best):
    assert titles(call(tool, {"query": query}))[0] == best


def test_answer_lists_top_k_with_title_and_text(tool):
    answer = call(tool, {"query": "water Celsius"})
    assert titles(answer)[:2] == ["Water", "Iron"]
    assert len(titles(answer)) == 3
    assert "[1] Water\nWater boils at 100 degrees Celsius at sea level." in answer
    assert call(tool, {"query": "zebra"}) == "no documents match the query"


def test_answer_is_cut_to_max_response_length(tmp_path):
    database = build_database([{"id": 1, "title": "Long", "text": "word " * 2000}], tmp_path)
    config = {"type": "native", "database_dir": str(database.parent), "max_response_length": 50}
    tool = SearchTool(config=config, tool_schema=_schema())
    answer = call(tool, {"query": "word"})
    assert len(answer) == 50 and answer.startswith("[1] Long\nword word")


def _schema() -> OpenAIFunctionToolSchema:
    return OpenAIFunctionToolSchema.model_validate(
        {"type": "function", "function": {"name": "search", "description": "Search."}}
    )


@pytest.mark.parametrize("value", [0, -1, "10", True])
def test_config_rejects_bad_lengths(value):
    with pytest.raises(ValueError, match="max_response_length must be a positive integer"):
        SearchTool(config={"type": "native", "max_response_length": value}, tool_schema=_schema())


def test_hostile_queries_never_raise_nor_change_the_database(tool, database_dir):
    before = sha256(database_dir / DATABASE_FILE)
    for query in HOSTILE_QUERIES:
        answer = call(tool, {"query": query})
        assert isinstance(answer, str) and answer, query
        assert answer.startswith(("error: ", "[1] ", "no documents match")), (query, answer)
    assert sha256(database_dir / DATABASE_FILE) == before
    assert titles(call(tool, {"query": "'; DROP TABLE documents; --"})) == []
    assert titles(call(tool, {"query": "water " * 20_000}))[0] == "Water"


@pytest.mark.parametrize("query", ["", "   ", "*", '"', ")", "!?.,;", "( ) * - ^"])
def test_queries_without_words_are_errors(tool, query):
    assert call(tool, {"query": query}) == "error: the query has no words to search for"


@pytest.mark.parametrize("parameters", [{}, {"query": None}, {"query": ["water"]}, ["water"]])
def test_malformed_arguments(tool, parameters):
    assert call(tool, parameters) == 'error: expected the arguments {"query": "..."} with a string query'


def test_connection_cannot_write(database_dir):
    connection = connect_read_only(database_dir / DATABASE_FILE)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("INSERT INTO documents (id, title, text) VALUES ('x', 'x', 'x')")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("DROP TABLE documents")
    finally:
        connection.close()


def test_create_kwargs_override_the_configured_folder(tool, tmp_path):
    other = build_database([{"id": 1, "title": "Zebra", "text": "striped"}], tmp_path / "other")
    assert titles(call(tool, {"query": "striped"}, {"database_dir": str(other.parent)})) == ["Zebra"]
    assert call(tool, {"query": "striped"}) == "no documents match the query"


def _bad_database_dirs(tmp_path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / DATABASE_FILE).write_bytes(b"not a database at all" * 100)
    other = tmp_path / "other"
    other.mkdir()
    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    fts_schema = "CREATE VIRTUAL TABLE documents USING fts5(id UNINDEXED, title, text)"
    for folder, schema in [(other, "CREATE TABLE documents (x)"), (no_rows, fts_schema)]:
        connection = sqlite3.connect(folder / DATABASE_FILE)
        connection.execute(schema)
        connection.close()
    return {
        "missing": (tmp_path / "missing", "does not exist"),
        "empty": (empty, f"holds no {DATABASE_FILE}"),
        "garbage": (garbage, "is not a search database"),
        "other": (other, "is not a search database"),
        "no_rows": (no_rows, "holds no documents"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "other", "no_rows"])
def test_unusable_database_dir_is_named(tmp_path, capsys, case):
    folder, reason = _bad_database_dirs(tmp_path)[case]
    with pytest.raises(ValueError, match=reason) as raised:
        check_database_dir(folder)
    assert str(folder) in str(raised.value)
    assert search.main(["--check", str(folder)]) == 2
    assert str(folder) in capsys.readouterr().err
    tool = SearchTool(config={"type": "native", "database_dir": str(folder)}, tool_schema=_schema())
    answer = call(tool, {"query": "water"})
    assert answer.startswith("error: ") and str(folder) in answer


def test_check_accepts_a_built_database(database_dir):
    assert check_database_dir(database_dir) == database_dir / DATABASE_FILE
    assert search.main(["--check", str(database_dir)]) == 0


# ----------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "Expecting property name"),
        ('{"id": 1, "title": "t"}', "missing key(s) ['text']"),
        ('{"id": 1, "title": "t", "text": 5}', '"text" must be a string, got int'),
        ('{"id": null, "title": "t", "text": "x"}', '"id" must be a string or an integer, got NoneType'),
        ('["a list"]', "expected an object"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path, line, message):
    source = write_jsonl(tmp_path / "docs.jsonl", [json.dumps(DOCUMENTS[0]), "", line])
    with pytest.raises(ValueError) as raised:
        build_database(read_documents(source), tmp_path / "db")
    assert str(raised.value).startswith(f"{source}:3: ") and message in str(raised.value)
    assert not (tmp_path / "db" / DATABASE_FILE).exists()


def test_non_utf8_input_is_named(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_bytes(json.dumps(DOCUMENTS[0]).encode() + b'\n{"id": 2, "title": "\xff", "text": ""}\n')
    with pytest.raises(ValueError, match=f"{source}:2: not UTF-8 text"):
        build_database(read_documents(source), tmp_path / "db")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=f"{folder / 'bad.txt'}: not UTF-8 text"):
        build_database(read_documents(folder), tmp_path / "db")


def test_empty_inputs_are_refused(tmp_path, capsys):
    source = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=f"{source} holds no documents"):
        build_database(read_documents(source), tmp_path / "db")
    (tmp_path / "texts").mkdir()
    with pytest.raises(ValueError, match="holds no .txt or .md files"):
        build_database(read_documents(tmp_path / "texts"), tmp_path / "db")
    with pytest.raises(ValueError, match="no documents to index"):
        build_database([], tmp_path / "db")
    with pytest.raises(SystemExit) as raised:
        build_tool_database.main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "db")])
    assert raised.value.code == 2 and "nope.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "db" / DATABASE_FILE).exists()


def test_python_documents_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"document 2: missing key\(s\) \['title'\]"):
        build_database([DOCUMENTS[0], {"id": 2, "text": "x"}], tmp_path)


def test_folder_input(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "volcano.txt").write_text("Lava flows from an erupting volcano.", encoding="utf-8")
    (folder / "sub" / "glacier.md").write_text("# Ice\nA glacier is a river of ice.", encoding="utf-8")
    (folder / "ignored.json").write_text('{"glacier": "volcano"}', encoding="utf-8")
    documents = list(read_documents(folder))
    assert [(doc["id"], doc["title"]) for doc in documents] == [
        ("sub/glacier.md", "glacier"),
        ("volcano.txt", "volcano"),
    ]
    database = build_database(documents, tmp_path / "db")
    assert query_rows(database, "SELECT id FROM documents ORDER BY id") == [
        ("sub/glacier.md",),
        ("volcano.txt",),
    ]
    tool = load_tools(monkeypatch, database.parent)["search"]
    assert titles(call(tool, {"query": "ice"})) == ["glacier"]


def test_failed_rebuild_keeps_the_old_database(database_dir):
    before = sha256(database_dir / DATABASE_FILE)
    with pytest.raises(ValueError, match="document 2"):
        build_database([DOCUMENTS[0], {"id": 2}], database_dir)
    assert sha256(database_dir / DATABASE_FILE) == before
    assert sorted(path.name for path in database_dir.iterdir()) == [DATABASE_FILE]


def test_rebuild_replaces_the_database(database_dir):
    build_database([{"id": 1, "title": "Zebra", "text": "striped"}], database_dir)
    assert query_rows(database_dir / DATABASE_FILE, "SELECT title FROM documents") == [("Zebra",)]


def test_progress_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build_tool_database, "PROGRESS_EVERY", 2)
    database = build_database(DOCUMENTS[:5], tmp_path)
    err = capsys.readouterr().err
    assert "2 documents indexed" in err and "4 documents indexed" in err
    assert f"wrote 5 documents to {database}" in err
