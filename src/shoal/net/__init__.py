"""Deployment: the gRPC transport, the certificate authority, and ``serve`` / ``join``.

    wire         the versioned frame format carrying Messages in chunks
    ca           CertificateAuthority (init, enroll, revoke), Identity, RevocationList
    coordinator  GrpcTransport: the coordinator's Transport (a gRPC server)
    client       NodeClient: a client node connecting out to the coordinator, Backoff
    deploy       serve() and join(): the same algorithm as `shoal run`, over the network
"""

from .ca import CertificateAuthority, Identity
from .client import Backoff, NodeClient
from .coordinator import GrpcTransport

__all__ = ["Backoff", "CertificateAuthority", "GrpcTransport", "Identity", "NodeClient"]
