"""MySQL, served by MariaDB: one `mariadbd` per instance, or a container in the official image's contract."""

import dataclasses
import fcntl
import gzip
import hashlib
import io
import ipaddress
import logging
import re
import secrets
import shutil
import ssl
import time
import zlib
import zoneinfo
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

import pymysql

from ...errors import BackendError, ImportRefused
from ...options import CREATE_ONLY, LIVE, TLS_OFF, MiB, Option, OptionError, backup_options, disk_option, tls_option
from ..base import (
    SMALL,
    ArchivedLog,
    Beside,
    Bounded,
    Container,
    Endpoint,
    Engine,
    Host,
    Layout,
    LocalSetup,
    LogArchive,
    Replay,
    Scratch,
    WriteFile,
    ca_of,
    read_out,
    read_small,
    reading,
    replace_folder,
)
from . import dump

if TYPE_CHECKING:
    from ...models import Instance

logger = logging.getLogger(__name__)

# Charset -> its collations; the first one is the charset's default.
COLLATIONS: dict[str, tuple[str, ...]] = {
    "utf8mb4": ("utf8mb4_general_ci", "utf8mb4_unicode_ci", "utf8mb4_unicode_520_ci", "utf8mb4_bin"),
    "latin1": ("latin1_swedish_ci", "latin1_general_ci", "latin1_general_cs", "latin1_bin"),
    "ascii": ("ascii_general_ci", "ascii_bin"),
}

DATABASE = "app"
USERNAME = "app"
ADMIN_USERNAME = "root"
ADMIN_TIMEOUT = 10  # seconds; an administrative statement that takes longer has failed
LOAD_TIMEOUT = 600  # seconds one statement of an import may take
INIT_FILE = "init.sql"
# The official image runs *.sql in this folder once, as root, when it makes the data; it reads the
# root password's hash from the file MARIADB_ROOT_PASSWORD_HASH_FILE names (at every start).
INIT_DIR = PurePosixPath("/docker-entrypoint-initdb.d")
ROOT_HASH_FILE = "root-password-hash"
STORAGE_TEMPLATE = "storage.cnf"
# The account mariabackup logs in with while it takes a snapshot: made for that snapshot with a new
# password, with only the rights a backup needs, and dropped after it. The next start of a server
# restored from the snapshot (its init file) drops it there too.
BACKUP_USERNAME = "stockroom_backup"
BACKUP_GRANTS = "RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR"
# Where mariabackup notes the binary log position its copy is consistent with (file, position, GTID).
BINLOG_INFO = "xtrabackup_binlog_info"
BINLOG = re.compile(r"binlog\.\d{6,}")  # the names log-bin gives, in the data folder
MOST_CLOSED = 64  # binary logs one archiving takes: a server rotates one a FLUSH, or each max_binlog_size
REPLAY_DIR = "replay"  # in the server's tmp folder: the archived binary logs a restore replays
# A point-in-time restore replays the archived binary logs on the prepared copy with a server of
# its own: no network, no grant tables (so no password is needed, and only the instance's uid can
# reach its socket), no binary log of its own, and no flush to disk at each commit (a replay cut
# short throws the staged copy away; its clean shutdown writes everything). $1 config, $2 data,
# $3 socket, $4 pid file, $5 its error log; the rest are mariadb-binlog's arguments.
# mariadb-binlog reads --stop-datetime in local time: TZ=UTC.
_REPLAY = r"""
set -eu -o pipefail
config=$1 data=$2 socket=$3 pidfile=$4 log=$5; shift 5
mariadbd --defaults-file="$config" --datadir="$data" --socket="$socket" --pid-file="$pidfile" \
    --log-error="$log" --skip-networking --skip-grant-tables --skip-log-bin \
    --innodb-flush-log-at-trx-commit=0 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" || true' EXIT
tries=0
until mariadb-admin --no-defaults --socket="$socket" ping >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        tail -n 3 -- "$log" >&2 || true; echo "The replay server did not start." >&2; exit 1
    fi
    tries=$((tries + 1)); [ "$tries" -lt 1200 ] || { echo "The replay server did not answer." >&2; exit 1; }
    sleep 0.05
done
TZ=UTC mariadb-binlog --no-defaults "$@" | mariadb --no-defaults --socket="$socket" --binary-mode
mariadb-admin --no-defaults --socket="$socket" shutdown
wait "$server"
trap - EXIT
"""

