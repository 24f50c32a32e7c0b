"""How an uploaded SQL dump is read before anything runs: cut into statements as the `mariadb`
client cuts it, refused where it asks for rights the tenant lacks or another database (naming the
line), and its DEFINER clauses made the tenant's own. The load itself is proven against a real
server in test_imports.py."""

import gzip
import io

import pytest

from provisioning.engines.mysql import dump

DUMP = b"""/*M!999999\\- enable the sandbox mode */
-- MariaDB dump 10.19  Distrib 10.11.6-MariaDB
/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;
/*!40101 SET NAMES utf8mb4 */;
DROP TABLE IF EXISTS `t`;
CREATE TABLE `t` (
  `id` int(11) NOT NULL,
  `v` varchar(20) DEFAULT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
INSERT INTO `t` VALUES (1,'a;b'),(2,'it''s \\' ; -- not a comment'),(3,"q;\\"");
# a comment; with a semicolon
/* a block ; comment */
DELIMITER ;;
/*!50003 CREATE*/ /*!50017 DEFINER=`root`@`localhost`*/ /*!50003 TRIGGER `up` BEFORE INSERT ON `t`
FOR EACH ROW BEGIN SET NEW.v = UPPER(NEW.v); END */;;
DELIMITER ;
/*!50001 CREATE ALGORITHM=UNDEFINED */
/*!50013 DEFINER=`root`@`localhost` SQL SECURITY DEFINER */
/*!50001 VIEW `vw` AS select `t`.`id` AS `id` from `t` */;
-- Dump completed
"""


def read(data: bytes, chunk: int = dump.CHUNK) -> list[dump.Statement]:
    old = dump.CHUNK
    dump.CHUNK = chunk
    try:
        return list(dump.statements(io.BytesIO(data)))
    finally:
        dump.CHUNK = old


def test_a_dump_is_cut_where_the_client_cuts_it_whatever_the_chunks_it_is_read_in():
    whole = read(DUMP)
    assert [s.line for s in whole] == [3, 4, 5, 6, 11, 15, 18]
    assert whole[4].text.strip().endswith(b"""(3,"q;\\"")""")  # ; in strings and comments does not cut
    assert b"BEGIN SET NEW.v = UPPER(NEW.v); END" in whole[5].text  # DELIMITER ;; keeps the body whole
    for chunk in (1, 2, 5, 64):
        assert [(s.line, s.text) for s in read(DUMP, chunk)] == [(s.line, s.text) for s in whole]
    assert all(dump.refusal(s, "app") is None for s in whole)


def test_definers_become_the_tenants_own_and_strings_are_left_alone():
    trigger, view = read(DUMP)[5:7]
    assert b"DEFINER=CURRENT_USER*/" in dump.with_own_definer(trigger)
    assert b"DEFINER=CURRENT_USER SQL SECURITY DEFINER" in dump.with_own_definer(view)
    for clause in (b"DEFINER = 'root'@'%'", b"DEFINER=root@localhost", b"definer=`x`@`1.2.3.4`"):
        (statement,) = read(b"CREATE " + clause + b" VIEW v AS SELECT 1;")
        assert dump.with_own_definer(statement) == b"CREATE DEFINER=CURRENT_USER VIEW v AS SELECT 1"
    (row,) = read(b"INSERT INTO t VALUES ('DEFINER=`root`@`localhost`');")
    assert dump.with_own_definer(row) == row.text


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        (b"CREATE DATABASE other", "CREATE DATABASE other touches another database than yours (app)"),
        (b"CREATE DATABASE /*!32312 IF NOT EXISTS*/ `other`", "CREATE DATABASE other"),
        (b"USE `other`", "USE other switches to another database"),
        (b"GRANT ALL ON *.* TO 'x'@'%'", "GRANT changes accounts' rights"),
        (b"/*!40000 GRANT SELECT ON app.* TO x */", "GRANT"),
        (b"CREATE USER x IDENTIFIED BY 'p'", "CREATE USER makes an account"),
        (b"SET GLOBAL read_only = 1", "SET GLOBAL"),
        (b"SET @@GLOBAL.GTID_PURGED='1-1-1'", "SET @@GLOBAL"),
        (b"SET @@SESSION.SQL_LOG_BIN= 0", "needs SUPER"),
        (b"SET sql_log_bin = 0", "needs SUPER"),
        (b"INSERT INTO other.t VALUES (1)", "other.t is in another database than yours"),
        (b"SELECT * FROM `mysql`.`user`", "mysql.user is in another database"),
        (b"CREATE TABLE t2 LIKE other.t", "other.t"),
        (b"LOAD DATA INFILE '/etc/passwd' INTO TABLE t", "LOAD DATA reads files"),
        (b"SELECT 1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE writes files"),
        (b"INSTALL SONAME 'ha_x'", "INSTALL loads server plugins"),
        (b"CREATE FUNCTION f RETURNS STRING SONAME 'x.so'", "SONAME"),
        (b"\\! sh -c id", "client commands"),
        (b"FLUSH PRIVILEGES", "FLUSH"),
        (b"DROP DATABASE app", "DROP DATABASE"),
        (b"EXECUTE IMMEDIATE 'GRANT ALL ON *.* TO x'", "runs SQL from a string"),
    ],
)
def test_what_the_tenant_may_not_do_is_refused_naming_the_line(statement, why):
    data = b"CREATE TABLE ok (a int);\n\n" + statement + b";\n"
    first, second = read(data)
    assert dump.refusal(first, "app") is None
    assert second.line == 3
    assert why in (dump.refusal(second, "app") or "")


@pytest.mark.parametrize(
    "statement",
    [
        b"USE app",
        b"CREATE DATABASE IF NOT EXISTS `app`",
        b"INSERT INTO app.t VALUES (1)",
        b"SELECT t.a FROM t",  # a table's name before a column is not a database
        b"SET NAMES utf8mb4",
        b"SET @saved = @@character_set_client, sql_mode = 'STRICT_ALL_TABLES'",
        b"INSERT INTO t VALUES ('GRANT ALL ON *.* TO x; CREATE DATABASE other')",
    ],
)
def test_what_the_tenant_may_do_is_not_refused(statement):
    (read_statement,) = read(statement + b";")
    assert dump.refusal(read_statement, "app") is None


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (DUMP.index(b"it''s") + 2, "Line 11: a string begins here and never ends"),
        (DUMP.index(b"ENGINE=InnoDB"), "Line 6: the last statement has no ';' at its end"),
        (DUMP.index(b"BEGIN SET"), "Line 15: the last statement has no ';;' at its end"),
        (DUMP.index(b"a block") + 2, "a comment begins here and never ends"),
    ],
)
def test_a_file_cut_short_is_refused_naming_where(cut, why):
    with pytest.raises(dump.DumpError, match=why):
        read(DUMP[:cut])


def test_a_statement_longer_than_the_server_takes_is_refused(monkeypatch):
    monkeypatch.setattr(dump, "MOST_STATEMENT", 1000)
    with pytest.raises(dump.DumpError, match="Line 2: a statement longer than"):
        read(b"SELECT 1;\nINSERT INTO t VALUES ('" + b"x" * 3000 + b"');")


def test_a_gzipped_dump_is_read_by_its_first_bytes_and_a_cut_one_refused():
    from provisioning.engines.mysql import _statements
    from provisioning.errors import ImportRefused

    packed = gzip.compress(DUMP)
    assert len(list(_statements(io.BytesIO(packed)))) == 7
    with pytest.raises(ImportRefused, match="cannot be read to its end"):
        list(_statements(io.BytesIO(packed[: len(packed) // 2])))
