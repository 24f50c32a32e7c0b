"""Reading a SQL dump a tenant uploads, one statement at a time, without holding it in memory.

The file comes from anywhere (`mariadb-dump` or `mysqldump` of another server, a hand-written
fixture), so it is read as the `mariadb` client would cut it: statements end at the delimiter
(`;`, or what a `DELIMITER` line sets, for triggers and routines) outside strings, quoted names and
comments. Version comments (`/*!50003 … */`, `/*M!100100 … */`) are code to the server, so they are
checked like the rest.

`refusal` says why a statement may not run as the tenant: it needs a privilege the tenant lacks
(SUPER, accounts, global settings, files of the server) or it reaches another database than the
tenant's. `with_own_definer` rewrites `DEFINER=…` clauses (views, triggers and routines from
elsewhere carry `DEFINER=root@localhost`) to the tenant's own user. The tenant's rights on the
server are the backstop for whatever this reading misses.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

CHUNK = 1024 * 1024
MOST_STATEMENT = 64 * 1024 * 1024  # the server's max_allowed_packet: a longer statement cannot run
MOST_TOKENS = 20_000  # code tokens of a statement read closely (an INSERT's values are skipped)


class DumpError(Exception):
    """The file cannot be loaded as it is; the message names the line."""


@dataclass
class Statement:
    line: int  # where its first code begins (1-based)
    text: bytes  # as in the file, without the delimiter
    words: list[tuple[str, bytes, int, int]]  # code tokens: (kind, value, start, end) in `text`


# One token at a position. Each alternative needs its whole token: a match that reaches the end of
# what has been read so far waits for more (a string may go on in the next chunk).
_TOKEN = re.compile(
    rb"""
    (?P<space>[ \t\r\n\f]+)
  | (?P<ignored>/\*M?!9{6}\d*(?:[^*]|\*(?!/))*\*/)
  | (?P<line_comment>(?:--(?=[ \t\r\n\f])|--$|\#)[^\n]*(?:\n|$))
  | (?P<version_open>/\*M?!\d*)
  | (?P<comment>/\*(?:[^*]|\*(?!/))*\*/)
  | (?P<version_close>\*/)
  | (?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
  | (?P<quoted>`(?:[^`]|``)*`)
  | (?P<variable>@@?(?:[A-Za-z0-9_$.]+|`(?:[^`]|``)*`|'(?:[^'\\]|\\.)*')?)
  | (?P<word>[A-Za-z0-9_$\x80-\xff]+)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_DELIMITER_LINE = re.compile(rb"[ \t]*delimiter[ \t]+(\S+)[ \t]*(?:\r?\n|\Z)", re.IGNORECASE)
LOOKAHEAD = 4096  # bytes read ahead of the scan, but at the end: a delimiter, a DELIMITER line
_IGNORED = re.compile(rb"/\*M?!9{6}")
_CODE = ("string", "quoted", "variable", "word", "punct")


def statements(file: IO[bytes]) -> Iterator[Statement]:
    """The statements of the dump in `file`, in order. Raises DumpError if it is cut short
    (inside a string, a comment, or with a last statement that has no delimiter) or holds a
    statement longer than the server takes."""
    buffer, eof = b"", False
    pos = 0  # where the current statement's bytes begin in `buffer`; offsets in `words` are from it
    scan = 0  # how far it has been read
    line = 1  # the line `scan` is on
    start_line = 0
    delimiter = b";"
    words: list[tuple[str, bytes, int, int]] = []
    in_version = False
    values = False  # past an INSERT's VALUES: its tokens are not kept

    def more() -> bool:
        nonlocal buffer, eof, pos, scan
        if eof:
            return False
        chunk = file.read(CHUNK)
        if not chunk:
            eof = True
            return False
        buffer, scan, pos = buffer[pos:] + chunk, scan - pos, 0
        return True

    while True:
        if scan - pos > MOST_STATEMENT:
            raise DumpError(
                f"Line {start_line or line}: a statement longer than {MOST_STATEMENT // 1024 // 1024} MiB "
                "(the server's max_allowed_packet) cannot be loaded."
            )
        if len(buffer) - scan < LOOKAHEAD and more():
            continue
        if scan >= len(buffer):
            break
        if not words and not in_version and not buffer[buffer.rfind(b"\n", 0, scan) + 1 : scan].strip():
            found = _DELIMITER_LINE.match(buffer, scan)
            if found is not None:
                delimiter = found.group(1)
                line += found.group().count(b"\n")
                scan = pos = found.end()
                continue
        if not in_version and buffer.startswith(delimiter, scan):
            if words:
                yield Statement(start_line, buffer[pos:scan], words)
            words, values, start_line = [], False, 0
            scan = pos = scan + len(delimiter)
            continue
        token = _TOKEN.match(buffer, scan)
        assert token is not None  # `punct` takes any byte
        if token.end() == len(buffer) and more():
            continue  # it may go on in what comes next
        kind = token.lastgroup or "punct"
        value = token.group()
        if kind == "version_open" and _IGNORED.match(value):
            kind, value = "punct", b"/"  # a comment the server ignores, whose end is not read yet
        if kind == "punct" and (value in (b"'", b'"', b"`") or buffer.startswith(b"/*", scan)):
            if more():
                continue  # its end may be in what comes next
            what = {b"'": "a string", b'"': "a string", b"`": "a quoted name", b"/": "a comment"}[value]
            raise DumpError(f"Line {line}: {what} begins here and never ends; the file is cut short.")
        if kind == "version_open":
            in_version = True
        elif kind == "version_close" and in_version:
            in_version = False
        elif kind in _CODE:
            if not start_line:
                start_line = line
            if kind == "word" and value.upper() == b"VALUES" and _first(words) in (b"INSERT", b"REPLACE"):
                values = True
            if not values and len(words) < MOST_TOKENS:
                words.append((kind, value, scan - pos, token.end() - pos))
        line += value.count(b"\n")
        scan = token.end()
    if words:
        raise DumpError(
            f"Line {start_line}: the last statement has no {delimiter.decode(errors='replace')!r} at its end; "
            "the file is cut short."
        )
    if in_version:
        raise DumpError(f"Line {line}: a version comment never ends; the file is cut short.")


def _first(words: list[tuple[str, bytes, int, int]]) -> bytes:
    return words[0][1].upper() if words else b""


def _name(kind: str, value: bytes) -> str:
    """An identifier's name: a quoted one unquoted, a bare one as it is (lower-cased)."""
    if kind == "quoted":
        return value[1:-1].replace(b"``", b"`").decode(errors="replace").lower()
    return value.decode(errors="replace").lower()


# Statements a tenant may never run, by their first words.
_FORBIDDEN = {
    ("GRANT",): "GRANT changes accounts' rights",
    ("REVOKE",): "REVOKE changes accounts' rights",
    ("CREATE", "USER"): "CREATE USER makes an account",
    ("DROP", "USER"): "DROP USER removes an account",
    ("ALTER", "USER"): "ALTER USER changes an account",
    ("RENAME", "USER"): "RENAME USER changes an account",
    ("CREATE", "ROLE"): "CREATE ROLE makes a role",
    ("DROP", "ROLE"): "DROP ROLE removes a role",
    ("SET", "PASSWORD"): "SET PASSWORD changes an account",
    ("SET", "ROLE"): "SET ROLE takes another role",
    ("SET", "DEFAULT", "ROLE"): "SET DEFAULT ROLE changes an account",
    ("SET", "GLOBAL"): "SET GLOBAL changes the whole server (it needs SUPER)",
    ("SET", "PERSIST"): "SET PERSIST changes the whole server",
    ("DROP", "DATABASE"): "DROP DATABASE removes a database",
    ("DROP", "SCHEMA"): "DROP SCHEMA removes a database",
    ("INSTALL",): "INSTALL loads server plugins",
    ("UNINSTALL",): "UNINSTALL unloads server plugins",
    ("CREATE", "SERVER"): "CREATE SERVER needs SUPER",
    ("ALTER", "SERVER"): "ALTER SERVER needs SUPER",
    ("DROP", "SERVER"): "DROP SERVER needs SUPER",
    ("CHANGE", "MASTER"): "CHANGE MASTER sets up replication",
    ("CHANGE", "REPLICATION"): "CHANGE REPLICATION sets up replication",
    ("START", "SLAVE"): "START SLAVE runs replication",
    ("STOP", "SLAVE"): "STOP SLAVE stops replication",
    ("START", "REPLICA"): "START REPLICA runs replication",
    ("STOP", "REPLICA"): "STOP REPLICA stops replication",
    ("RESET",): "RESET changes the server's logs or replication",
    ("PURGE",): "PURGE removes the server's binary logs",
    ("FLUSH",): "FLUSH needs RELOAD",
    ("KILL",): "KILL ends sessions",
    ("SHUTDOWN",): "SHUTDOWN stops the server",
    ("BINLOG",): "BINLOG replays raw binary log events (it needs SUPER)",
    ("LOAD", "DATA"): "LOAD DATA reads files",
    ("LOAD", "XML"): "LOAD XML reads files",
    ("PREPARE",): "PREPARE runs SQL from a string, which cannot be read first",
    ("EXECUTE",): "EXECUTE runs SQL from a string, which cannot be read first",
}
# Session variables only a privileged account may set (a dump made with GTIDs sets them).
_PRIVILEGED_VARIABLES = re.compile(rb"^(?:@@(?:session\.|local\.)?)?(?:sql_log_bin|gtid_\w+|pseudo_\w+)$", re.I)
_GLOBAL_VARIABLE = re.compile(rb"^@@(?:global|persist|persist_only)\.", re.I)
# Words after which a table (or view, trigger, routine) name comes; `db.name` there names a database.
_NAMED_AFTER = {
    b"TABLE", b"TABLES", b"INTO", b"FROM", b"JOIN", b"UPDATE", b"VIEW", b"TRIGGER", b"ON", b"REFERENCES",
    b"EXISTS", b"PROCEDURE", b"FUNCTION", b"EVENT", b"CALL", b"TO", b"LIKE", b"SEQUENCE", b"INDEX", b"REPLACE",
}  # fmt: skip


def refusal(statement: Statement, database: str) -> str | None:
    """Why `statement` may not run as the tenant of `database`, or None."""
    words = statement.words
    if words[0][1] == b"\\":
        return "client commands (\\! and the like) are not SQL"
    upper = [value.upper() if kind == "word" else b"" for kind, value, _, _ in words]
    lead = tuple(word.decode() for word in upper[:3])
    for length in (3, 2, 1):
        why = _FORBIDDEN.get(lead[:length])
        if why:
            return why
    if lead[:1] == ("SET",):
        for kind, value, _, _ in words[1:]:
            if kind == "word" and value.upper() in (b"GLOBAL", b"PERSIST", b"PERSIST_ONLY"):
                return "SET GLOBAL changes the whole server (it needs SUPER)"
            if kind == "variable" and _GLOBAL_VARIABLE.match(value):
                return "SET @@GLOBAL changes the whole server (it needs SUPER)"
            if kind in ("variable", "word") and _PRIVILEGED_VARIABLES.match(value):
                return f"SET {value.decode(errors='replace')} needs SUPER (dump without GTIDs: --set-gtid-purged=OFF)"
    for index, word in enumerate(upper):
        if word in (b"OUTFILE", b"DUMPFILE") and index and upper[index - 1] == b"INTO":
            return f"INTO {word.decode()} writes files on the server"
        if word == b"SONAME":
            return "SONAME loads a library into the server"
    if lead[:1] == ("USE",) and len(words) > 1:
        name = _name(words[1][0], words[1][1])
        if name != database.lower():
            return f"USE {name} switches to another database than yours ({database})"
    if lead[:1] in (("CREATE",), ("ALTER",)) and len(upper) > 1 and upper[1] in (b"DATABASE", b"SCHEMA"):
        rest = [(kind, value) for kind, value, _, _ in words[2:] if value.upper() not in (b"IF", b"NOT", b"EXISTS")]
        name = _name(*rest[0]) if rest else ""
        if name != database.lower():
            return f"{lead[0]} DATABASE {name} touches another database than yours ({database})"
    # `db.table` after a word that names a table: only the tenant's own database.
    for index in range(1, len(words) - 2):
        kind, value, _, _ = words[index]
        if upper[index - 1] in _NAMED_AFTER and kind in ("word", "quoted") and words[index + 1][1] == b".":
            if words[index + 1][2] != words[index][3]:
                continue  # `x .y` is not a qualified name
            name = _name(kind, value)
            if name != database.lower():
                return f"{name}.{_name(*words[index + 2][:2])} is in another database than yours ({database})"
    return None


_DEFINER = re.compile(
    rb"DEFINER\s*=\s*(?:CURRENT_USER(?:\s*\(\s*\))?|(?:`(?:[^`]|``)*`|'(?:[^'\\]|\\.)*'|[A-Za-z0-9_$.%-]+)"
    rb"\s*@\s*(?:`(?:[^`]|``)*`|'(?:[^'\\]|\\.)*'|[A-Za-z0-9_$.%-]+)|(?:`(?:[^`]|``)*`|'(?:[^'\\]|\\.)*'|"
    rb"[A-Za-z0-9_$.%-]+)?@[A-Za-z0-9_$.%-]+)",
    re.IGNORECASE,
)


def with_own_definer(statement: Statement) -> bytes:
    """The statement with each `DEFINER=…` clause (outside strings) naming the current user: the
    tenant's own account, the only definer it may name."""
    text, out, last = statement.text, [], 0
    for index, (kind, value, start, _) in enumerate(statement.words):
        if kind != "word" or value.upper() != b"DEFINER":
            continue
        if index + 1 >= len(statement.words) or statement.words[index + 1][1] != b"=":
            continue
        found = _DEFINER.match(text, start)
        if found is None:
            continue
        out += [text[last:start], b"DEFINER=CURRENT_USER"]
        last = found.end()
    if not out:
        return text
    return b"".join([*out, text[last:]])