# An export or a verify loads the snapshot into a throwaway server in a scratch folder (`Scratch`):
# unpacked and prepared there, then served as the point-in-time replay's server is (no network, no
# grant tables, no binary log), with a small buffer pool; $1 config, $2 the scratch folder, $3 what
# to do: "dump" writes the gzipped logical dump of database $4 to standard output, "check" runs
# CHECK TABLE over each of its tables (not views) and writes what it says, a row a line. The dump's
# views, triggers, events and routines lose their DEFINER (the tenant's account, which exists
# nowhere else): whoever loads it becomes theirs. Only where mariadb-dump writes one: the comments
# before a view, trigger or event, and the head of a routine; never in a row (mariadb-dump writes
# each on a line of its own, beginning with "(", escaping newlines in strings).
_THROWAWAY = r"""
set -eu -o pipefail
config=$1 folder=$2 action=$3 database=$4
socket=$folder/server.sock log=$folder/server.log
mkdir -m 0700 -- "$folder/tmp"
mariadbd --defaults-file="$config" --datadir="$folder/data" --socket="$socket" \
    --pid-file="$folder/server.pid" --log-error="$log" --tmpdir="$folder/tmp" \
    --skip-networking --skip-grant-tables --skip-log-bin --innodb-buffer-pool-size=16M &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" || true' EXIT
tries=0
until mariadb-admin --no-defaults --socket="$socket" ping >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        tail -n 3 -- "$log" >&2 || true; echo "The throwaway server did not start." >&2; exit 1
    fi
    tries=$((tries + 1)); [ "$tries" -lt 1200 ] || { echo "The throwaway server did not answer." >&2; exit 1; }
    sleep 0.05
done
case $action in
dump)
    mariadb-dump --no-defaults --socket="$socket" --single-transaction --routines --triggers \
        --default-character-set=utf8mb4 -- "$database" \
        | sed -E -e '/^(INSERT INTO |\()/!{' \
            -e 's#^(/\*!50013 )DEFINER=`(``|[^`])*`@`(``|[^`])*` #\1#' \
            -e 's#/\*!50017 DEFINER=`(``|[^`])*`@`(``|[^`])*`\*/#/*!50017 */#' \
            -e 's#/\*!50117 DEFINER=`(``|[^`])*`@`(``|[^`])*`\*/#/*!50117 */#' \
            -e 's#^CREATE DEFINER=`(``|[^`])*`@`(``|[^`])*` #CREATE #' -e '}' \
        | gzip -c ;;
check)
    mariadb --no-defaults --socket="$socket" --batch --raw --skip-column-names -e "
        SELECT CONCAT('CHECK TABLE \`', REPLACE(TABLE_NAME, '\`', '\`\`'), '\`;') FROM information_schema.TABLES
        WHERE TABLE_SCHEMA = '$database' AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME" \
        | mariadb --no-defaults --socket="$socket" --batch --raw --skip-column-names --database="$database" ;;
esac
mariadb-admin --no-defaults --socket="$socket" shutdown
wait "$server"
trap - EXIT
"""
# The host's zone files, loaded into the data-directory template's time zone tables by the server
# itself in bootstrap mode (no network, no grant tables); $1 mariadb-tzinfo-to-sql, $2 mariadbd,
# $3 config, $4 data, $5 zoneinfo, $6 its log. A zone file it cannot read is skipped, with a warning.
# The tables are Aria's, whose log would keep every row loaded (17 MB in every instance's data):
# small log files, removed as soon as they are not needed, leave 0.3 MB.
_LOAD_TIME_ZONES = r"""
set -eu -o pipefail
{ echo "USE mysql;"; "$1" "$5" 2>/dev/null; } | "$2" --defaults-file="$3" --datadir="$4" --bootstrap \
    --log-error="$6" --skip-log-bin --aria-log-file-size=8M --aria-log-purge-type=immediate
"""
ZONEINFO = Path("/usr/share/zoneinfo")


def _tzdata_version() -> str:
    """The version of the host's zone files (tzdata.zi's first line, "# version 2024a"), or ""."""
    try:
        with open(ZONEINFO / "tzdata.zi") as file:
            return file.readline().strip()
    except OSError:
        return ""


NAMED = re.compile(r"[A-Za-z0-9_]+")  # a database name the throwaway server's scripts may quote as is

# mariadb-install-db also makes root@127.0.0.1, root@::1 and root@<host> without a password, and
# the official image healthcheck@…; only the portal's root@localhost (Unix socket) may remain.
# A server restored from a snapshot starts with the snapshot's accounts and their grants: those go
# too (a grant left behind would make CREATE USER IF NOT EXISTS skip the user's account), and
# mariadb.sys (the definer of mysql.user and of the sys schema) is put back exactly as
# mariadb-install-db makes it: locked, no password, SELECT and DELETE on mysql.global_priv only. The
# snapshot's copy of it could have been unlocked and given a password and every right.
ONLY_PORTAL_ROOT = (
    "DELETE FROM mysql.global_priv WHERE NOT (User = 'root' AND Host = 'localhost');",
    *(
        f"DELETE FROM mysql.{table} WHERE NOT (User = 'root' AND Host = 'localhost');"
        for table in ("proxies_priv", "db", "tables_priv", "columns_priv", "procs_priv")
    ),
    "DELETE FROM mysql.roles_mapping;",
    # As in /usr/share/mysql/mysql_system_tables.sql (MariaDB 10.11).
    "INSERT INTO mysql.global_priv (Host, User, Priv) VALUES ('localhost', 'mariadb.sys', "
    '\'{"access":0,"plugin":"mysql_native_password","authentication_string":"","account_locked":true,'
    '"password_last_changed":0}\');',
    "INSERT INTO mysql.tables_priv (Host, Db, User, Table_name, Grantor, Table_priv) "
    "VALUES ('localhost', 'mysql', 'mariadb.sys', 'global_priv', 'root@localhost', 'Select,Delete');",
    "FLUSH PRIVILEGES;",
)


# MariaDB 10.11's default, and the single modes a user may combine (not the combinations such as
# ANSI or TRADITIONAL, which the server reads back as the modes they stand for).
DEFAULT_SQL_MODE = "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION"
SQL_MODES = (
    "ALLOW_INVALID_DATES",
    "ANSI_QUOTES",
    "EMPTY_STRING_IS_NULL",
    "ERROR_FOR_DIVISION_BY_ZERO",
    "HIGH_NOT_PRECEDENCE",
    "IGNORE_BAD_TABLE_OPTIONS",
    "IGNORE_SPACE",
    "NO_AUTO_CREATE_USER",
    "NO_AUTO_VALUE_ON_ZERO",
    "NO_BACKSLASH_ESCAPES",
    "NO_DIR_IN_CREATE",
    "NO_ENGINE_SUBSTITUTION",
    "NO_FIELD_OPTIONS",
    "NO_KEY_OPTIONS",
    "NO_TABLE_OPTIONS",
    "NO_UNSIGNED_SUBTRACTION",
    "NO_ZERO_DATE",
    "NO_ZERO_IN_DATE",
    "ONLY_FULL_GROUP_BY",
    "PAD_CHAR_TO_FULL_LENGTH",
    "PIPES_AS_CONCAT",
    "REAL_AS_FLOAT",
    "SIMULTANEOUS_ASSIGNMENT",
    "STRICT_ALL_TABLES",
    "STRICT_TRANS_TABLES",
    "TIME_ROUND_FRACTIONAL",
)
_OFFSET = re.compile(r"([+-])(\d{1,2}):(\d{2})")
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}")


