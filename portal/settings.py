"""Settings for the Stockroom portal.

Every value can be set from the environment (or a `.env` file next to manage.py); the
README lists them. Bad values fail at start-up with ImproperlyConfigured, never later.
"""

import hashlib
import os
from collections.abc import Iterator, MutableMapping
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


class _Environ(MutableMapping[str, str]):
    """os.environ, then the values read from `.env`, which are kept here rather than put into
    os.environ: .env's secrets stay in this process's memory, out of /proc/<pid>/environ and out
    of the environment of every process it starts."""

    def __init__(self) -> None:
        self.dotenv: dict[str, str] = {}

    def __getitem__(self, key: str) -> str:
        return os.environ[key] if key in os.environ else self.dotenv[key]

    def __setitem__(self, key: str, value: str) -> None:
        self.dotenv[key] = value

    def __delitem__(self, key: str) -> None:
        del self.dotenv[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.dotenv.keys() | os.environ.keys())

    def __len__(self) -> int:
        return len(self.dotenv.keys() | os.environ.keys())


class _Env(environ.Env):
    ENVIRON = _Environ()


env = _Env()
_Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DEBUG", default=False)

# Both keys are required outside DEBUG; `make run` writes random ones into .env.
_DEV_ONLY = "insecure-development-only-key"
SECRET_KEY = env.str("SECRET_KEY", default=_DEV_ONLY if DEBUG else "")
STOCKROOM_ENCRYPTION_KEYS = env.list("STOCKROOM_ENCRYPTION_KEYS", default=[_DEV_ONLY] if DEBUG else [])
if not SECRET_KEY:
    raise ImproperlyConfigured("Set SECRET_KEY in the environment or in .env.")
if not STOCKROOM_ENCRYPTION_KEYS:
    raise ImproperlyConfigured("Set STOCKROOM_ENCRYPTION_KEYS (comma-separated; the first encrypts, all decrypt).")

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# Served over HTTPS by a TLS-terminating proxy that sets X-Forwarded-Proto. Off by default, so
# `make run` keeps serving plain http on 127.0.0.1.
STOCKROOM_HTTPS = env.bool("STOCKROOM_HTTPS", default=False)
if STOCKROOM_HTTPS:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = 365 * 24 * 3600
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # Trust the proxy's word on the scheme; the proxy must overwrite the header clients send.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SILENCED_SYSTEM_CHECKS = [
    # HSTS preloading is a promise, for the whole domain and hard to take back, made by whoever
    # owns the domain when they submit it to browsers; not something the portal can decide.
    "security.W021",
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    # API tokens: knox's hashing and header parsing, over provisioning.AccessToken (KNOX_TOKEN_MODEL).
    # DRF's authtoken app is gone; its table stays, emptied by migration 0007 (tokens moved, hashed).
    "knox",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "provisioning",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# State of the portal and of every local instance lives under DATA_DIR.
DATA_DIR = (BASE_DIR / env.str("DATA_DIR", default="var")).resolve()  # relative to BASE_DIR
DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)  # `make run` also tightens an existing one

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'portal.sqlite3'}")}
# Keep connections between requests (a new PostgreSQL connection costs milliseconds each time).
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["ENGINE"] = "portal.sqlite"  # write transactions queue: see portal/sqlite/base.py
    # Concurrent creates from several web threads and the worker: wait for the write
    # lock instead of failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-portal.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- Sign-in lock-out (django-axes) -------------------------------------------------------------
