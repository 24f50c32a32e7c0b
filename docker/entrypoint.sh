#!/bin/bash
# Stockroom's test image: Debian 12's MariaDB 10.11 and Redis 7.0 behind the contracts of the official
# `mariadb:10.11` and `redis:7.0` images, so the Docker backend runs here as it runs there. What follows
# is those images' docker-entrypoint.sh, cut to what Stockroom and its tests use.
#
# mariadb (github.com/MariaDB/mariadb-docker, docker-entrypoint.sh):
# - Accounts, made once, when /var/lib/mysql holds no data yet: MARIADB_ROOT_PASSWORD,
#   MARIADB_ROOT_PASSWORD_HASH or MARIADB_ALLOW_EMPTY_ROOT_PASSWORD (one of them is required);
#   MARIADB_ROOT_HOST (default %: root@'%' too; `localhost` makes none); MARIADB_DATABASE;
#   MARIADB_USER with MARIADB_PASSWORD or MARIADB_PASSWORD_HASH (@MARIADB_USER_HOST, default %);
#   MARIADB_INITDB_SKIP_TZINFO. Each MARIADB_X falls back to MYSQL_X (the *_HASH names have no
#   MYSQL_ form), and may be read instead from the file that X_FILE names. That file is read at
#   every start, so it must stay: an empty one gives an empty value.
# - Then /docker-entrypoint-initdb.d/*.sql and *.sh run, as root over the socket; other files are
#   ignored. root@localhost gets MARIADB_ROOT_PASSWORD_HASH only after them, so until then they
#   log in without a password (with MARIADB_ROOT_PASSWORD, with it).
# - Healthcheck accounts (healthcheck@localhost, 127.0.0.1 and ::1, USAGE only) are made too.
# - Started as root, it gives the data folder and the socket's folder to `mysql` and drops to it;
#   started with --user, it runs as that uid and needs no capability.
# - Extra config in /etc/mysql/conf.d; data in /var/lib/mysql; the socket where the config says.
# Not here: random root passwords, replication, restores from backups, upgrades.
#
# redis (github.com/docker-library/redis, 7.0/debian/docker-entrypoint.sh): `redis-server <conf>`,
# data in /data; started as root it gives /data to `redis` and drops to it, with --user it runs as
# that uid; umask 0077.
set -eo pipefail
shopt -s nullglob

note() { printf '%s [Note] [Entrypoint]: %s\n' "$(date --rfc-3339=seconds)" "$*"; }
warn() { printf '%s [Warn] [Entrypoint]: %s\n' "$(date --rfc-3339=seconds)" "$*" >&2; }
error() {
  printf '%s [ERROR] [Entrypoint]: %s\n' "$(date --rfc-3339=seconds)" "$*" >&2
  exit 1
}

# file_env VAR [DEFAULT]: VAR is its own value, or the content of the file VAR_FILE names; a
# missing file is an error, as in the official image.
file_env() {
  local var=$1 file_var=${1}_FILE default=${2:-}
  if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
    error "Both $var and $file_var are set (but are exclusive)"
  fi
  local value=$default
  if [ -n "${!var:-}" ]; then
    value=${!var}
  elif [ -n "${!file_var:-}" ]; then
    value=$(<"${!file_var}")
  fi
  export "$var"="$value"
  unset "$file_var"
}

