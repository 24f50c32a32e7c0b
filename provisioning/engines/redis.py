import hashlib
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..options import Option
from .base import Engine

USERNAME = "default"
ADMIN_USERNAME = "stockroom"
POLICIES = (
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
)
MiB = 1024 * 1024
NO_RETRY = Retry(NoBackoff(), 0)


def acl_password_hash(password: str) -> str:
    """The `#<sha256>` form of an ACL password: the plaintext never reaches the disk."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


ADMIN_TIMEOUT = 10  # seconds; an administrative command that takes longer has failed


class Redis(Engine):
    kind = "redis"
    label = "Redis"
    connection_fields = {
        "host": str,
        "port": int,
        "password": str,
        "maxmemory": int,
        "maxmemory_policy": str,
        "maxclients": int,
        "appendfsync": str,
        "uri": str,
    }
    config_template = "provisioning/engines/redis.conf"
    config_name = "redis.conf"
    options = (
        Option(
            "maxmemory",
            "Memory limit",
            "Bytes, or a size such as '256mb' (units: b, kb, mb, gb).",
            kind="size",
            default=64 * MiB,
            min_value=1 * MiB,
            max_value=4096 * MiB,
        ),
        Option(
            "maxmemory_policy",
            "Eviction policy",
            "What Redis does when the memory limit is reached.",
            kind="choice",
            default="noeviction",
            choices=POLICIES,
        ),
        Option(
            "maxclients",
            "Maximum clients",
            "Connections accepted at once.",
            kind="int",
            default=1000,
            min_value=1,
            max_value=10000,
        ),
        Option(
            "appendfsync",
            "Append-only fsync",
            "The append-only file is always on; this sets how often it is flushed to disk.",
            kind="choice",
            default="everysec",
            choices=("always", "everysec", "no"),
        ),
    )

    def memory_limit(self, options: dict[str, Any]) -> int:
        # Data up to maxmemory, plus fragmentation and the copy-on-write of an AOF rewrite.
        return options["maxmemory"] + options["maxmemory"] // 2 + 64 * MiB

    def acl_lines(self, instance, password: str) -> str:
        """The user may do anything to data but not administer the server; the portal may."""
        return (
            f"user {USERNAME} on {acl_password_hash(password)} ~* &* +@all -@admin +config|get\n"
            f"user {ADMIN_USERNAME} on {acl_password_hash(instance.admin_password)} ~* &* +@all\n"
        )

    def reload_acl(self, instance, *, host: str, port: int) -> None:
        """Make the server read its ACL file again, as the portal's own user."""
        admin = redis.Redis(
            host=host,
            port=port,
            username=ADMIN_USERNAME,
            password=instance.admin_password,
            retry=NO_RETRY,
            socket_timeout=ADMIN_TIMEOUT,
        )
        try:
            admin.execute_command("ACL", "LOAD")
        finally:
            admin.close()

    def check_login(self, instance, *, host: str, port: int, timeout: float) -> None:
        client = redis.Redis(
            host=host,
            port=port,
            username=instance.username,
            password=instance.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=NO_RETRY,  # the caller decides whether and when to try again
        )
        try:
            client.ping()
        finally:
            client.close()

    def connection(self, instance) -> dict[str, Any]:
        return {
            "host": instance.host,
            "port": instance.port,
            "password": instance.password,
            **{option.name: instance.options[option.name] for option in self.options},
            "uri": f"redis://{instance.username}:{instance.password}@{instance.host}:{instance.port}/0",
        }

    def snippets(self, connection: dict[str, Any]) -> list[tuple[str, str]]:
        uri = connection["uri"]
        return [
            ("URI", uri),
            ("CLI", f"redis-cli -u {uri}"),
            ("Python", f'import redis\nr = redis.Redis.from_url("{uri}")'),
        ]
