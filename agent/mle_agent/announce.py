"""mDNS announcement of the agent: service `_mle-agent._tcp.local.` with its facts in TXT.

TXT keys: `proto` (v1), `ver`, `arch`, `os`, `rt` (runtimes, comma-separated), `labels`
(k=v,k=v), `fp` (sha256 fingerprint of the TLS certificate, empty without TLS) and `name`.
zeroconf is imported here only, and only when the agent announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import platform
import re
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from mle_agent.settings import AgentSettings, split_listen
from mle_proto import PROTO_VERSION, __version__

if TYPE_CHECKING:
    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

__all__ = [
    "SERVICE_TYPE",
    "announced",
    "certificate_fingerprint",
    "interface_choice",
    "should_announce",
    "txt_record",
]

SERVICE_TYPE = "_mle-agent._tcp.local."
_TXT_VALUE_MAX = 255  # one DNS character-string
_INSTANCE_MAX = 63  # bytes in a DNS label
_HOST_SAFE = re.compile(r"[^A-Za-z0-9-]+")

log = logging.getLogger(__name__)


def should_announce(settings: AgentSettings) -> bool:
    """Announce when asked to, or when the agent listens beyond loopback."""
    return settings.announce or not settings.is_loopback()


def txt_record(settings: AgentSettings, fingerprint: str = "") -> dict[str, str]:
    """The TXT properties of this agent (values cut to one DNS string)."""
    from mle_agent.facts import os_description, runtimes

    labels = ",".join(f"{k}={v}" for k, v in settings.labels.items())
    if len(labels.encode()) > _TXT_VALUE_MAX:
        log.warning("labels are too long for mDNS (255 bytes); announcing them cut")
    record = {
        "proto": PROTO_VERSION,
        "ver": __version__,
        "arch": platform.machine(),
        "os": os_description(),
        "rt": ",".join(runtimes()),
        "labels": labels,
        "fp": fingerprint,
        "name": settings.name,
    }
    return {key: _cut(value) for key, value in record.items()}


def certificate_fingerprint(settings: AgentSettings) -> str:
    """`sha256:<hex>` of the agent's certificate (DER), or "" without TLS."""
    if settings.tls_cert is None:
        return ""
    try:
        der = ssl.PEM_cert_to_DER_cert(settings.tls_cert.read_text(encoding="ascii"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s for its fingerprint: %s", settings.tls_cert, exc)
        return ""
    return f"sha256:{hashlib.sha256(der).hexdigest()}"


def interface_choice(setting: str) -> list[str] | None:
    """The IPs zeroconf binds to: None for all interfaces, else the listed addresses."""
    addresses = [part.strip() for part in setting.split(",") if part.strip()]
    if not addresses or addresses == ["all"]:
        return None
    return addresses


@contextlib.asynccontextmanager
async def announced(settings: AgentSettings, port: int) -> AsyncIterator[None]:
    """Announce the agent while the block runs (when it should); withdraw it on exit."""
    if not should_announce(settings):
        yield
        return
    interfaces = interface_choice(settings.announce_interfaces)
    zc = _open_zeroconf(interfaces)
    if zc is None:
        yield
        return
    info = _service_info(settings, port, interfaces)
    registering = asyncio.create_task(_register(zc, info))
    try:
        yield
    finally:
        await _withdraw(zc, info, registering)


def _open_zeroconf(interfaces: list[str] | None) -> AsyncZeroconf | None:
    """Zeroconf bound to the interfaces; None (and a warning) when it cannot be.

    An address that is not (or no longer) on this host is a warning, not an exit: the agent is
    already listening, and announcing is best effort, like every other mDNS failure here.
    """
    from zeroconf.asyncio import AsyncZeroconf

    here = _host_ips() if interfaces else set()
    missing = [a for a in interfaces or [] if _bare(a) not in here]
    if missing:
        log.warning(
            "not announcing on mDNS: %s (announce_interfaces) is not an address of this host",
            missing[0],
        )
        return None
    try:
        return AsyncZeroconf(**_zeroconf_options(interfaces))
    except OSError as exc:
        log.warning("not announcing on mDNS: cannot open its sockets: %s", exc.strerror or exc)
        return None


def _host_ips() -> set[str]:
    """Every address of this host's interfaces, IPv4 and IPv6, without IPv6 scopes."""
    return {_bare(address) for address in _interface_ips()}


def _interface_ips() -> list[str]:
    """The addresses of this host's interfaces as ifaddr lists them (IPv6 ones from its tuple)."""
    import ifaddr

    return [
        ip.ip if isinstance(ip.ip, str) else ip.ip[0]
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
    ]


def _bare(address: str) -> str:
    """The address in canonical form, an IPv6 scope (`%eth0`) dropped."""
    return str(ipaddress.ip_address(address.partition("%")[0]))


def _zeroconf_options(interfaces: list[str] | None) -> dict[str, Any]:
    """IPv4 only unless an IPv6 interface is named (IPv6 multicast is often not routed)."""
    from zeroconf import InterfaceChoice, IPVersion

    if interfaces is None:
        return {"interfaces": InterfaceChoice.All, "ip_version": IPVersion.V4Only}
    v6 = any(":" in address for address in interfaces)
    return {"interfaces": interfaces, "ip_version": IPVersion.All if v6 else IPVersion.V4Only}


def _service_info(settings: AgentSettings, port: int, interfaces: list[str] | None) -> ServiceInfo:
    from zeroconf import ServiceInfo

    instance = _instance_name(settings.name)
    host = _HOST_SAFE.sub("-", instance).strip("-") or "mle-agent"
    return ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=port,
        parsed_addresses=_addresses(settings, interfaces),
        properties=txt_record(settings, certificate_fingerprint(settings)),
        server=f"{host}.local.",
    )


async def _register(zc: AsyncZeroconf, info: ServiceInfo) -> bool:
    """Register, then wait out the announcements; failures are logged, never fatal."""
    try:
        broadcast = await zc.async_register_service(info)
    except Exception as exc:  # noqa: BLE001 - announcing is best effort; the agent serves on
        log.warning("cannot announce on mDNS (%s): %s", type(exc).__name__, exc)
        return False
    await broadcast
    log.info("announced on mDNS as %s", info.name)
    return True


async def _withdraw(zc: AsyncZeroconf, info: ServiceInfo, registering: asyncio.Task[bool]) -> None:
    """Say goodbye (when registered) and close zeroconf."""
    registering.cancel()
    registered = False
    with contextlib.suppress(asyncio.CancelledError):
        registered = await registering
    try:
        if registered:  # the goodbye is sent by the task the first await returns
            goodbye = await zc.async_unregister_service(info)
            await goodbye
    except Exception as exc:  # noqa: BLE001 - closing must happen whatever the goodbye did
        log.debug("mDNS goodbye failed: %s", exc)
    finally:
        await zc.async_close()


def _addresses(settings: AgentSettings, interfaces: list[str] | None) -> list[str]:
    """The listen address when specific, else this host's addresses on the chosen interfaces."""
    host, _ = split_listen(settings.listen)
    try:
        if not ipaddress.ip_address(host).is_unspecified:
            return [host]
    except ValueError:
        pass  # a host name: advertise the interface addresses instead
    if interfaces is not None:
        return interfaces
    return _host_addresses()


def _host_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces, loopback last (only when there is nothing else)."""
    found = [a for a in _interface_ips() if ipaddress.ip_address(_bare(a)).version == 4]
    outside = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return outside or found or ["127.0.0.1"]


def _instance_name(name: str) -> str:
    """The agent name cut to one DNS label (the full name travels in TXT `name`)."""
    data = name.encode()
    if len(data) <= _INSTANCE_MAX:
        return name
    return data[:_INSTANCE_MAX].decode(errors="ignore")


def _cut(value: str) -> str:
    return value.encode()[:_TXT_VALUE_MAX].decode(errors="ignore")