# Kept in one block, apps and middleware included, so that it reads (and merges) as one piece.
# Every password check goes through django.contrib.auth.authenticate(request=...), where axes' backend
# refuses a user name or an address with STOCKROOM_LOGIN_FAILURES failed attempts within the last
# STOCKROOM_LOGIN_COOLOFF seconds, even with the right password; each failure restarts the wait.
# The sign-in page, the admin's and the API's token endpoint count alike. Operators unlock in the
# admin (Access attempts → "Unlock"), or with `manage.py axes_reset_username <name>`.
INSTALLED_APPS += ["axes"]
MIDDLEWARE += ["axes.middleware.AxesMiddleware"]  # last: it turns a lock-out into the lock-out page
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
STOCKROOM_LOGIN_FAILURES = env.int("STOCKROOM_LOGIN_FAILURES", default=10)
STOCKROOM_LOGIN_COOLOFF = env.int("STOCKROOM_LOGIN_COOLOFF", default=15 * 60)  # 0: until an operator unlocks
if STOCKROOM_LOGIN_FAILURES < 1 or STOCKROOM_LOGIN_COOLOFF < 0:
    raise ImproperlyConfigured("STOCKROOM_LOGIN_FAILURES must be at least 1, STOCKROOM_LOGIN_COOLOFF at least 0.")
AXES_FAILURE_LIMIT = STOCKROOM_LOGIN_FAILURES
AXES_COOLOFF_TIME = timedelta(seconds=STOCKROOM_LOGIN_COOLOFF) if STOCKROOM_LOGIN_COOLOFF else None
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # each on its own: either one locks
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"  # the portal database, shared by every process
AXES_CLIENT_IP_CALLABLE = "provisioning.access.client_address"  # REMOTE_ADDR, or the proxy's word (STOCKROOM_HTTPS)
AXES_USERNAME_CALLABLE = "provisioning.access.client_username"  # cut to what its table holds
AXES_LOCKOUT_CALLABLE = "provisioning.access.locked_out"  # a page that says what happened and until when
AXES_ENABLE_ADMIN = False  # provisioning/admin.py registers its models, with actions behind permissions
AXES_VERBOSE = False  # no banner at the start of every process; lock-outs are still logged
# --- end of sign-in lock-out ---------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Snapshots of instances' data: files only the portal may read (0700 folders, 0600 files), never
# on an instance's own disk. An operator may point the "snapshots" storage at another backend.
STOCKROOM_SNAPSHOT_DIR = Path(env.str("STOCKROOM_SNAPSHOT_DIR", default=str(DATA_DIR / "snapshots")))
STOCKROOM_SNAPSHOT_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
STOCKROOM_SNAPSHOT_DIR.chmod(0o700)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "snapshots": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": str(STOCKROOM_SNAPSHOT_DIR),
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    },
}
# How long the snapshot taken before a delete is kept (the delete's undo), in days.
STOCKROOM_SNAPSHOT_KEEP_DAYS = env.float("STOCKROOM_SNAPSHOT_KEEP_DAYS", default=7.0)
# Seconds between two archivings of a running instance's closed log files (point-in-time recovery):
# what a lost disk may lose. A restore of a running instance archives its log first, to that moment.
STOCKROOM_LOG_ARCHIVE_INTERVAL = env.float("STOCKROOM_LOG_ARCHIVE_INTERVAL", default=300.0)
# Seconds after its create an instance's first scheduled backup is due (unless its interval is
# shorter): the base its recovery window begins with. Instances that live less pay nothing.
STOCKROOM_FIRST_BACKUP_AFTER = env.float("STOCKROOM_FIRST_BACKUP_AFTER", default=600.0)
# Days after which the reconciler verifies the newest ready snapshot of each instance again (restores
# it into a throwaway server and checks it there) unless one of its snapshots was verified since;
# 0 turns this off (a verify can still be asked for).
STOCKROOM_VERIFY_EVERY_DAYS = env.float("STOCKROOM_VERIFY_EVERY_DAYS", default=7.0)

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "provisioning.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "provisioning.api.pagination.Pagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "EXCEPTION_HANDLER": "provisioning.api.views.exception_handler",
    # The address a throttle counts is the connection's (REMOTE_ADDR), unless the portal is behind
    # this many proxies that each append to X-Forwarded-For: then a client cannot pick its own.
    "NUM_PROXIES": env.int("STOCKROOM_TRUSTED_PROXIES", default=0),
}


