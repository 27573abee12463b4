"""A node with pods, in namespaces made here: the node's pods come and go as veth pairs.

Routed like Calico: a pod's host-side veth (``veth<hex>`` in the node) has no address of its
own; the node routes the pod's /32 to it, and the pod's default route points at the node's
uplink address, which the node answers ARP for on any interface. The node may have an
*uplink* (a veth with an address, toward a client namespace, which routes the pods' range
through the node), forwarding between them.
"""

from __future__ import annotations

import uuid

from lab.netns import NetNS, sh

__all__ = ["POD_NET", "Node", "Pod"]

#: Pods get addresses from here; the node's uplink is UPLINK_NODE, the client UPLINK_CLIENT.
POD_NET = "10.60.0.0/16"
UPLINK_NODE, UPLINK_CLIENT = "10.55.0.1", "10.55.0.2"


class Pod:
    """A pod: a namespace whose ``eth0`` is the peer of ``node.veth`` (``veth<hex>``)."""

    def __init__(self, node: NetNS, ip: str, gateway: str = UPLINK_NODE) -> None:
        self.ip = ip
        self.ns = NetNS("mirpod").__enter__()
        self.veth = f"veth{uuid.uuid4().hex[:8]}"
        try:
            sh("ip", "link", "add", self.veth, "netns", node.name, "type", "veth", "peer",
               "name", "eth0", "netns", self.ns.name)
            self.ns.run("ip", "addr", "add", f"{ip}/32", "dev", "eth0")
            self.ns.run("ip", "link", "set", "eth0", "up")
            self.ns.run("ip", "route", "add", gateway, "dev", "eth0", "scope", "link")
            self.ns.run("ip", "route", "add", "default", "via", gateway, "dev", "eth0")
            node.run("ip", "link", "set", self.veth, "up")
            node.run("ip", "route", "add", f"{ip}/32", "dev", self.veth)
        except BaseException:
            self.ns.close()
            raise

    def delete(self) -> None:
        """Stop its processes and delete its namespace (the veth pair goes with it)."""
        self.ns.close()


class Node:
    """``with Node(uplink=True) as node:``: a node namespace forwarding IPv4 and, with
    ``uplink``, a client namespace behind the uplink veth ``node.uplink``."""

    def __init__(self, uplink: bool = False) -> None:
        self.ns = NetNS("mirnode")
        self.client: NetNS | None = NetNS("mirclient") if uplink else None
        self.uplink = ""

    def __enter__(self) -> Node:
        self.ns.__enter__()
        try:
            self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            if self.client is not None:
                self.client.__enter__()
                self.ns.veth_to(self.client, f"{UPLINK_NODE}/24", f"{UPLINK_CLIENT}/24")
                self.uplink = self.ns.veth
                self.client.run("ip", "route", "add", POD_NET, "via", UPLINK_NODE)
            else:  # the pods' gateway is the node's own address all the same
                self.ns.run("ip", "addr", "add", f"{UPLINK_NODE}/32", "dev", "lo")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.ns.close()
