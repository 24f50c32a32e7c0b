#!/bin/bash
# Follows the official `mysql` image's contract (MYSQL_ROOT_PASSWORD, MYSQL_ROOT_HOST (default %),
# MYSQL_DATABASE, MYSQL_USER, MYSQL_PASSWORD; extra config in /etc/mysql/conf.d; data in /var/lib/mysql) and the official
# `redis` image's (`redis-server <conf>`, data in /data), with Debian's MariaDB and Redis.
set -euo pipefail

if [ "${1:-}" = "redis-server" ]; then
  chown -R redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi

if [ "${1:-}" = "mariadbd" ] || [ "${1:-}" = "mysqld" ]; then
  shift
  datadir=/var/lib/mysql
  mkdir -p /run/mysqld /var/lib/mysql-files
  chown -R mysql:mysql "$datadir" /run/mysqld /var/lib/mysql-files
  if [ ! -d "$datadir/mysql" ]; then
    : "${MYSQL_ROOT_PASSWORD:?MYSQL_ROOT_PASSWORD must be set}"
    mariadb-install-db --user=mysql --datadir="$datadir" --auth-root-authentication-method=normal \
      --skip-test-db --skip-name-resolve >/dev/null
    mariadbd --user=mysql --skip-networking --socket=/run/mysqld/init.sock &
    pid=$!
    for _ in $(seq 300); do
      mariadb-admin --socket=/run/mysqld/init.sock ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    {
      echo "SET @@SESSION.SQL_LOG_BIN = 0;"
      echo "DELETE FROM mysql.global_priv WHERE NOT (User = 'root' AND Host = 'localhost') AND User <> 'mariadb.sys';"
      echo "DELETE FROM mysql.proxies_priv WHERE NOT (User = 'root' AND Host = 'localhost');"
      echo "FLUSH PRIVILEGES;"
      echo "ALTER USER 'root'@'localhost' IDENTIFIED BY '${MYSQL_ROOT_PASSWORD}';"
      root_host=${MYSQL_ROOT_HOST:-%}
      if [ "$root_host" != "localhost" ]; then
        echo "CREATE USER 'root'@'${root_host}' IDENTIFIED BY '${MYSQL_ROOT_PASSWORD}';"
        echo "GRANT ALL ON *.* TO 'root'@'${root_host}' WITH GRANT OPTION;"
      fi
      if [ -n "${MYSQL_DATABASE:-}" ]; then
        echo "CREATE DATABASE IF NOT EXISTS \`${MYSQL_DATABASE}\`;"
      fi
      if [ -n "${MYSQL_USER:-}" ] && [ -n "${MYSQL_PASSWORD:-}" ]; then
        echo "CREATE USER '${MYSQL_USER}'@'%' IDENTIFIED BY '${MYSQL_PASSWORD}';"
        [ -n "${MYSQL_DATABASE:-}" ] && echo "GRANT ALL ON \`${MYSQL_DATABASE}\`.* TO '${MYSQL_USER}'@'%';"
      fi
    } | mariadb --socket=/run/mysqld/init.sock -uroot
    kill "$pid"
    wait "$pid" || true
  fi
  exec mariadbd --user=mysql "$@"
fi

exec "$@"