# API tokens (provisioning.AccessToken; README, "Tokens"). A TTL is days ("90") or a duration
# ("12h", "30d", "2w"); "never" only for the tokens a user asks for, and only when allowed. Unless
# it is, no token may live longer than STOCKROOM_TOKEN_MAX_TTL.
def _token_lifetime(name: str, default: str):
    from provisioning.durations import parse_duration  # no Django in it: safe while settings load

    try:
        lifetime = parse_duration(env.str(name, default=default))
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None
    if lifetime is None:
        raise ImproperlyConfigured(f"{name} is a duration, not 'never' (see STOCKROOM_TOKEN_ALLOW_NEVER).")
    return lifetime


STOCKROOM_TOKEN_TTL = _token_lifetime("STOCKROOM_TOKEN_TTL", "90")
STOCKROOM_TOKEN_MAX_TTL = _token_lifetime("STOCKROOM_TOKEN_MAX_TTL", "365")
if STOCKROOM_TOKEN_MAX_TTL < STOCKROOM_TOKEN_TTL:
    raise ImproperlyConfigured("STOCKROOM_TOKEN_MAX_TTL must be at least STOCKROOM_TOKEN_TTL.")
STOCKROOM_TOKEN_ALLOW_NEVER = env.bool("STOCKROOM_TOKEN_ALLOW_NEVER", default=False)


# Throttles of the token endpoints, in DRF's form "N/second|minute|hour|day". Every attempt counts,
# right or wrong: once the address or the user name is over its rate, the right password gets 429 too.
def _rate(name: str, default: str) -> str:
    value = env.str(name, default=default).strip()
    count, _, period = value.partition("/")
    if not (count.isdigit() and int(count) > 0 and period in ("second", "minute", "hour", "day")):
        raise ImproperlyConfigured(f"{name}={value!r}: expected N/second, N/minute, N/hour or N/day, N from 1.")
    return value


STOCKROOM_TOKEN_RATE_ADDRESS = _rate("STOCKROOM_TOKEN_RATE_ADDRESS", "10/minute")
STOCKROOM_TOKEN_RATE_USERNAME = _rate("STOCKROOM_TOKEN_RATE_USERNAME", "10/minute")
STOCKROOM_TOKEN_RATE_CREATE = _rate("STOCKROOM_TOKEN_RATE_CREATE", "30/hour")  # per signed-in user
KNOX_TOKEN_MODEL = "provisioning.AccessToken"
REST_KNOX = {"TOKEN_TTL": STOCKROOM_TOKEN_TTL, "AUTH_HEADER_PREFIX": "Token"}

# Caches. ---------------------------------------------------------------------------------------
# "default" stays Django's per-process memory cache. "shared" is what every gunicorn worker must
# agree on (the token endpoints' throttles): a table in the portal database, so it needs nothing
# more than the database and works from a fresh clone and in tests. Migration 0007 creates the
# table (`manage.py createcachetable` does too, after a change here); the test database gets it
# when Django creates it.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # Django culls a third of the entries past MAX_ENTRIES (300 by default), whichever sort first: a
    # flood of new keys would drop live throttle counts. Expired entries go first, and a refused
    # request writes no new key (ObtainTokenView.check_throttles), so this bound is never reached by
    # counting alone.
    "shared": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "stockroom_cache",
        "OPTIONS": {"MAX_ENTRIES": 100_000},
    },
}
# ------------------------------------------------------------------------------------------------

SPECTACULAR_SETTINGS = {
    "TITLE": "Stockroom API",
    "DESCRIPTION": "Self-service MySQL and Redis instances.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the vendored sidecar package: no CDN, works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Options of the same name whose choices differ by engine (provisioning/options.py tls_option).
    "ENUM_NAME_OVERRIDES": {
        "InstanceStatusEnum": "provisioning.models.Status",
        "MysqlTlsEnum": ["off", "on", "required"],
        "RedisTlsEnum": ["off", "required"],
    },
}

