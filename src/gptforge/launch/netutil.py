"""Network-interface helpers for launch and doctor (Linux; namespace-correct: ioctl/netlink, not /sys)."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import shutil
import socket
import struct
import subprocess
import threading

from gptforge.errors import UserError

_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP, _IFF_RUNNING, _IFF_LOOPBACK = 0x1, 0x40, 0x8


def interfaces() -> list[str]:
    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        return []


def _ioctl(name: str, req: int) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            return fcntl.ioctl(s.fileno(), req, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None


def iface_flags(name: str) -> int:
    r = _ioctl(name, _SIOCGIFFLAGS)
    return struct.unpack("H", r[16:18])[0] if r else 0


def iface_is_up(name: str) -> bool:
    return bool(iface_flags(name) & _IFF_UP)


def iface_addresses(name: str) -> list[str]:
    """IPv4 addresses of ``name`` (all of them via `ip -j`, else the primary one via ioctl)."""
    if shutil.which("ip"):
        try:
            out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", name], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return [a["local"] for link in json.loads(out.stdout) for a in link.get("addr_info", [])
                        if a.get("family") == "inet"]
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    r = _ioctl(name, _SIOCGIFADDR)
    return [socket.inet_ntoa(r[20:24])] if r else []


def iface_address(name: str) -> str | None:
    addrs = iface_addresses(name)
    return addrs[0] if addrs else None


def describe_interfaces() -> str:
    parts = []
    for n in interfaces():
        addrs = iface_addresses(n)
        state = "up" if iface_is_up(n) else "down"
        parts.append(f"{n} ({', '.join(addrs) or 'no IPv4'}, {state})")
    return ", ".join(parts) or "none"


def require_iface(name: str) -> str:
    """Check ``name`` exists and has an IPv4 address; return that address, else a UserError naming the others."""
    if name not in interfaces():
        raise UserError(f"network interface '{name}' does not exist on this node; available: "
                        f"{describe_interfaces()} (pass --iface with the one on the network the nodes share)")
    addr = iface_address(name)
    if not addr:
        raise UserError(f"network interface '{name}' has no IPv4 address; give it one or pick another --iface "
                        f"(available: {describe_interfaces()})")
    return addr


def local_addresses() -> set[str]:
    out = {"127.0.0.1"}
    for n in interfaces():
        out.update(iface_addresses(n))
    return out


RESOLVE_TIMEOUT_S = 10.0


def resolve(host: str, timeout: float = RESOLVE_TIMEOUT_S) -> str:
    """host -> IPv4 address within `timeout` seconds (a slow DNS lookup runs in a daemon thread), else a
    one-line UserError naming --master-addr."""
    try:
        ipaddress.IPv4Address(host)
        return host
    except ValueError:
        pass
    result: dict = {}

    def lookup() -> None:
        try:
            result["ip"] = socket.gethostbyname(host)
        except (OSError, UnicodeError) as e:
            result["error"] = e

    t = threading.Thread(target=lookup, daemon=True, name="resolve-master")
    t.start()
    t.join(timeout)
    if "ip" in result:
        return result["ip"]
    why = result.get("error") or f"no answer from DNS within {timeout:.0f} s"
    raise UserError(f"cannot resolve --master-addr '{host}' ({why}); use node 0's IP address or fix DNS / "
                    "/etc/hosts") from None


def is_local(host: str) -> bool:
    try:
        ip = resolve(host)
    except UserError:
        return False
    return ip in local_addresses() or ipaddress.ip_address(ip).is_loopback


def source_address_for(dest: str) -> str | None:
    """The local address the kernel would use to reach ``dest`` (a UDP connect: no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((resolve(dest), 9))
            return s.getsockname()[0]
    except (OSError, UserError):
        return None


def iface_of_address(addr: str) -> str | None:
    for n in interfaces():
        if addr in iface_addresses(n):
            return n
    return None


def route_iface(dest: str) -> tuple[str | None, str | None]:
    """(interface, source address) the kernel routes ``dest`` through."""
    src = source_address_for(dest)
    return (iface_of_address(src) if src else None), src


def probe_tcp(host: str, port: int, timeout: float) -> tuple[str, str]:
    """Try one TCP connect. Returns (kind, detail) with kind in ok/refused/timeout/unreachable/error."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "ok", "connected"
    except socket.timeout:
        return "timeout", f"no answer within {timeout:.0f} s"
    except ConnectionRefusedError:
        return "refused", "connection refused"
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
            return "unreachable", e.strerror or str(e)
        if e.errno == errno.ETIMEDOUT:
            return "timeout", e.strerror or str(e)
        return "error", str(e)


def port_free(addr: str, port: int) -> tuple[bool, str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
            return True, ""
        except OSError as e:
            return False, e.strerror or str(e)