# mariadb_env MYSQL_X [DEFAULT]: MARIADB_X (or its file), else MYSQL_X (or its file); both end equal.
mariadb_env() {
  local var=$1 maria=MARIADB_${1#MYSQL_}
  file_env "$var" "${2:-}"
  file_env "$maria" "${!var}"
  if [ -n "${!maria:-}" ]; then export "$var"="${!maria}"; fi
}

# The datadir and socket the server will use, from `mariadbd --verbose --help`, which also fails
# on a config the server would refuse.
setup_env() {
  local help
  if ! help=$("$@" --verbose --help 2>&1); then
    error "mariadbd failed while attempting to check config: $help"
  fi
  config() { awk -v name="$1" '$1 == name && /^[^ \t]/ { sub(/^[^ \t]+[ \t]+/, ""); print; exit }' <<<"$help"; }
  DATADIR=$(config datadir)
  SOCKET=$(config socket)

  mariadb_env MYSQL_ROOT_HOST '%'
  mariadb_env MYSQL_DATABASE
  mariadb_env MYSQL_USER
  mariadb_env MYSQL_PASSWORD
  mariadb_env MYSQL_ROOT_PASSWORD
  file_env MARIADB_PASSWORD_HASH
  file_env MARIADB_ROOT_PASSWORD_HASH
  file_env MARIADB_USER_HOST '%'
  : "${MARIADB_ALLOW_EMPTY_ROOT_PASSWORD:=${MYSQL_ALLOW_EMPTY_PASSWORD:-}}"
  : "${MARIADB_INITDB_SKIP_TZINFO:=${MYSQL_INITDB_SKIP_TZINFO:-}}"
  export MARIADB_ALLOW_EMPTY_ROOT_PASSWORD MARIADB_INITDB_SKIP_TZINFO
  DATABASE_ALREADY_EXISTS=
  if [ -d "$DATADIR/mysql" ]; then DATABASE_ALREADY_EXISTS=true; fi
}

# sql [--dont-use-mysql-root-password] [client args]: SQL from standard input, as root over the socket.
sql() {
  local password=${MARIADB_ROOT_PASSWORD:-}
  if [ "${1:-}" = --dont-use-mysql-root-password ]; then
    shift
    password=
  fi
  if [ -n "${MARIADB_DATABASE:-}" ]; then set -- --database="$MARIADB_DATABASE" "$@"; fi
  MYSQL_PWD=$password mariadb --protocol=socket -uroot -hlocalhost --socket="$SOCKET" "$@"
}

escape() { # a string literal's inside: \ and ' escaped, newlines as \n
  local escaped=${1//\\/\\\\}
  escaped=${escaped//$'\n'/\\n}
  echo "${escaped//\'/\\\'}"
}

verify_minimum_env() {
  if [ -z "$MARIADB_ROOT_PASSWORD" ] && [ -z "$MARIADB_ROOT_PASSWORD_HASH" ] && [ -z "$MARIADB_ALLOW_EMPTY_ROOT_PASSWORD" ]; then
    error "Database is uninitialized and password option is not specified. You need to specify one of MARIADB_ROOT_PASSWORD, MARIADB_ROOT_PASSWORD_HASH and MARIADB_ALLOW_EMPTY_ROOT_PASSWORD"
  fi
  if { [ -n "$MARIADB_ROOT_PASSWORD" ] || [ -n "$MARIADB_ALLOW_EMPTY_ROOT_PASSWORD" ]; } && [ -n "$MARIADB_ROOT_PASSWORD_HASH" ]; then
    error "Cannot specify MARIADB_ROOT_PASSWORD_HASH and another MARIADB_ROOT_PASSWORD* option."
  fi
  if [ -n "$MARIADB_PASSWORD" ] && [ -n "$MARIADB_PASSWORD_HASH" ]; then
    error "Cannot specify MARIADB_PASSWORD_HASH and MARIADB_PASSWORD option."
  fi
}

temp_server_start() {
  "$@" --skip-networking --default-time-zone=SYSTEM --socket="$SOCKET" --wsrep_on=OFF \
    --expire-logs-days=0 --skip-slave-start --loose-innodb_buffer_pool_load_at_startup=0 &
  MARIADB_PID=$!
  note "Waiting for server startup"
  local i
  # The official image polls once a second; a tenth keeps the tests quick.
  for i in {300..0}; do
    if sql --dont-use-mysql-root-password --database=mysql <<<'SELECT 1' &>/dev/null; then break; fi
    sleep 0.1
  done
  if [ "$i" = 0 ]; then error "Unable to start server."; fi
}

temp_server_stop() {
  kill "$MARIADB_PID"
  wait "$MARIADB_PID"
}

setup_db() {
  if [ -z "$MARIADB_INITDB_SKIP_TZINFO" ]; then
    mariadb-tzinfo-to-sql --skip-write-binlog /usr/share/zoneinfo | sql --dont-use-mysql-root-password --database=mysql
  fi
  local root_password root_create= root_localhost= database_create= user_create= user_grants=
  root_password=$(escape "${MARIADB_ROOT_PASSWORD:-}")
  if [ -n "$MARIADB_ROOT_HOST" ] && [ "$MARIADB_ROOT_HOST" != localhost ]; then
    local identified="IDENTIFIED BY '$root_password'"
    if [ -n "$MARIADB_ROOT_PASSWORD_HASH" ]; then identified="IDENTIFIED BY PASSWORD '$MARIADB_ROOT_PASSWORD_HASH'"; fi
    root_create="CREATE USER 'root'@'$MARIADB_ROOT_HOST' $identified;
      GRANT ALL ON *.* TO 'root'@'$MARIADB_ROOT_HOST' WITH GRANT OPTION;
      GRANT PROXY ON ''@'%' TO 'root'@'$MARIADB_ROOT_HOST' WITH GRANT OPTION;"
  fi
  if [ -z "$MARIADB_ROOT_PASSWORD_HASH" ]; then
    root_localhost="SET PASSWORD FOR 'root'@'localhost' = PASSWORD('$root_password');"
  fi
  local healthcheck_password host healthcheck=
  healthcheck_password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
  for host in 127.0.0.1 ::1 localhost; do
    healthcheck+="CREATE USER IF NOT EXISTS healthcheck@'$host' IDENTIFIED BY '$healthcheck_password';
      GRANT USAGE ON *.* TO healthcheck@'$host';"
  done
  (umask 0077 && printf '[mariadb-client]\nsocket=%s\nuser=healthcheck\npassword=%s\n' "$SOCKET" \
    "$healthcheck_password" >"$DATADIR/.my-healthcheck.cnf")
  if [ -n "$MARIADB_DATABASE" ]; then
    note "Creating database $MARIADB_DATABASE"
    database_create="CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;"
  fi
  if { [ -n "$MARIADB_PASSWORD" ] || [ -n "$MARIADB_PASSWORD_HASH" ]; } && [ -n "$MARIADB_USER" ]; then
    note "Creating user $MARIADB_USER"
    if [ -n "$MARIADB_PASSWORD_HASH" ]; then
      user_create="CREATE USER '$MARIADB_USER'@'$MARIADB_USER_HOST' IDENTIFIED BY PASSWORD '$MARIADB_PASSWORD_HASH';"
    else
      user_create="CREATE USER '$MARIADB_USER'@'$MARIADB_USER_HOST' IDENTIFIED BY '$(escape "$MARIADB_PASSWORD")';"
    fi
    if [ -n "$MARIADB_DATABASE" ]; then
      user_grants="GRANT ALL ON \`${MARIADB_DATABASE//_/\\_}\`.* TO '$MARIADB_USER'@'$MARIADB_USER_HOST';"
    fi
  fi
  note "Securing system users (equivalent to running mysql_secure_installation)"
  sql --dont-use-mysql-root-password --database=mysql --binary-mode <<-EOSQL
	SET @orig_sql_log_bin = @@SESSION.SQL_LOG_BIN;
	SET @@SESSION.SQL_LOG_BIN = 0;
	SET @@SESSION.SQL_MODE = REPLACE(@@SESSION.SQL_MODE, 'NO_BACKSLASH_ESCAPES', '');
	DROP USER IF EXISTS root@'127.0.0.1', root@'::1';
	EXECUTE IMMEDIATE CONCAT('DROP USER IF EXISTS root@\'', @@hostname, '\'');
	${root_localhost}
	${root_create}
	${healthcheck}
	SET @@SESSION.SQL_LOG_BIN = @orig_sql_log_bin;
	${database_create}
	${user_create}
	${user_grants}
	EOSQL
}

process_init_files() {
  local f
  for f; do
    case "$f" in
      *.sh)
        if [ -x "$f" ]; then
          note "$0: running $f"
          "$f"
        else
          note "$0: sourcing $f"
          # shellcheck disable=SC1090
          . "$f"
        fi
        ;;
      *.sql) note "$0: running $f"; sql <"$f" ;;
      *.sql.gz) note "$0: running $f"; gunzip -c "$f" | sql ;;
      *) warn "$0: ignoring $f" ;;
    esac
  done
}