# Celery: a real Redis broker; `make run` starts one on a Unix socket in DATA_DIR/broker (a folder
# only the portal's user may enter; BROKER_PORT puts it on a loopback port instead), with the
# password it wrote to .env. A password in the URL wins over STOCKROOM_BROKER_PASSWORD (Celery's
# broker_password).
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=f"redis+socket://{DATA_DIR / 'broker' / 'redis.sock'}")
CELERY_BROKER_PASSWORD = env.str("STOCKROOM_BROKER_PASSWORD", default="") or None
if CELERY_BROKER_PASSWORD and CELERY_BROKER_URL.startswith("redis+socket:///"):
    # Kombu takes a socket's password from its URL only (it ignores broker_password there). The URL
    # lives in this process's memory; Celery and kombu mask passwords when they print URLs.
    CELERY_BROKER_URL = CELERY_BROKER_URL.replace(
        "redis+socket://", f"redis+socket://:{quote(CELERY_BROKER_PASSWORD, safe='')}@", 1
    )
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_EAGER_PROPAGATES = True
# The most a task may take; Celery kills one that runs longer, and its claim on an instance lapses.
STOCKROOM_TASK_TIME_LIMIT = env.float("STOCKROOM_TASK_TIME_LIMIT", default=900.0)
CELERY_TASK_TIME_LIMIT = STOCKROOM_TASK_TIME_LIMIT
# A broker that accepts connections but does not answer must not hold a web request for long.
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 2}
# A broker that `make run`'s runner is restarting (it died) is back within a second or two: a
# request waits up to about 4 s for it rather than failing the job.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.4, "interval_max": 1.0}
# Webhook deliveries have a queue and a worker pool of their own (`celery worker -Q webhooks`), so
# that slow receivers can hold only those; the default worker consumes the default queue only.
STOCKROOM_WEBHOOK_QUEUE = "webhooks"
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_TASK_ROUTES = {"provisioning.tasks.deliver_webhook": {"queue": STOCKROOM_WEBHOOK_QUEUE}}

# Instances.
_DATA_DIR_DIGEST = hashlib.sha256(str(DATA_DIR).encode()).hexdigest()[:12]


def _instances_dir() -> Path:
    """Where local instances live: DATA_DIR/instances, unless the unprivileged user that
    instance servers run as (when the portal is root) cannot get there, e.g. under /root."""
    default = DATA_DIR / "instances"
    if os.geteuid() != 0 or all(p.stat().st_mode & 0o001 for p in (DATA_DIR, *DATA_DIR.parents)):
        return default
    return Path("/var/lib/stockroom") / _DATA_DIR_DIGEST


STOCKROOM_INSTANCES_DIR = Path(env.str("STOCKROOM_INSTANCES_DIR", default=str(_instances_dir())))
# Labels this portal's containers, so two portals can share a Docker host.
STOCKROOM_PORTAL_ID = env.str("STOCKROOM_PORTAL_ID", default=_DATA_DIR_DIGEST)

# The kinds of instance on offer, each an Engine class (one folder under provisioning/engines/).
STOCKROOM_ENGINES = ["provisioning.engines.mysql.MySQL", "provisioning.engines.redis.Redis"]

# When the portal is root, each local instance runs as uid STOCKROOM_UID_BASE + its id (no account
# needed). The default gives each portal (each DATA_DIR) its own block of 2**20 uids in
# 0x70000000..0x7FF00000, which no account or container range on a Debian host uses; uids are
# claimed host-wide in STOCKROOM_UID_CLAIMS, so two portals can never share one.
_UID_BLOCKS = 255
STOCKROOM_UID_BASE = env.int("STOCKROOM_UID_BASE", default=0x70000000 + int(_DATA_DIR_DIGEST, 16) % _UID_BLOCKS * 2**20)
if not 1000 <= STOCKROOM_UID_BASE < 2**31 - 2**20:
    raise ImproperlyConfigured(f"STOCKROOM_UID_BASE must be within 1000..{2**31 - 2**20 - 1}.")

