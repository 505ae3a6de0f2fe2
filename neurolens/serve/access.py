"""Who may use the web app: the token in force, the Host names it answers, and the token cookie's name.

- 127.0.0.1 / localhost / ::1 are served without a token unless --require-token (on a shared machine every
  local user can reach a loopback port: then a token is generated, as for any other --host, or given with
  --token). Any other --host needs a token unless --no-token (with a warning).
- Without a token the Host check is always on (DNS-rebinding guard): a request must name a literal IP
  address (a rebinding page can only send its own domain name), a loopback name, the --host name, or a name
  given with --allow-host. With a token it is on only when --allow-host names some (a rebinding page has no
  token, and the cookie is bound to the name the user opened).
- The token cookie is named after the port (`neurolens_token_<port>`): cookies are shared by every port of a
  host, so two servers on one machine must not overwrite each other's.
"""
from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence

from ..errors import NeurolensError

COOKIE = "neurolens_token"
# hosts served without a token: the default and its usual spellings. Any other --host needs one, and so does
# any host with --require-token (a shared machine: every local user can reach a loopback port).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


@dataclass
class Access:
    token: Optional[str]
    warning: Optional[str] = None
    # Host header names the server answers (and any literal IP address: host_allowed); None: any name
    allowed_hosts: Optional[FrozenSet[str]] = None


def access_for(host: str, token: Optional[str] = None, no_token: bool = False, require_token: bool = False,
               allow_hosts: Sequence[str] = ()) -> Access:
    """The token in force for `host` and the Host names it answers (module rule), or an error for a
    contradictory request. Without a token the Host check is always on: loopback names, the --host name and
    `allow_hosts`; with a token it is on only when `allow_hosts` names some."""
    if token is not None and no_token:
        raise NeurolensError("--token and --no-token contradict each other; pass one of them")
    if require_token and no_token:
        raise NeurolensError("--require-token and --no-token contradict each other; pass one of them")
    extra = []
    for name in allow_hosts:
        if not HOST_NAME.match(str(name)):
            raise NeurolensError(f"--allow-host {name!r} is not a host name; give a name such as gpu01.lab "
                                 f"(letters, digits, '.' and '-')")
        extra.append(str(name).lower())
    names = frozenset(LOOPBACK_NAMES) | frozenset(extra) | \
        (frozenset([host.lower()]) if host not in WILDCARD_HOSTS else frozenset())
    if token is not None:
        if len(token) < 8 or not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
            raise NeurolensError("--token must be at least 8 characters from A-Z a-z 0-9 . _ ~ - (it travels in "
                                 "URLs and cookies)")
        return Access(token, allowed_hosts=names if extra else None)
    if host in LOCAL_HOSTS and not require_token:
        return Access(None, allowed_hosts=names)
    if no_token:
        return Access(None, allowed_hosts=names,
                      warning=f"warning: serving on {host} without a token (--no-token): anyone who can reach this "
                              f"address can browse the cache and reveal raw images (requests must name an IP "
                              f"address{', ' + ', '.join(extra) if extra else ''} or a loopback name; "
                              f"--allow-host NAME adds a name)")
    return Access(secrets.token_urlsafe(24), allowed_hosts=names if extra else None)


def cookie_name(port: int) -> str:
    """The token cookie of the server on `port` (module docstring)."""
    return f"{COOKIE}_{int(port)}"


def host_allowed(host: str, allowed: FrozenSet[str]) -> bool:
    """A Host header naming a literal IP address (a DNS-rebinding page can only send its own domain name) or
    one of the allowed names."""
    name = hostname(host)
    if name in allowed:
        return True
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def hostname(host: str) -> str:
    """The name in a Host header (without the port), lower-cased; IPv6 addresses keep their brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
