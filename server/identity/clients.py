"""Who is at the other end: the client address that audit events and login throttles key on.

The TCP peer is the client unless it is one of the configured reverse proxies (`network.trusted_proxies`,
none by default). Only then is the configured forwarding header (`X-Forwarded-For` or `Forwarded`) read,
and from the right: each trusted proxy appends the address it received the connection from, so the
right-most hop that is not itself a trusted proxy is the first address nobody we trust could have made up.
Everything to its left was written by the client and is ignored. A hop that is not an IP address stops the
walk at the nearest trusted one.

The result is a `ClientAddress`: a `str` (the effective address) that also carries the TCP peer, so audit
events record both wherever an address is passed on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from starlette.datastructures import Headers

from server.audit.service import Actor

_MAX_HOPS = 32
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress(str):
    """The effective client address (what lockout and audit key on), carrying the TCP `peer` it came from."""

    peer: str | None

    def __new__(cls, address: str, peer: str | None) -> ClientAddress:
        value = super().__new__(cls, address)
        value.peer = peer
        return value


def peer_of(address: str | None) -> str | None:
    """The TCP peer behind an address: its own `peer` for a ClientAddress, else the address itself."""
    return address.peer if isinstance(address, ClientAddress) else address


def anonymous_actor(address: str | None) -> Actor:
    """The audit actor of a caller that has not authenticated."""
    return Actor(type="anonymous", client_addr=_plain(address), peer_addr=peer_of(address))


def _plain(address: str | None) -> str | None:
    return None if address is None else str.__str__(address)


def _ip(value: str) -> str | None:
    """A canonical IP from one hop: `198.51.100.1`, `198.51.100.1:443`, `2001:db8::1`, `[2001:db8::1]:443`."""
    value = value.strip().strip('"').strip()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # IPv4 with a port (a bare IPv6 address has at least two colons)
        value = value.partition(":")[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _forwarded_for(values: Iterable[str]) -> list[str]:
    """The `for=` parameters of RFC 7239 `Forwarded` header values, in order (`unknown` or obfuscated stays)."""
    hops = []
    for value in values:
        for element in value.split(","):
            found = "unknown"
            for pair in element.split(";"):
                name, _, raw = pair.strip().partition("=")
                if name.strip().lower() == "for":
                    found = raw
            hops.append(found)
    return hops


class ProxyTrust:
    """Resolves client addresses, believing forwarding headers only from `trusted` proxies."""

    def __init__(self, trusted: Sequence[str], header: str = "x-forwarded-for") -> None:
        self._networks: list[Network] = [ipaddress.ip_network(t, strict=False) for t in trusted]
        self._header = header

    def trusts(self, address: str | None) -> bool:
        if address is None or not self._networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def resolve(self, peer: str | None, headers: Headers) -> ClientAddress | None:
        if peer is None:
            return None
        if not self.trusts(peer):
            return ClientAddress(peer, peer)
        values = headers.getlist(self._header)
        if self._header == "forwarded":
            hops = _forwarded_for(values)
        else:
            hops = [hop for value in values for hop in value.split(",")]
        client = peer
        for hop in list(reversed(hops))[:_MAX_HOPS]:
            address = _ip(hop)
            if address is None:
                break  # garbage where a trusted proxy should have written: keep the nearest trusted hop
            client = address
            if not self.trusts(address):
                break
        return ClientAddress(client, peer)