STOCKROOM_BACKENDS = {
    "local": {
        "BACKEND": "provisioning.backends.local.LocalBackend",
        "OPTIONS": {
            # When the portal runs as root, this user builds shared templates (no instance runs as it).
            "run_as": env.str("STOCKROOM_RUN_AS", default="stockroom"),
            "uid_base": STOCKROOM_UID_BASE,
            "uid_claims": env.str("STOCKROOM_UID_CLAIMS", default="/var/lib/stockroom/uids"),
            "portal_id": STOCKROOM_PORTAL_ID,
            # When the portal is root, each instance runs in its own cgroup, under this parent in
            # each cgroup hierarchy (default /stockroom-<STOCKROOM_PORTAL_ID>), limited to its
            # engine's memory and pids limits.
            "cgroup_parent": env.str("STOCKROOM_CGROUP_PARENT", default=""),
            # Program name an engine asks for -> path; one not named here is looked up on PATH.
            "programs": {
                "mariadbd": env.str("STOCKROOM_MARIADBD", default="/usr/sbin/mariadbd"),
                "mariadb-install-db": env.str("STOCKROOM_MARIADB_INSTALL_DB", default="/usr/bin/mariadb-install-db"),
                "redis-server": env.str("STOCKROOM_REDIS_SERVER", default="/usr/bin/redis-server"),
            },
        },
    },
    "docker": {
        "BACKEND": "provisioning.backends.docker.DockerBackend",
        "OPTIONS": {
            "base_url": env.str("DOCKER_BASE_URL", default="unix:///var/run/docker.sock"),
            "volume_root": env.str("DOCKER_VOLUME_ROOT", default=str(DATA_DIR / "docker")),
            "host_ip": env.str("DOCKER_HOST_IP", default="127.0.0.1"),
            # Kind -> image; a kind not named here runs its engine's default image.
            "images": {
                kind: image
                for kind, image in (
                    ("mysql", env.str("DOCKER_MYSQL_IMAGE", default="")),
                    ("redis", env.str("DOCKER_REDIS_IMAGE", default="")),
                )
                if image
            },
            "network_mode": env.str("DOCKER_NETWORK_MODE", default="bridge"),
            "portal_id": STOCKROOM_PORTAL_ID,
            # Instance <id>'s container runs as uid and gid DOCKER_UID_BASE + <id>, which no host
            # user should have (2e9 lies in the range systemd leaves unused).
            "uid_base": env.int("DOCKER_UID_BASE", default=2_000_000_000),
        },
    },
    # Instances spread over the nodes of a Docker Swarm (provisioning/backends/swarm.py; the README's
    # operator's guide says how to add and retire a node).
    "swarm": {
        "BACKEND": "provisioning.backends.swarm.SwarmBackend",
        "OPTIONS": {
            # A manager's API; instances go on nodes labelled SWARM_NODE_LABEL.
            "manager_url": env.str("SWARM_MANAGER_URL", default="unix:///var/run/docker.sock"),
            # The address the nodes see the portal's connections come from: the only one servers'
            # administrative accounts accept (MySQL's).
            "portal_address": env.str("SWARM_PORTAL_ADDRESS", default=""),
            "node_label": env.str("SWARM_NODE_LABEL", default="stockroom.role=db"),
            # On every node: a folder of root's, made when the node joins (see the README).
            "data_root": env.str("SWARM_DATA_ROOT", default="/var/lib/stockroom-swarm"),
            "images": {
                kind: image
                for kind, image in (
                    ("mysql", env.str("SWARM_MYSQL_IMAGE", default=env.str("DOCKER_MYSQL_IMAGE", default=""))),
                    ("redis", env.str("SWARM_REDIS_IMAGE", default=env.str("DOCKER_REDIS_IMAGE", default=""))),
                )
                if image
            },
            "portal_id": STOCKROOM_PORTAL_ID,
            "uid_base": env.int("DOCKER_UID_BASE", default=2_000_000_000),
        },
    },
}

STOCKROOM_DEFAULT_BACKEND = env.str("STOCKROOM_BACKEND", default="local")
if STOCKROOM_DEFAULT_BACKEND not in STOCKROOM_BACKENDS:
    raise ImproperlyConfigured(
        f"STOCKROOM_BACKEND={STOCKROOM_DEFAULT_BACKEND!r}; choose one of {sorted(STOCKROOM_BACKENDS)}."
    )
