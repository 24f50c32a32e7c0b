import hashlib
from typing import Any

import pymysql

from ..options import Option
from .base import Engine

# Charset -> its collations; the first one is the charset's default.
COLLATIONS: dict[str, tuple[str, ...]] = {
    "utf8mb4": ("utf8mb4_general_ci", "utf8mb4_unicode_ci", "utf8mb4_unicode_520_ci", "utf8mb4_bin"),
    "latin1": ("latin1_swedish_ci", "latin1_general_ci", "latin1_general_cs", "latin1_bin"),
    "ascii": ("ascii_general_ci", "ascii_bin"),
}

DATABASE = "app"
USERNAME = "app"
ADMIN_USERNAME = "root"
# Seconds; an administrative statement that takes longer has failed.
ADMIN_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 10, "write_timeout": 10}


def native_password_hash(password: str) -> str:
    """mysql_native_password's stored form, so no plaintext is ever written to disk."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


class MySQL(Engine):
    kind = "mysql"
    label = "MySQL"
    connection_fields = {
        "host": str,
        "port": int,
        "database": str,
        "username": str,
        "password": str,
        "charset": str,
        "collation": str,
        "binlog_format": str,
        "uri": str,
    }
    config_template = "provisioning/engines/mysql.cnf"
    config_name = "my.cnf"
    options = (
        Option(
            "charset",
            "Character set",
            "Server and database character set.",
            kind="choice",
            default="utf8mb4",
            choices=tuple(COLLATIONS),
        ),
        Option(
            "collation",
            "Collation",
            "Must belong to the character set; defaults to the charset's default collation.",
            kind="choice",
            choices=tuple(c for collations in COLLATIONS.values() for c in collations),
        ),
        Option(
            "binlog_format",
            "Binary log format",
            "Binary logging is always on; this sets its format.",
            kind="choice",
            default="ROW",
            choices=("ROW", "STATEMENT", "MIXED"),
        ),
    )

    def check_together(self, options: dict[str, Any]) -> dict[str, str]:
        allowed = COLLATIONS[options["charset"]]
        if options["collation"] is None:
            options["collation"] = allowed[0]
        elif options["collation"] not in allowed:
            return {
                "collation": f"{options['collation']!r} does not belong to charset {options['charset']!r}; "
                f"choose one of: {', '.join(allowed)}."
            }
        return {}

    def memory_limit(self, options: dict[str, Any]) -> int:
        # A 16 MB buffer pool plus per-connection buffers; official MySQL 8.4 needs the headroom.
        return 512 * 1024 * 1024

    def init_sql(self, instance) -> str:
        """Statements run once at first start: the admin password, the user's database and account.

        One statement per line (MariaDB's --init-file reads lines); passwords appear only hashed.
        """
        options = instance.options
        return "\n".join(
            [
                # mariadb-install-db also makes root@127.0.0.1, root@::1 and root@<host> without a
                # password; only the portal's root@localhost (Unix socket) may remain.
                "DELETE FROM mysql.global_priv WHERE NOT (User = 'root' AND Host = 'localhost') "
                "AND User <> 'mariadb.sys';",
                "DELETE FROM mysql.proxies_priv WHERE NOT (User = 'root' AND Host = 'localhost');",
                "FLUSH PRIVILEGES;",
                f"ALTER USER '{ADMIN_USERNAME}'@'localhost' IDENTIFIED BY PASSWORD "
                f"'{native_password_hash(instance.admin_password)}';",
                f"CREATE DATABASE IF NOT EXISTS `{instance.database}` "
                f"CHARACTER SET {options['charset']} COLLATE {options['collation']};",
                f"CREATE USER IF NOT EXISTS '{instance.username}'@'%' IDENTIFIED BY PASSWORD "
                f"'{native_password_hash(instance.password)}';",
                f"GRANT ALL PRIVILEGES ON `{instance.database}`.* TO '{instance.username}'@'%';",
                "",
            ]
        )

    def set_password(self, admin: pymysql.Connection, instance, password: str) -> None:
        """Give the user a new password over an admin connection; the old one stops working."""
        with admin.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            if "MariaDB" in cursor.fetchone()[0]:
                # The hashed form keeps the plaintext out of the binary log.
                cursor.execute(
                    f"ALTER USER '{instance.username}'@'%%' IDENTIFIED BY PASSWORD %s", [native_password_hash(password)]
                )
            else:  # MySQL writes only the hash to its binary log
                cursor.execute(f"ALTER USER '{instance.username}'@'%%' IDENTIFIED BY %s", [password])

    def check_login(self, instance, *, host: str, port: int, timeout: float) -> None:
        connection = pymysql.connect(
            host=host,
            port=port,
            user=instance.username,
            password=instance.password,
            database=instance.database,
            connect_timeout=timeout,
            read_timeout=timeout,
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            connection.close()

    def connection(self, instance) -> dict[str, Any]:
        return {
            "host": instance.host,
            "port": instance.port,
            "database": instance.database,
            "username": instance.username,
            "password": instance.password,
            "charset": instance.options["charset"],
            "collation": instance.options["collation"],
            "binlog_format": instance.options["binlog_format"],
            "uri": f"mysql://{instance.username}:{instance.password}@{instance.host}:{instance.port}/{instance.database}",
        }

    def snippets(self, connection: dict[str, Any]) -> list[tuple[str, str]]:
        c = connection
        return [
            ("URI", c["uri"]),
            ("CLI", f"mysql -h {c['host']} -P {c['port']} -u {c['username']} -p{c['password']} {c['database']}"),
            (
                "Python",
                f'import pymysql\ndb = pymysql.connect(host="{c["host"]}", port={c["port"]}, user="{c["username"]}",'
                f'\n                     password="{c["password"]}", database="{c["database"]}")',
            ),
        ]
