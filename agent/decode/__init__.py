"""Raw frame bytes → :class:`~agent.model.Segment`, one module per job.

- :mod:`.linktypes`: the capture's link layer (Ethernet with any 802.1Q/802.1ad tags, Linux
  cooked v1/v2, raw IPv4/IPv6, BSD null/loop, PPP, PPP in HDLC-like framing, PPPoE, Cisco
  HDLC);
- :mod:`.ip`: IPv4 with options, IPv6 with extension headers, IP in IP (4in4, 6in4, 4in6,
  6in6);
- :mod:`.tunnels`: VXLAN, Geneve, GRE (keys, sequence numbers, checksums; IP, Ethernet, PPP
  inside), ERSPAN types I-III, and what identifies a tunnel (``Segment.tunnel``);
- :mod:`.defrag`: IPv4/IPv6 fragments, bounded in memory and time;
- :mod:`.decoder`: the :class:`Decoder` walking those layers (with a depth bound) to TCP,
  with a fast path for plain Ethernet/IPv4/TCP;
- :mod:`.layers`: the cursor and layer kinds they share.

Nothing here raises on bad input: skipped frames are counted by reason in
:class:`DecodeStats`.
"""

from agent.decode.decoder import (
    ETH_IPV4_TCP,
    ETH_IPV4_TCP_MIN,
    MAX_LAYERS,
    DecodeConfig,
    Decoder,
    DecodeStats,
    fast_frame,
)
from agent.decode.defrag import Defragmenter
from agent.decode.linktypes import (
    LINKTYPE_C_HDLC,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_PPP,
    LINKTYPE_PPP_ETHER,
    LINKTYPE_PPP_HDLC,
    LINKTYPE_RAW,
    SUPPORTED_LINKTYPES,
)

__all__ = [
    "ETH_IPV4_TCP",
    "ETH_IPV4_TCP_MIN",
    "LINKTYPE_C_HDLC",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_LOOP",
    "LINKTYPE_NULL",
    "LINKTYPE_PPP",
    "LINKTYPE_PPP_ETHER",
    "LINKTYPE_PPP_HDLC",
    "LINKTYPE_RAW",
    "MAX_LAYERS",
    "SUPPORTED_LINKTYPES",
    "DecodeConfig",
    "DecodeStats",
    "Decoder",
    "Defragmenter",
    "fast_frame",
]