# Address servers listen on, and the address shown to users.
STOCKROOM_BIND_ADDRESS = env.str("STOCKROOM_BIND_ADDRESS", default="127.0.0.1")
STOCKROOM_PUBLIC_HOST = env.str("STOCKROOM_PUBLIC_HOST", default="127.0.0.1")
STOCKROOM_PORT_RANGE = tuple(env.list("STOCKROOM_PORT_RANGE", cast=int, default=[20000, 29999]))
if len(STOCKROOM_PORT_RANGE) != 2 or not 1024 <= STOCKROOM_PORT_RANGE[0] <= STOCKROOM_PORT_RANGE[1] <= 65535:
    raise ImproperlyConfigured("STOCKROOM_PORT_RANGE must be 'first,last' within 1024..65535.")
STOCKROOM_QUOTA = env.int("STOCKROOM_QUOTA", default=10)  # instances holding data, per user


def _host_memory() -> int:
    """Bytes of memory this host has (MemTotal)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_size(name: str, default: str) -> int:
    """Bytes from a size such as "16gb" (the units of Redis-style options), or "NN%" of the host's memory."""
    from provisioning.options import OptionError, parse_size  # no Django in it: safe while settings load

    value = env.str(name, default=default).strip()
    try:
        if value.endswith("%"):
            size = _host_memory() * float(value[:-1]) // 100
        else:
            size = parse_size(value)
    except (OptionError, ValueError):
        raise ImproperlyConfigured(f"{name}={value!r}: expected a size such as '16gb' or a share like '75%'.") from None
    if size <= 0:
        raise ImproperlyConfigured(f"{name}={value!r} leaves no memory for any instance.")
    return int(size)


# Memory is counted in the reservations of instances that run or may run (see services/capacity.py):
# all of them together within the host's budget, each user's within their quota.
STOCKROOM_MEMORY_BUDGET = _memory_size("STOCKROOM_MEMORY_BUDGET", "75%")
STOCKROOM_MEMORY_QUOTA = _memory_size("STOCKROOM_MEMORY_QUOTA", "4gb")
# Bytes each user's snapshots may take together; a snapshot asked for beyond it is refused (403).
STOCKROOM_SNAPSHOT_QUOTA_BYTES = _memory_size("STOCKROOM_SNAPSHOT_QUOTA_BYTES", "10gb")
# The most bytes an uploaded file (an import, a clone from a file) may take; a larger one is refused (413).
STOCKROOM_IMPORT_MAX_BYTES = _memory_size("STOCKROOM_IMPORT_MAX_BYTES", "1gb")
# The disk limit of an instance whose options name none: bytes its data (and server log) may take.
STOCKROOM_DEFAULT_DISK = env.int("STOCKROOM_DEFAULT_DISK", default=1024**3)
# The warm pool (README, "Warm pool"): servers of each kind started ahead of time on the default
# backend, with no tenant, so that a create is running within its request. 0 turns a kind's off.
_POOL_SIZE = 2 if STOCKROOM_DEFAULT_BACKEND == "local" else 0
STOCKROOM_POOL = {
    "mysql": env.int("STOCKROOM_POOL_MYSQL", default=_POOL_SIZE),
    "redis": env.int("STOCKROOM_POOL_REDIS", default=_POOL_SIZE),
}
if any(size < 0 for size in STOCKROOM_POOL.values()):
    raise ImproperlyConfigured("STOCKROOM_POOL_MYSQL and STOCKROOM_POOL_REDIS are counts of servers: 0 or more.")
# `POST …/instances?wait=N` waits at most this long, and at most this many requests of each web
# process wait at once (the others are answered 202 at once): a wait never holds every thread.
STOCKROOM_MAX_WAIT = env.float("STOCKROOM_MAX_WAIT", default=60.0)
STOCKROOM_WAITING_REQUESTS = env.int("STOCKROOM_WAITING_REQUESTS", default=2)
STOCKROOM_START_TIMEOUT = env.float("STOCKROOM_START_TIMEOUT", default=30.0)
# How long a worker may hold an instance before another may take over (it died, say).
STOCKROOM_CLAIM_SECONDS = env.float("STOCKROOM_CLAIM_SECONDS", default=STOCKROOM_START_TIMEOUT * 2 + 30)

