"""The permissioned ledger of swarm learning, its stores, enrollment and the weights blobs.

    store    KeyValueStore (the contract) and MemoryStore (simulation, tests)
    etcd     EtcdStore (the store in deployment: mutual TLS, fail-over, reads at one revision)
    etcd_watch   KeyStream: one shared watch stream per prefix, keeping only awaited keys
    etcd_access  EtcdAccess: etcd's users, roles and permissions (RBAC) per device
    etcd_rpc     what those share: a member's connection, records, access errors
    cluster  EtcdCluster: a local etcd cluster with the project's TLS (tests, trials)
    keys     where entries, the registry and revocations live (what RBAC follows)
    entry    Entry: what a device records, signed (Ed25519) and chained by hash
    ledger   Ledger: append, read a round (verified), follow new entries, audit a job
    enroll   Registrar (enroll, revoke), SwarmIdentity, the devices' signing keys
    blobs    content-addressed weights blobs: the canonical format, BlobStore
    blob_service  BlobServer and BlobClient: blobs served peer to peer over mutual TLS
"""

from .entry import Entry
from .ledger import Ledger, LedgerError, RoundView
from .store import KeyValueStore, MemoryStore, Record

__all__ = ["Entry", "KeyValueStore", "Ledger", "LedgerError", "MemoryStore", "Record",
           "RoundView"]