def clean_time_zone(value: str) -> str:
    """SYSTEM, an offset MariaDB takes (-12:59 to +13:00), or a zone the host's tz database names
    (the data-directory template loads the same database into the server's time zone tables)."""
    if value.upper() == "SYSTEM":
        return "SYSTEM"
    if match := _OFFSET.fullmatch(value):
        sign, hours, minutes = match.groups()
        offset = (int(hours) * 60 + int(minutes)) * (1 if sign == "+" else -1)
        if int(minutes) < 60 and -(12 * 60 + 59) <= offset <= 13 * 60:
            return f"{sign}{int(hours):02d}:{minutes}"
        raise OptionError(f"{value!r} is out of range; offsets go from -12:59 to +13:00.")
    if _ZONE_NAME.fullmatch(value) and value in zoneinfo.available_timezones():
        return value
    raise OptionError(
        f"{value!r} is not a time zone; give SYSTEM, an offset such as '+02:00', or a name such as 'Europe/Paris'."
    )


def native_password_hash(password: str) -> str:
    """mysql_native_password's stored form, so no plaintext is ever written to disk."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


class MySQL(Engine):
    kind = "mysql"
    label = "MySQL"
    config_template = "my.cnf"
    config_name = "my.cnf"
    database = DATABASE
    username = USERNAME
    local_programs = ("mariadbd", "mariadb-install-db", "mariadb-tzinfo-to-sql")
    image = "mariadb:10.11"  # the major version of Debian bookworm's mariadbd, which the engine is tested on
    container_port = 3306
    connection_fields = {
        "host": str,
        "port": int,
        "database": str,
        "username": str,
        "password": str,
        "charset": str,
        "collation": str,
        "binlog_format": str,
        "tls": str,
        "ca_certificate": str,
        "uri": str,
    }
    options = (
        Option(
            "charset",
            "Character set",
            "Server and database character set.",
            kind="choice",
            default="utf8mb4",
            choices=tuple(COLLATIONS),
            apply=CREATE_ONLY,  # the database keeps the character set it was made with
        ),
        Option(
            "collation",
            "Collation",
            "Must belong to the character set; defaults to the charset's default collation.",
            kind="choice",
            choices=tuple(c for collations in COLLATIONS.values() for c in collations),
            apply=CREATE_ONLY,
        ),
        Option(
            "binlog_format",
            "Binary log format",
            "Binary logging is always on; this sets its format.",
            kind="choice",
            default="ROW",
            choices=("ROW", "STATEMENT", "MIXED"),
            apply=LIVE,  # new sessions
        ),
        Option(
            "innodb_buffer_pool_size",
            "Memory (buffer pool)",
            "InnoDB's cache of data and indexes: the instance's memory size. Bytes or a size such as "
            "'256mb'; whole MiB. A change resizes the pool and the memory limit of the running server.",
            kind="size",
            default=16 * MiB,
            min_value=8 * MiB,
            max_value=4096 * MiB,
            apply=LIVE,
        ),
        Option(
            "max_connections",
            "Maximum connections",
            "Client connections accepted at once.",
            kind="int",
            default=100,
            min_value=10,
            max_value=2000,
            apply=LIVE,
        ),
        Option(
            "sql_mode",
            "SQL mode",
            "A comma-separated list of SQL modes, or empty. A change reaches new sessions only.",
            kind="set",
            default=DEFAULT_SQL_MODE,
            choices=SQL_MODES,
            apply=LIVE,
        ),
        Option(
            "time_zone",
            "Time zone",
            "The server's time zone for new sessions: SYSTEM (the host's), an offset such as '+02:00', or a "
            "named zone such as 'Europe/Paris'. A change reaches new sessions only.",
            kind="text",
            default="SYSTEM",
            check=clean_time_zone,
            allowed="SYSTEM, an offset from -12:59 to +13:00 such as '+02:00', or a named zone such as 'Europe/Paris'",
            apply=LIVE,
        ),
        Option(
            "wait_timeout",
            "Idle session timeout",
            "Seconds an idle client connection is kept before the server closes it.",
            kind="int",
            default=28800,
            min_value=1,
            max_value=31536000,
            apply=LIVE,
        ),
        Option(
            "slow_query_log",
            "Slow query log",
            "Log statements that take longer than long_query_time (in the server's data folder).",
            kind="choice",
            default="OFF",
            choices=("OFF", "ON"),
            apply=LIVE,
        ),
        Option(
            "long_query_time",
            "Slow query time",
            "Seconds (a decimal) after which a statement counts as slow.",
            kind="number",
            default=10,
            min_value=0,
            max_value=3600,
            apply=LIVE,
        ),
        Option(
            "lower_case_table_names",
            "Lower-case table names",
            "1: table names are stored in lower case and compared without regard to case; 0: as given.",
            kind="int",
            default=0,
            min_value=0,
            max_value=1,
            apply=CREATE_ONLY,
        ),
        # A new data directory takes about 30 MB; binary logs and temporary tables need room too.
        disk_option(min_value=256 * MiB),
        *backup_options(),
        tls_option(
            "on",
            "required",
            help_text="on: TLS offered, with a certificate of the portal's CA; required: a client "
            "that does not use TLS is refused (require_secure_transport).",
        ),
    )

    def check_together(self, options: dict[str, Any]) -> dict[str, str]:
        if options["innodb_buffer_pool_size"] % MiB:  # the pool grows and shrinks in chunks of 1 MiB
            return {"innodb_buffer_pool_size": "Give whole MiB, such as '256mb'."}
        allowed = COLLATIONS[options["charset"]]
        if options["collation"] is None:
            options["collation"] = allowed[0]
        elif options["collation"] not in allowed:
            return {
                "collation": f"{options['collation']!r} does not belong to charset {options['charset']!r}; "
                f"choose one of: {', '.join(allowed)}."
            }
        return {}

    def memory_reservation(self, options: dict[str, Any]) -> int:
        # An idle server with my.cnf measures about 53 MB RSS (`make bench`), its 16 MB buffer
        # pool and Aria cache included; the rest is room for a few sessions' buffers.
        return self._pool(options) + 48 * MiB

    def memory_limit(self, options: dict[str, Any]) -> int:
        # The buffer pool plus per-connection buffers (each session capped in my.cnf).
        return self._pool(options) + 496 * MiB

    def _pool(self, options: dict[str, Any]) -> int:
        pool: int = self.with_defaults(options)["innodb_buffer_pool_size"]
        return pool

    # Running a server ------------------------------------------------------------------

    def local_setup(self, instance: "Instance", layout: Layout, host: Host) -> LocalSetup:
        assert isinstance(layout.data, Path) and layout.config is not None
        return LocalSetup(
            files={**self.local_config(instance, layout), INIT_FILE: self.init_sql(instance)},
            dirs=(Path(layout.files), Path(layout.tmp)),
            seed=self._data_template(host),
            first_start_args=(f"--init-file={layout.config / INIT_FILE}",),
            remove_after_first_start=(INIT_FILE,),
        )

    def local_argv(self, host: Host, config: Path) -> list[str]:
        return [str(host.program("mariadbd")), f"--defaults-file={config}"]

    def container_layout(self, *, bind_address: str, port: int) -> Layout:
        data = PurePosixPath("/var/lib/mysql")
        return Layout(
            bind_address=bind_address,
            port=port,
            data=data,
            log=data / "server.log",
            pid=PurePosixPath("/run/mysqld/mysqld.pid"),
            socket=PurePosixPath("/run/mysqld/mysqld.sock"),
            # The container's own /tmp: the official image has no /var/lib/mysql-files, and MariaDB
            # will not start when secure_file_priv names a missing folder.
            files=PurePosixPath("/tmp"),
            tmp=PurePosixPath("/tmp"),
            acl=PurePosixPath("/dev/null"),  # MySQL keeps its accounts in its data
        )

    def container(self, instance: "Instance", layout: Layout) -> Container:
        config = (PurePosixPath("/etc/mysql/conf.d/stockroom.cnf"), self.render_config(instance, layout))
        return Container(
            files={self.config_name: config, **self.tls_container_files(instance, layout)},
            init_dir=INIT_DIR,
            init_files={
                INIT_FILE: self.accounts_sql(instance, admin_from=layout.admin_from),
                ROOT_HASH_FILE: native_password_hash(instance.admin_password),
            },
            # Names of files, and no root but root@localhost, which only the socket reaches. Once
            # the files are emptied, a container that finds its data gone refuses to make new data
            # ("password option is not specified") rather than come back with a passwordless root.
            environment={
                "MARIADB_ROOT_PASSWORD_HASH_FILE": str(INIT_DIR / ROOT_HASH_FILE),
                "MARIADB_ROOT_HOST": "localhost",
            },
        )

    def container_restored(self, instance: "Instance", layout: Layout) -> Container:
        # The image makes accounts only when it finds no data: the server runs `init_sql` itself,
        # named in its config for this start (the root password's hash included).
        spec = self.container(instance, layout)
        assert spec.init_dir is not None
        path, config = spec.files[self.config_name]
        config += f"\n[mysqld]\ninit-file = {spec.init_dir / INIT_FILE}\n"
        return dataclasses.replace(
            spec,
            files={**spec.files, self.config_name: (path, config)},
            init_files={**spec.init_files, INIT_FILE: self.init_sql(instance, admin_from=layout.admin_from)},
        )

    def init_sql(self, instance: "Instance", *, admin_from: str | None = None) -> str:
        """Statements a local server runs once, at first start: `accounts_sql` and the admin
        password. One statement per line (MariaDB's --init-file reads lines); passwords appear only
        hashed.
        """
        root = (
            f"ALTER USER '{ADMIN_USERNAME}'@'localhost' IDENTIFIED BY PASSWORD "
            f"'{native_password_hash(instance.admin_password)}';"
        )
        return self.accounts_sql(instance, admin_from=admin_from, also=[root])

    def accounts_sql(self, instance: "Instance", *, admin_from: str | None = None, also: Sequence[str] = ()) -> str:
        """No account but root@localhost and the user's; the user's database and account, its
        password hashed. In a container, the image sets root's password once these have run. With
        `admin_from` (an address: names are not resolved), root may also log in over TCP from there
        alone, over TLS alone, with the same password: the portal administers a server it has no
        socket of so."""
        remote = []
        if admin_from is not None:
            account = f"'{ADMIN_USERNAME}'@'{ipaddress.ip_address(admin_from)}'"
            remote = [
                f"CREATE USER {account} IDENTIFIED BY PASSWORD '{native_password_hash(instance.admin_password)}' "
                "REQUIRE SSL;",
                f"GRANT ALL PRIVILEGES ON *.* TO {account} WITH GRANT OPTION;",
            ]
        return "\n".join([*ONLY_PORTAL_ROOT, *also, *remote, *self._user_statements(instance), ""])

    @staticmethod
    def _user_statements(instance: "Instance") -> list[str]:
        options = instance.options
        return [
            f"CREATE DATABASE IF NOT EXISTS `{instance.database}` "
            f"CHARACTER SET {options['charset']} COLLATE {options['collation']};",
            f"CREATE USER IF NOT EXISTS '{instance.username}'@'%' IDENTIFIED BY PASSWORD "
            f"'{native_password_hash(instance.password)}';",
            f"GRANT ALL PRIVILEGES ON `{instance.database}`.* TO '{instance.username}'@'%';",
        ]

    # The data-directory template -------------------------------------------------------

    def _data_template(self, host: Host) -> Path:
        """A pristine data directory, made once per server version and storage settings.

        Copying it is much faster than running mariadb-install-db for every instance.
        """
        storage = self.render(STORAGE_TEMPLATE)
        binary = host.program("mariadbd")
        stat = binary.stat()
        # The time zone tables come from the host's zone files: a new tzdata makes a new template.
        recipe = f"{binary}:{stat.st_size}:{stat.st_mtime_ns}\n{storage}\ntime zones: {_tzdata_version()}"
        key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        target = host.cache / f"mariadb-{key}"
        if (target / "data").is_dir():
            return target / "data"
        host.cache.mkdir(parents=True, exist_ok=True)
        with open(host.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "data").is_dir():
                self._build_data_template(host, target, storage)
        return target / "data"

    def _build_data_template(self, host: Host, target: Path, storage: str) -> None:
        building = target.with_name(target.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        host.mkdir(building)
        config = building / "my.cnf"
        host.write(config, "[mysqld]\n" + storage)
        result = host.run(
            [
                host.program("mariadb-install-db"),
                f"--defaults-file={config}",
                f"--datadir={building / 'data'}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ],
            cwd=building,
        )
        if result.returncode:
            shutil.rmtree(building, ignore_errors=True)
            tail = (result.stderr or result.stdout).strip().splitlines()[-2:]
            raise BackendError(f"mariadb-install-db failed: {' | '.join(tail)}")
        # The time zone tables, so that named zones ("Europe/Paris") work in SET time_zone and
        # CONVERT_TZ: loaded once here, as the official image does when it makes its data.
        result = host.run(
            [
                "bash",
                "-c",
                _LOAD_TIME_ZONES,
                "load",
                host.program("mariadb-tzinfo-to-sql"),
                host.program("mariadbd"),
                config,
                building / "data",
                ZONEINFO,
                building / "bootstrap.log",
            ],
            cwd=building,
        )
        if result.returncode:
            shutil.rmtree(building, ignore_errors=True)
            tail = (result.stderr or result.stdout).strip().splitlines()[-2:]
            raise BackendError(f"Loading the time zone tables failed: {' | '.join(tail)}")
        (building / "bootstrap.log").unlink(missing_ok=True)
        building.rename(target)
        logger.info("Built MariaDB data-directory template %s", target)

    # Administration and logins ---------------------------------------------------------

    def set_password(self, instance: "Instance", password: str, *, admin: Endpoint, write: WriteFile) -> None:
        with self.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            # Not in the binary log: a point-in-time restore replays it without grant tables, and
            # makes the accounts again from the instance's own credentials anyway.
            cursor.execute("SET SESSION sql_log_bin = 0")
            cursor.execute(
                f"ALTER USER '{instance.username}'@'%%' IDENTIFIED BY PASSWORD %s",
                [native_password_hash(password)],
            )
            # A session keeps working after its password changes; end those opened with the
            # old one. The portal's own (root) session is another user's.
            cursor.execute(f"KILL CONNECTION USER '{instance.username}'@'%'")

    # Versions --------------------------------------------------------------------------

    version_program = "mariadbd"

    def server_version(self, instance: "Instance", admin: Endpoint) -> str:
        with self.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            row = cursor.fetchone()
        # With the binary log on (always, here) the server adds "-log": a setting, not its version.
        return str(row[0] if row else "").removesuffix("-log")

    def program_version(self, output: str) -> str:
        # "mariadbd  Ver 10.11.6-MariaDB-0+deb12u1 for debian-linux-gnu on x86_64 (Debian 12)"
        found = re.search(r"\bVer\s+(\S+)", output)
        if found is None:
            raise BackendError(f"mariadbd --version names no version: {output.strip()[:200]!r}")
        return found.group(1)

    def upgrade(self, instance: "Instance", beside: Beside) -> str:
        # mariadb-upgrade, as the portal's root over the socket, beside the server (as its uid, which
        # may write the data folder's mysql_upgrade_info, its mark of the version it upgraded to).
        # Without --force it does nothing when that mark is the server's version already. It writes
        # nothing to the binary log (a point-in-time replay runs without grant tables).
        layout = beside.layout
        said = _Tail()
        beside.run(
            [
                "mariadb-upgrade",
                "--defaults-file={secret}",
                f"--socket={layout.socket}",
                f"--tmpdir={layout.tmp}",
                "--skip-write-binlog",
            ],
            stdout=said,  # type: ignore[arg-type]
            secret=f"[client]\nuser = {ADMIN_USERNAME}\npassword = {instance.admin_password}\n",
        )
        if "already upgraded" in said.text():
            return ""
        return "mariadb-upgrade brought the system tables and the data up to the server's version."

    def start_settings(self, options: dict[str, Any]) -> dict[str, Any]:
        # An offset or SYSTEM is in my.cnf; a named zone needs the zone tables, which data made
        # before they were loaded (an old instance, an old snapshot restored) lacks: a server given
        # one it cannot find in my.cnf would not start at all.
        zone = self.with_defaults(options)["time_zone"]
        return {} if zone == "SYSTEM" or zone[:1] in "+-" else {"time_zone": zone}

    live_settings = {
        "binlog_format": "binlog_format",
        "innodb_buffer_pool_size": "innodb_buffer_pool_size",
        "max_connections": "max_connections",
        "sql_mode": "sql_mode",
        "time_zone": "time_zone",
        "wait_timeout": "wait_timeout",
        "slow_query_log": "slow_query_log",
        "long_query_time": "long_query_time",
    }

    def apply_live(self, instance: "Instance", changes: dict[str, Any], *, admin: Endpoint) -> None:
        # SET GLOBAL reaches sessions opened after it (sql_mode, time_zone, wait_timeout,
        # binlog_format); the buffer pool is resized in the background, which is awaited.
        with self.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            old: dict[str, Any] = {}
            try:
                for name, value in changes.items():
                    variable = self.live_settings[name]
                    cursor.execute(f"SELECT @@GLOBAL.{variable}")
                    old[name] = _one(cursor)
                    try:
                        cursor.execute(f"SET GLOBAL {variable} = %s", [value])
                        if name == "innodb_buffer_pool_size":
                            _await_resize(cursor)
                    except pymysql.MySQLError as exc:
                        raise BackendError(f"The server refused {name} = {value!r} ({_said(exc)}).") from None
                    cursor.execute(f"SELECT @@GLOBAL.{variable}")
                    if not _same(name, _one(cursor), value):
                        raise BackendError(f"{name} reads back as {_one_text(cursor, variable)}, not {value!r}.")
            except Exception:
                for name, value in old.items():
                    try:
                        cursor.execute(f"SET GLOBAL {self.live_settings[name]} = %s", [value])
                    except pymysql.MySQLError:
                        logger.exception("Could not put back %s of instance %s", name, instance.pk)
                raise

    def refuse_writes(self, instance: "Instance", refuse: bool, *, admin: Endpoint) -> None:
        # read_only stops every account without SUPER (the user's), and the portal's root keeps it.
        with self.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            cursor.execute(f"SET GLOBAL read_only = {'ON' if refuse else 'OFF'}")

    def client_connections(self, instance: "Instance", *, admin: Endpoint) -> int:
        # Every session of the tenant's account, sleeping ones too; the portal's root, its backup
        # account and the server's own threads are other users.
        with self.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", [instance.username])
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    # Snapshots -------------------------------------------------------------------------

    snapshot_suffix = "mbstream"
    point_in_time = True

    def snapshot(self, instance: "Instance", beside: Beside, out: IO[bytes], archive: LogArchive | None = None) -> str:
        # mariabackup copies InnoDB's files while the server runs, with the redo log written
        # meanwhile, and holds a short backup lock (BACKUP STAGE) only for the other engines'
        # tables: writes go on. The copy holds accounts as the server keeps them: hashes.
        layout = beside.layout
        password = secrets.token_urlsafe(24)
        self._backup_account(instance, beside.admin, password)
        try:
            beside.run(
                [
                    "mariabackup",
                    "--defaults-file={secret}",
                    "--backup",
                    "--stream=mbstream",
                    f"--target-dir={layout.tmp}",
                    f"--tmpdir={layout.tmp}",
                    f"--datadir={layout.data}",
                    f"--socket={layout.socket}",
                ],
                stdout=out,
                secret=self._backup_options(password),
            )
        finally:
            self._backup_account(instance, beside.admin, None)
        return BINLOG_INFO  # the copy notes its binary log position itself, in this file

    def archive_logs(self, instance: "Instance", beside: Beside, archive: LogArchive) -> None:
        # FLUSH BINARY LOGS closes the current binary log and opens the next; every closed one the
        # archive lacks is copied (as the server's uid), oldest first. The server itself removes
        # them after binlog_expire_logs_seconds, long after the reconciler has archived them.
        before = datetime.now(UTC)
        with self.client(beside.admin, user=ADMIN_USERNAME, password=instance.admin_password) as db:
            with db.cursor() as cursor:
                cursor.execute("FLUSH BINARY LOGS")
                cursor.execute("SHOW BINARY LOGS")
                names = [str(row[0]) for row in cursor.fetchall()]
        archived = archive.names()
        closed = [name for name in names[:-1] if name not in archived]  # the last one is open
        if len(closed) > MOST_CLOSED:
            raise BackendError(f"{len(closed)} binary logs wait to be archived; a pass takes {MOST_CLOSED} at most.")
        for name in closed:
            if not BINLOG.fullmatch(name):
                raise BackendError(f"The server names a binary log {name!r}, not one of its own.")
            if name not in archived:
                archive.save(name, read_out(beside, beside.layout.data / name))
        archive.covered(before)

    def _backup_options(self, password: str) -> str:
        # The server's on-disk format, which mariabackup must know, and the backup account.
        storage = self.render(STORAGE_TEMPLATE)
        return f"[mysqld]\n{storage}\n[mariabackup]\nuser = {BACKUP_USERNAME}\npassword = {password}\n"

    def _backup_account(self, instance: "Instance", admin: Endpoint, password: str | None) -> None:
        """Make the backup account with `password`, or (None) drop it."""
        with self.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            cursor.execute("SET SESSION sql_log_bin = 0")  # nothing of it in the binary log
            cursor.execute(f"DROP USER IF EXISTS '{BACKUP_USERNAME}'@'localhost'")
            if password is not None:
                cursor.execute(
                    f"CREATE USER '{BACKUP_USERNAME}'@'localhost' IDENTIFIED BY PASSWORD %s",
                    [native_password_hash(password)],
                )
                cursor.execute(f"GRANT {BACKUP_GRANTS} ON *.* TO '{BACKUP_USERNAME}'@'localhost'")

    def restore(self, instance: "Instance", beside: Beside, snapshot: IO[bytes], replay: Replay | None = None) -> None:
        # Unpacked and prepared (the redo log applied) beside the old data, with `replay` the
        # archived binary logs after it replayed up to its time, then put in its place.
        def unpack(staged: PurePath) -> None:
            beside.run(["mbstream", "-x", "-C", str(staged)], stdin=snapshot)
            beside.run(["mariabackup", "--prepare", f"--target-dir={staged}", "--use-memory=32M"])
            if replay is not None:
                self._replay(instance, beside, staged, replay)

        replace_folder(beside, beside.layout.data, unpack)

    def _replay(self, instance: "Instance", beside: Beside, staged: PurePath, replay: Replay) -> None:
        fields = read_small(beside, reading(staged / BINLOG_INFO), BINLOG_INFO).split()
        if len(fields) < 2:
            raise BackendError("The base snapshot does not say where its binary log continues.")
        first, position = fields[0], fields[1]
        logs = _replayed(replay, first)
        if not logs:
            return  # nothing was written after the base
        folder = beside.layout.tmp / REPLAY_DIR
        # The instance's own config, with the replay's data and its files in the replay's folder:
        # beside a stopped container (a helper of the same image) the server's paths are not there.
        layout = dataclasses.replace(
            beside.layout,
            data=staged,
            log=folder / "replay.log",
            pid=folder / "replay.pid",
            socket=folder / "replay.sock",
        )
        beside.run(["rm", "-rf", "--", str(folder)])
        beside.run(["mkdir", "-m", "0700", "--", str(folder)])
        try:
            # Without TLS: it has no network, and a helper container lacks the certificate's files.
            config = self.render(self.config_template, instance=instance, options=instance.options, layout=layout)
            beside.run(["tee", "--", str(folder / self.config_name)], stdin=io.BytesIO(config.encode()))
            for log in logs:
                with log.open() as file:
                    beside.run(["tee", "--", str(folder / log.name)], stdin=file)
            until = replay.until.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            beside.run(
                [
                    "bash",
                    "-c",
                    _REPLAY,
                    "replay",
                    str(folder / self.config_name),
                    str(layout.data),
                    str(layout.socket),
                    str(layout.pid),
                    str(layout.log),
                    f"--start-position={position}",
                    f"--stop-datetime={until}",
                    *(str(folder / log.name) for log in logs),
                ]
            )
        finally:
            beside.run(["rm", "-rf", "--", str(folder)])

    # Export and verify -------------------------------------------------------------------

    export_suffix = "sql.gz"
    export_media_type = "application/gzip"

    def export(self, snapshot: IO[bytes], scratch: Scratch, out: IO[bytes], *, database: str) -> None:
        # A logical dump needs a server: the snapshot is InnoDB's files as mariabackup copied them.
        self._throwaway(snapshot, scratch, "dump", database, out)

    def verify(self, snapshot: IO[bytes], scratch: Scratch, *, database: str) -> str:
        found = io.BytesIO()
        said = Bounded(found, SMALL * 16, "CHECK TABLE says too much.")
        self._throwaway(snapshot, scratch, "check", database, said)  # type: ignore[arg-type]
        sound, wrong = [], []
        for line in found.getvalue().decode(errors="replace").splitlines():
            table, _, kind, text = (line.split("\t") + ["", "", ""])[:4]
            if kind.lower() == "status" and text == "OK":
                sound.append(table)
            elif kind.lower() in ("error", "warning") or (kind.lower() == "status" and text != "OK"):
                wrong.append(f"{table}: {text}")
        if wrong:
            raise BackendError(f"CHECK TABLE found a problem: {'; '.join(wrong)[:500]}")
        return f"CHECK TABLE found all {len(sound)} tables of {database} sound."

    def _throwaway(self, snapshot: IO[bytes], scratch: Scratch, action: str, database: str, out: IO[bytes]) -> None:
        if not NAMED.fullmatch(database):
            raise BackendError(f"The database {database!r} is not one the portal makes.")
        folder = scratch.folder
        scratch.run(["mkdir", "-m", "0700", "--", str(folder / "data")])
        scratch.run(["mbstream", "-x", "-C", str(folder / "data")], stdin=snapshot)
        scratch.run(["mariabackup", "--prepare", f"--target-dir={folder / 'data'}", "--use-memory=32M"])
        config = f"[mysqld]\n{self.render(STORAGE_TEMPLATE)}\n".encode()
        scratch.run(["tee", "--", str(folder / self.config_name)], stdin=io.BytesIO(config))
        argv = ["bash", "-c", _THROWAWAY, "throwaway", str(folder / self.config_name), str(folder), action, database]
        scratch.run(argv, stdout=out)

    # Imports: a SQL dump (`mariadb-dump`, `mysqldump`), plain or gzipped, loaded statement by
    # statement as the tenant's own user: it can do nothing the tenant could not do by hand. The
    # whole file is read first, and one that is cut short, or asks for what the tenant may not do,
    # is refused before anything runs (see dump.py).

    import_suffixes = (".sql", ".sql.gz")

    def check_import(self, instance: "Instance", beside: Beside, upload: IO[bytes]) -> None:
        try:
            for statement in _statements(upload):
                if why := dump.refusal(statement, instance.database):
                    raise ImportRefused(f"Line {statement.line}: {why}; nothing was loaded.")
        finally:
            upload.seek(0)

    def load(self, instance: "Instance", beside: Beside, upload: IO[bytes]) -> None:
        # As the tenant's user, over the server's socket (app@localhost, which app@'%' matches).
        client = self.client(
            beside.admin,
            user=instance.username,
            password=instance.password,
            database=instance.database,
            timeout=LOAD_TIMEOUT,
        )
        with client as db, db.cursor() as cursor:
            db.autocommit(True)  # as the `mariadb` client runs a dump: each statement is kept as it ends
            for statement in _statements(upload):
                try:
                    cursor.execute(dump.with_own_definer(statement))  # type: ignore[call-overload]  # bytes, no args
                    while cursor.nextset():  # a CALL's further results
                        pass
                except pymysql.MySQLError as exc:
                    code, text = (exc.args + ("",))[:2] if exc.args else (0, str(exc))
                    raise BackendError(f"Line {statement.line}: the server refused it ({code}: {text})") from None

    def check_login(self, instance: "Instance", endpoint: Endpoint, *, timeout: float) -> None:
        # Over the socket the user is app@localhost to the server, which its app@'%' account matches;
        # the socket counts as secure under require_secure_transport. Over TCP, with TLS as a user's
        # client would, the server's certificate checked against the CA.
        tls = ca_of(instance) if not endpoint.socket and self.tls(instance) != TLS_OFF else None
        client = self.client(
            endpoint,
            user=instance.username,
            password=instance.password,
            database=instance.database,
            timeout=timeout,
            tls_ca=tls,
        )
        with client as db, db.cursor() as cursor:
            cursor.execute("SELECT 1")

    @staticmethod
    def client(
        endpoint: Endpoint,
        *,
        user: str,
        password: str,
        database: str | None = None,
        timeout: float = ADMIN_TIMEOUT,
        tls_ca: str | None = None,
    ) -> pymysql.Connection:
        """A connection of the portal's own, over the endpoint's Unix socket if it has one, that
        gives up after `timeout` seconds of silence. With `tls_ca` (a CA's PEM), TCP goes over TLS,
        the server's certificate verified against it; not its name: the portal reaches the server
        at its bind address, and has checked that the listener is the instance's own."""
        context: ssl.SSLContext | None = None
        tls_ca = tls_ca or endpoint.tls_ca
        if tls_ca and not endpoint.socket:
            context = ssl.create_default_context(cadata=tls_ca)
            context.check_hostname = False
        return pymysql.connect(
            ssl=context,  # PyMySQL takes a context as it is
            # Without one, no TLS at all: PyMySQL would otherwise try it ("preferred") and load the
            # system's CA certificates for that on every connect, a tenth of a second or more.
            ssl_disabled=context is None,
            unix_socket=endpoint.socket,
            host=None if endpoint.socket else endpoint.host,
            port=endpoint.port,
            user=user,
            password=password,
            database=database,
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
        )

    def connection(self, instance: "Instance") -> dict[str, Any]:
        tls = self.tls(instance)
        return {
            "host": instance.host,
            "port": instance.port,
            "database": instance.database,
            "username": instance.username,
            "password": instance.password,
            "charset": instance.options["charset"],
            "collation": instance.options["collation"],
            "binlog_format": instance.options["binlog_format"],
            "tls": tls,
            "ca_certificate": ca_of(instance) if tls != TLS_OFF else "",
            "uri": f"mysql://{instance.username}:{instance.password}@{instance.host}:{instance.port}/{instance.database}"
            + ("?ssl-mode=REQUIRED" if tls != TLS_OFF else ""),
        }

    def snippets(self, connection: dict[str, Any]) -> list[tuple[str, str]]:
        c = connection
        tls = c.get("tls", TLS_OFF) != TLS_OFF
        # With TLS: the CA's certificate, saved as stockroom-ca.pem (the page's Download CA).
        cli_tls = "--ssl-ca=stockroom-ca.pem --ssl-verify-server-cert " if tls else ""
        python_tls = ',\n                     ssl={"ca": "stockroom-ca.pem"}' if tls else ""
        return [
            ("URI", c["uri"]),
            (
                "CLI",
                f"mysql {cli_tls}-h {c['host']} -P {c['port']} -u {c['username']} -p{c['password']} {c['database']}",
            ),
            (
                "Python",
                f'import pymysql\ndb = pymysql.connect(host="{c["host"]}", port={c["port"]}, user="{c["username"]}",'
                f'\n                     password="{c["password"]}", database="{c["database"]}"{python_tls})',
            ),
        ]

    def reload_tls(self, instance: "Instance", *, admin: Endpoint) -> bool:
        # MariaDB 10.11 reads its certificate and key files again on FLUSH SSL.
        with self.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            cursor.execute("FLUSH SSL")
        return True


class _Tail:
    """A program's output, of which only the end is kept (mariadb-upgrade names every table it checks)."""

    def __init__(self, keep: int = 4096):
        self.kept, self.keep = b"", keep

    def write(self, data: bytes) -> int:
        self.kept = (self.kept + data)[-self.keep :]
        return len(data)

    def text(self) -> str:
        return self.kept.decode(errors="replace")


def _one(cursor: Any) -> Any:
    row = cursor.fetchone()
    return row[0] if row else None


def _one_text(cursor: Any, variable: str) -> str:
    cursor.execute(f"SELECT @@GLOBAL.{variable}")
    return repr(_one(cursor))


def _said(exc: pymysql.MySQLError) -> str:
    code, text = (exc.args + ("",))[:2] if exc.args else (0, str(exc))
    return f"{code}: {text}"


def _same(name: str, found: Any, wanted: Any) -> bool:
    """Whether the server's value of a setting is the option's: as the server writes it back."""
    if name == "sql_mode":
        return set(filter(None, str(found).split(","))) == set(filter(None, str(wanted).split(",")))
    if name == "slow_query_log":
        return str(found) in (("1", "ON") if wanted == "ON" else ("0", "OFF"))
    if name == "long_query_time":
        return abs(float(found) - float(wanted)) < 1e-6
    if isinstance(wanted, int):
        return int(found) == wanted
    return str(found) == str(wanted)


RESIZE_TIMEOUT = 60  # seconds a buffer pool resize may take


def _await_resize(cursor: Any) -> None:
    """Wait until InnoDB says the buffer pool resize it began is over (or failed)."""
    deadline = time.monotonic() + RESIZE_TIMEOUT
    while time.monotonic() < deadline:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_resize_status'")
        row = cursor.fetchone()
        status = str(row[1]) if row else ""
        if not status or status.startswith("Completed"):
            return
        if "fail" in status.lower():
            raise BackendError(f"InnoDB did not resize the buffer pool: {status}")
        time.sleep(0.05)
    raise BackendError(f"The buffer pool resize took over {RESIZE_TIMEOUT} s.")


def _replayed(replay: Replay, first: str) -> list[ArchivedLog]:
    """The archived binary logs from `first` (where the base's copy left off) in order, up to the
    last that may hold a write before `replay.until`. A log missing in between is an error: the
    writes after it would be replayed without its own."""
    if not BINLOG.fullmatch(first):
        raise BackendError(f"The base snapshot names a binary log {first!r}, not one of the server's.")
    archived = sorted(
        (log for log in replay.logs if BINLOG.fullmatch(log.name) and _number(log.name) >= _number(first)),
        key=lambda log: _number(log.name),
    )
    if not archived or archived[0].name != first:
        raise BackendError(f"The binary log after the base snapshot ({first}) was not archived.")
    chosen = [log for log in archived if log.opened_at is None or log.opened_at < replay.until]
    for earlier, later in zip(archived, archived[1 : len(chosen) + 1], strict=False):
        if _number(later.name) != _number(earlier.name) + 1:
            raise BackendError(f"The binary log after {earlier.name} was never archived; nothing was restored.")
    return chosen


def _statements(upload: IO[bytes]) -> Iterator[dump.Statement]:
    """The statements of an uploaded dump, gzipped or not (told by its first bytes, not its name);
    ImportRefused if it cannot be read to its end."""
    upload.seek(0)
    gzipped = upload.read(2) == b"\x1f\x8b"
    upload.seek(0)
    file = cast(IO[bytes], gzip.GzipFile(fileobj=upload, mode="rb")) if gzipped else upload
    try:
        yield from dump.statements(file)
    except dump.DumpError as exc:
        raise ImportRefused(f"{exc} Nothing was loaded.") from None
    except (OSError, EOFError, zlib.error) as exc:  # a gzip stream cut short or damaged
        raise ImportRefused(f"The gzipped file cannot be read to its end ({exc}); nothing was loaded.") from None


def _number(name: str) -> int:
    return int(name.rsplit(".", 1)[1])
