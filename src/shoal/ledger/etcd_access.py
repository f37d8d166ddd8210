"""etcd's side of enrollment: a user and a role per device, and the RBAC bootstrap of a fresh
cluster (:class:`EtcdAccess`), run through an administrator's
:class:`~shoal.ledger.etcd.EtcdStore` (:meth:`~shoal.ledger.etcd.EtcdStore.access`).

A device's user is named by its certificate's CN (etcd takes the CN of a client certificate as
its user name when ``--client-cert-auth`` and auth are on) and has no password; its role
``shoal-peer-DEVICE`` (:data:`ROLE_PREFIX`) may read the ledger's root and write only under the
device's own prefix — what :class:`~shoal.ledger.enroll.Registrar` grants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from aetcd.rpc import auth_pb2, rpc_pb2

from ..errors import ConfigError
from .etcd_rpc import REQUIRE_LEADER, Member, prefix_end

if TYPE_CHECKING:
    from .etcd import EtcdStore

__all__ = ["ROLE_PREFIX", "EtcdAccess"]

ROLE_PREFIX = "shoal-peer-"
"""The etcd role of device ``D`` is ``shoal-peer-D``."""


class EtcdAccess:
    """etcd's side of enrollment: a user per device (named by its certificate's CN, no
    password) with the role ``shoal-peer-DEVICE``. Runs through ``store``, whose identity
    must be an administrator's (role ``root``)."""

    def __init__(self, store: EtcdStore):
        self.store = store

    def __repr__(self) -> str:
        return f"EtcdAccess({self.store!r})"

    def _auth(self, what: str, name: str, method: str, req: Any,
              tolerate: str | None = None) -> None:
        def run(m: Member, t: float, retried: bool) -> None:
            try:
                getattr(m.auth, method)(req, timeout=t, metadata=REQUIRE_LEADER)
            except grpc.RpcError as e:
                if tolerate is None or tolerate not in (e.details() or ""):
                    raise
        self.store._call(what, name, run)

    def grant(self, device: str, read_prefix: str, write_prefix: str) -> None:
        """Let ``device`` read every key under ``read_prefix`` and read and write under
        ``write_prefix`` (and nothing else): its role gets the two permissions, its user (no
        password; its certificate's CN authenticates it) the role. A user left by an
        interrupted enrollment is reused only when it holds no other role."""
        role = ROLE_PREFIX + device
        self._auth("role add", role, "RoleAdd", rpc_pb2.AuthRoleAddRequest(name=role),
                   tolerate="role name already exists")
        for typ, prefix in ((auth_pb2.Permission.READ, read_prefix),
                            (auth_pb2.Permission.READWRITE, write_prefix)):
            p = prefix.encode()
            self._auth("permission grant", role, "RoleGrantPermission",
                       rpc_pb2.AuthRoleGrantPermissionRequest(name=role, perm=auth_pb2.Permission(
                           permType=typ, key=p, range_end=prefix_end(p))))
        self._auth("user add", device, "UserAdd", rpc_pb2.AuthUserAddRequest(
            name=device, options=auth_pb2.UserAddOptions(no_password=True)),
            tolerate="user name already exists")
        roles = self.roles(device)
        if set(roles) - {role}:
            raise ConfigError(f"etcd: the user {device!r} already exists with the roles "
                              f"{roles}; a device's user may hold only {role!r}. Remove the "
                              "user (`etcdctl user delete`) or enroll under another id.")
        self._auth("role grant", device, "UserGrantRole",
                   rpc_pb2.AuthUserGrantRoleRequest(user=device, role=role))

    def roles(self, device: str) -> list[str]:
        """The etcd roles of ``device``'s user (empty when it has none or no user)."""
        def run(m: Member, t: float, retried: bool) -> list[str]:
            try:
                r = m.auth.UserGet(rpc_pb2.AuthUserGetRequest(name=device), timeout=t,
                                   metadata=REQUIRE_LEADER)
            except grpc.RpcError as e:
                if "user name not found" in (e.details() or ""):
                    return []
                raise
            return list(r.roles)
        return self.store._call("user get", device, run)

    def revoke(self, device: str) -> None:
        """Delete ``device``'s user and role, so that it can neither read nor write, even on
        a connection it already holds (idempotent)."""
        self._auth("user delete", device, "UserDelete",
                   rpc_pb2.AuthUserDeleteRequest(name=device), tolerate="user name not found")
        self._auth("role delete", ROLE_PREFIX + device, "RoleDelete",
                   rpc_pb2.AuthRoleDeleteRequest(role=ROLE_PREFIX + device),
                   tolerate="role name not found")

    def bootstrap(self, admin: str) -> None:
        """Turn on RBAC on a fresh cluster: the role ``root``, the users ``root`` and
        ``admin`` (no password; certificates name them) with that role, then auth enabled.
        Run it once, as any certificate of the project's CA, before the first enrollment."""
        self._auth("role add", "root", "RoleAdd", rpc_pb2.AuthRoleAddRequest(name="root"),
                   tolerate="role name already exists")
        for user in ("root", admin):
            self._auth("user add", user, "UserAdd", rpc_pb2.AuthUserAddRequest(
                name=user, options=auth_pb2.UserAddOptions(no_password=True)),
                tolerate="user name already exists")
            self._auth("role grant", user, "UserGrantRole",
                       rpc_pb2.AuthUserGrantRoleRequest(user=user, role="root"))
        self._auth("auth enable", "auth", "AuthEnable", rpc_pb2.AuthEnableRequest())
