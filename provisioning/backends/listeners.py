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


def listening_inodes(address: str, port: int) -> set[int]:
    """Inodes of the listening sockets that a connection to `address`:`port` could reach: bound to
    that address, to the wildcard of its family, or (for IPv4) to the address or wildcard of IPv6,
    which a dual-stack socket also serves."""
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
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 on this host
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            hex_address, hex_port = local.split(":")
            if state == LISTEN and int(hex_port, 16) == port and _address(hex_address) in reach:
                found.add(inode)
    return found


def sockets_held_by(pids: Iterable[int]) -> set[int]:
    """Inodes of the sockets the processes `pids` hold open (those gone or not ours to read are skipped)."""
    inodes = set()
    for pid in pids:
        try:
            descriptors = os.listdir(PROC / str(pid) / "fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(PROC / str(pid) / "fd" / descriptor)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def only_held_by(address: str, port: int, pids: Iterable[int]) -> bool:
    """Whether something listens on `address`:`port` and every socket that listens there (or on a
    wildcard that would also take the connection) is held by one of `pids`."""
    inodes = listening_inodes(address, port)
    return bool(inodes) and inodes <= sockets_held_by(pids)
