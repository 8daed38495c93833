"""What the two local web servers (`rlhflab label`, `rlhflab sim`) share.

Its one job: decide whether a host name or address is this machine (loopback), the
rule both servers use to refuse listening to the network without a token.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses: 127.x.x.x, ::1, their bracketed
    forms ('[::1]') and IPv4-mapped IPv6 ('::ffff:127.0.0.1'). False for anything else,
    an unparsable name included."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