mariadb_init() {
  ls /docker-entrypoint-initdb.d/ >/dev/null # fails early on a folder the server cannot read
  note "Initializing database files"
  mariadb-install-db --datadir="$DATADIR" --rpm --auth-root-authentication-method=normal "${@:2}" \
    --skip-test-db --default-time-zone=SYSTEM --enforce-storage-engine= --skip-log-bin \
    --expire-logs-days=0 --loose-innodb_buffer_pool_load_at_startup=0 \
    --loose-innodb_buffer_pool_dump_at_shutdown=0 >/dev/null
  note "Starting temporary server"
  temp_server_start "$@"
  setup_db
  process_init_files /docker-entrypoint-initdb.d/*
  # Only now: the files above log in as root without a password.
  if [ -n "$MARIADB_ROOT_PASSWORD_HASH" ]; then
    note "Setting root@localhost password hash"
    sql --dont-use-mysql-root-password --binary-mode <<-EOSQL
	SET @@SESSION.SQL_LOG_BIN = 0;
	SET PASSWORD FOR 'root'@'localhost' = '${MARIADB_ROOT_PASSWORD_HASH}';
	EOSQL
  fi
  note "Stopping temporary server"
  temp_server_stop
  note "MariaDB init process done. Ready for start up."
}

if [ "${1:0:1}" = - ]; then set -- mariadbd "$@"; fi
if [ "${1%.conf}" != "$1" ]; then set -- redis-server "$@"; fi

if [ "$1" = redis-server ]; then
  cd /data # the official image's WORKDIR
  if [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
  fi
  if [ "$(umask)" = 0022 ]; then umask 0077; fi
  exec "$@"
fi

if [ "$1" = mariadbd ] || [ "$1" = mysqld ]; then
  note "Entrypoint script for MariaDB Server started."
  setup_env "$@"
  mkdir -p "$DATADIR"
  if [ "$(id -u)" = 0 ]; then
    find "$DATADIR" \! -user mysql -exec chown mysql: '{}' +
    find "${SOCKET%/*}" -maxdepth 0 \! -user mysql -exec chown mysql: '{}' \;
    note "Switching to dedicated user 'mysql'"
    exec setpriv --reuid=mysql --regid=mysql --init-groups "${BASH_SOURCE[0]}" "$@"
  fi
  if [ -z "$DATABASE_ALREADY_EXISTS" ]; then
    verify_minimum_env
    mariadb_init "$@"
  fi
  for password_var in ROOT_ ''; do
    unset "MARIADB_${password_var}PASSWORD" "MARIADB_${password_var}PASSWORD_HASH" "MYSQL_${password_var}PASSWORD"
  done
  unset MYSQL_ROOT_HOST MARIADB_ROOT_HOST
fi

exec "$@"
