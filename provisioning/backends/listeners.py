"""Who listens on a TCP port, as Linux's /proc tells it.

The portal sends a password over TCP only once it has seen that the socket listening on the
instance's port belongs to the instance: while a server is down, anyone on the host may listen on
its port and wait for a login. /proc/net/tcp and tcp6 list the sockets of the portal's network
namespace with their inodes; /proc/<pid>/fd shows which sockets a process holds.
"""

import ipaddress
import os
import struct
from collections.abc import Iterable
from pathlib import Path

LISTEN = "0A"  # the TCP state's number in /proc/net/tcp
PROC = Path("/proc")


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} prints it: each 8-digit group is a 32-bit word of the address
    that the kernel printed from memory, so in the host's byte order."""
    words = (int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8))
    return ipaddress.ip_address(b"".join(struct.pack("=I", word) for word in words))


def listening_sockets(address: str, port: int) -> dict[int, int]:
    """The listening sockets that a connection to `address`:`port` could reach, as {inode: uid of
    their owner}: bound to that address, to the wildcard of its family, or (for IPv4) to the
    address or wildcard of IPv6, which a dual-stack socket also serves."""
    target = ipaddress.ip_address(address)
    reach: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {target}
    if target.version == 4:
        reach |= {
            ipaddress.ip_address("0.0.0.0"),
            ipaddress.ip_address("::"),
            ipaddress.ip_address(f"::ffff:{target}"),
        }
    else:
        reach.add(ipaddress.ip_address("::"))
    found = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 on this host
            continue
        for line in lines:
            fields = line.split()
            local, state, uid, inode = fields[1], fields[3], int(fields[7]), int(fields[9])
            hex_address, hex_port = local.split(":")
            if state == LISTEN and int(hex_port, 16) == port and _address(hex_address) in reach:
                found[inode] = uid
    return found


def listening_inodes(address: str, port: int) -> set[int]:
    """Inodes of the sockets listening where a connection to `address`:`port` goes (see listening_sockets)."""
    return set(listening_sockets(address, port))


def sockets_held_by(pids: Iterable[int]) -> set[int] | None:
    """Inodes of the sockets the processes `pids` hold open (those gone are skipped); None if the
    descriptors of one cannot be read: another user's process, to a portal that is not root."""
    inodes = set()
    for pid in pids:
        try:
            descriptors = os.listdir(PROC / str(pid) / "fd")
        except PermissionError:
            return None
        except OSError:  # gone
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(PROC / str(pid) / "fd" / descriptor)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def owners(pids: Iterable[int]) -> set[int]:
    """The effective and filesystem uids the processes `pids` run as (anyone may read them)."""
    uids = set()
    for pid in pids:
        try:
            status = (PROC / str(pid) / "status").read_text()
        except OSError:  # gone
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                _, _, effective, _, filesystem = line.split()
                uids |= {int(effective), int(filesystem)}
    return uids


def only_held_by(address: str, port: int, pids: Iterable[int]) -> bool:
    """Whether something listens on `address`:`port` and every socket that listens there (or on a
    wildcard that would also take the connection) is held by one of `pids`.

    A portal that is not root cannot see which sockets another user's processes hold (a container's
    server, the root docker-proxy); then every listener must at least belong to a user they run as.
    """
    pids = list(pids)
    sockets = listening_sockets(address, port)
    if not sockets:
        return False
    held = sockets_held_by(pids)
    if held is not None:
        return set(sockets) <= held
    uids = owners(pids)
    return bool(uids) and set(sockets.values()) <= uids