# Health: the reconciler compares what should be with what is, every interval.
STOCKROOM_RECONCILE_INTERVAL = env.float("STOCKROOM_RECONCILE_INTERVAL", default=10.0)
STOCKROOM_PROBE_TIMEOUT = env.float("STOCKROOM_PROBE_TIMEOUT", default=2.0)
STOCKROOM_PROBE_CONCURRENCY = env.int("STOCKROOM_PROBE_CONCURRENCY", default=32)
STOCKROOM_MAX_RESTARTS = env.int("STOCKROOM_MAX_RESTARTS", default=5)
STOCKROOM_RESTART_BACKOFF = env.float("STOCKROOM_RESTART_BACKOFF", default=2.0)  # doubles per attempt
STOCKROOM_RESTART_BACKOFF_MAX = env.float("STOCKROOM_RESTART_BACKOFF_MAX", default=300.0)
# An instance that stays up this long after a restart starts counting restarts from zero again.
STOCKROOM_STABLE_SECONDS = env.float("STOCKROOM_STABLE_SECONDS", default=600.0)
STOCKROOM_STUCK_TIMEOUT = env.float("STOCKROOM_STUCK_TIMEOUT", default=120.0)
STOCKROOM_ORPHAN_GRACE = env.float("STOCKROOM_ORPHAN_GRACE", default=300.0)


# Throwaway instances (README, "Expiry"): an instance made without expires_in or expires_at expires
# this long after its create ("2h", "7d"; empty: never); instance.expiring is sent this long ahead.
def _instance_duration(name: str, default: str, *, empty_is_never: bool):
    from provisioning.durations import parse_duration  # no Django in it: safe while settings load

    text = env.str(name, default=default).strip()
    if not text and empty_is_never:
        return None
    try:
        duration = parse_duration(text)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None
    if duration is None and not empty_is_never:
        raise ImproperlyConfigured(f"{name} is a duration, not 'never'.")
    return duration


STOCKROOM_DEFAULT_TTL = _instance_duration("STOCKROOM_DEFAULT_TTL", "", empty_is_never=True)
STOCKROOM_EXPIRY_WARNING = _instance_duration("STOCKROOM_EXPIRY_WARNING", "1h", empty_is_never=False)
STOCKROOM_WEBHOOK_LIMIT = env.int("STOCKROOM_WEBHOOK_LIMIT", default=10)  # per user
# Wall-clock seconds for a whole delivery attempt: DNS, connect, TLS, sending and the answer.
STOCKROOM_WEBHOOK_DEADLINE = env.float("STOCKROOM_WEBHOOK_DEADLINE", default=10.0)
if not 0 < STOCKROOM_WEBHOOK_DEADLINE <= 300:
    raise ImproperlyConfigured("STOCKROOM_WEBHOOK_DEADLINE must be more than 0 and at most 300 seconds.")
# A backstop only: an attempt ends by its deadline; one stuck elsewhere (a locked database) is killed.
CELERY_TASK_ANNOTATIONS = {"provisioning.tasks.deliver_webhook": {"time_limit": STOCKROOM_WEBHOOK_DEADLINE + 60}}
STOCKROOM_WEBHOOK_ATTEMPTS = env.int("STOCKROOM_WEBHOOK_ATTEMPTS", default=6)
STOCKROOM_WEBHOOK_BACKOFF = env.float("STOCKROOM_WEBHOOK_BACKOFF", default=10.0)  # doubles per attempt
# Allow webhook URLs on loopback and private networks (a portal for one private network).
STOCKROOM_WEBHOOK_ALLOW_PRIVATE = env.bool("STOCKROOM_WEBHOOK_ALLOW_PRIVATE", default=False)
CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "provisioning.tasks.reconcile",
        "schedule": STOCKROOM_RECONCILE_INTERVAL,
        "options": {"expires": STOCKROOM_RECONCILE_INTERVAL},  # a late pass is dropped, not queued up
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "provisioning": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    },
}
