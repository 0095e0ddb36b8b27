"""LAN discovery over mDNS / DNS-SD: the daemon advertises ``_llmosd._tcp.local.``; clients browse for it."""

from llmosd.discovery.txt import SERVICE_TYPE, Appliance

__all__ = ["SERVICE_TYPE", "Appliance"]
