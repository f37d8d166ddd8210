"""The dashboard viewer role on the CA and the coordinator's side.

`shoal ca enroll NAME --viewer` issues a viewer's certificate: the role is the private purpose
VIEWER_OID in its Extended Key Usage, beside TLS client authentication. Attack: the holder of
such a certificate (someone trusted to *watch* the run) tries to join the federation as a
training client. The coordinator refuses it, saying why and how to get a client certificate.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from shoal.cli import app
from shoal.errors import ConfigError, TransportError
from shoal.message import Message
from shoal.net import CertificateAuthority, GrpcTransport, NodeClient
from shoal.net.ca import VIEWER_OID, Identity, is_viewer
from shoal.node import Node, NodeContext

from ._helpers import coordinator_identity, node_identity, running


def _usage(cert_path) -> list[x509.ObjectIdentifier]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_a_viewer_certificate_carries_the_viewer_purpose_and_a_client_certificate_does_not(
        tmp_path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    viewer = ca.enroll("alice", tmp_path / "out", viewer=True)
    client = ca.enroll("hospital-a", tmp_path / "out")
    assert VIEWER_OID.dotted_string.startswith("2.25.")  # the UUID arc (ITU-T X.667)
    assert _usage(viewer.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH, VIEWER_OID]
    assert _usage(client.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert is_viewer(viewer.cert.read_bytes())
    assert is_viewer(x509.load_pem_x509_certificate(viewer.cert.read_bytes()))
    der = x509.load_pem_x509_certificate(viewer.cert.read_bytes()).public_bytes(Encoding.DER)
    assert is_viewer(der)
    assert not is_viewer(client.cert.read_bytes())
    assert not is_viewer((tmp_path / "ca" / "coordinator.crt").read_bytes())
    with pytest.raises(TransportError, match="the peer certificate cannot be read"):
        is_viewer(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")


def test_one_name_holds_one_role(tmp_path) -> None:
    """`shoal ca revoke NAME` revokes every certificate of a name, so a viewer and a client
    never share one."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.enroll("hospital-a", tmp_path / "out")
    with pytest.raises(ConfigError) as info:
        ca.enroll("hospital-a", tmp_path / "out", viewer=True)
    assert str(info.value) == (
        "CA: 'hospital-a' is enrolled as a training client; a viewer certificate needs a name "
        "of its own (`shoal ca revoke NAME` revokes every certificate of a name): enroll the "
        "viewer under another name, e.g. `shoal ca enroll hospital-a-viewer --viewer`.")
    ca.enroll("alice", tmp_path / "out", viewer=True)
    ca.enroll("alice", tmp_path / "again", viewer=True)  # re-issued in the same role: fine
    with pytest.raises(ConfigError) as info:
        ca.enroll("alice", tmp_path / "out")
    assert str(info.value) == (
        "CA: 'alice' is enrolled as a dashboard viewer, and a viewer is not a training client; "
        "enroll the client under another name (`shoal ca enroll NODE_ID`).")
    with pytest.raises(ConfigError, match="a viewer certificate .* authenticates a TLS client "
                                          "only"):
        ca.issue("bob", tmp_path / "out", server=True, viewer=True)


def test_cli_enroll_viewer(tmp_path) -> None:
    ca, out = tmp_path / "ca", tmp_path / "viewers"
    runner = CliRunner()
    assert runner.invoke(app, ["ca", "init", "--dir", str(ca)]).exit_code == 0
    res = runner.invoke(app, ["ca", "enroll", "alice", "--viewer", "--dir", str(ca), "--out",
                              str(out)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert said.startswith("enrolled alice as a dashboard viewer: ")
    assert "they cannot join training" in said
    assert is_viewer((out / "alice.crt").read_bytes())
    res = runner.invoke(app, ["ca", "enroll", "hospital-a", "--dir", str(ca), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not is_viewer((out / "hospital-a.crt").read_bytes())


def _echo(message: Message, context: NodeContext) -> Message:
    return message.reply()


def test_a_viewer_certificate_cannot_join_the_federation_as_a_client(ca_dir, tmp_path) -> None:
    """Attack: a viewer presents its (valid, unrevoked, same-CA) certificate to the
    coordinator and says HELLO under its own name, to take part in training."""
    ca = CertificateAuthority(ca_dir / "ca")
    ca.enroll("viewer-eve", tmp_path / "v", viewer=True)
    ca.enroll("viewer-gone", tmp_path / "v", viewer=True)
    ca.revoke("viewer-gone")
    ident = node_identity(ca_dir, "client-0")

    def viewer(name: str) -> Identity:
        return Identity(tmp_path / "v" / f"{name}.key", tmp_path / "v" / f"{name}.crt", ident.ca)

    with GrpcTransport("127.0.0.1:0", identity=coordinator_identity(ca_dir),
                       crl=ca_dir / "ca" / "crl.pem") as coord:
        client = NodeClient(coord.address, Node(NodeContext("viewer-eve"), {"echo": _echo}),
                            identity=viewer("viewer-eve"))
        with pytest.raises(TransportError) as info:
            client.run()
        assert str(info.value) == (
            f"node 'viewer-eve': the coordinator at {coord.address} refused it: the certificate "
            "of 'viewer-eve' is a dashboard viewer's certificate (`shoal ca enroll NAME "
            "--viewer`), and a viewer cannot join training as a client; enroll the node with "
            "`shoal ca enroll NODE_ID` (without --viewer) and join with that certificate.")
        assert coord.nodes() == []
        # A revoked viewer is refused as revoked, as any revoked certificate is.
        gone = NodeClient(coord.address, Node(NodeContext("viewer-gone"), {"echo": _echo}),
                          identity=viewer("viewer-gone"))
        with pytest.raises(TransportError, match=r"refused it: the certificate of node "
                                                 r"'viewer-gone' \(serial [0-9a-f]+\) is revoked"):
            gone.run()
        # A client certificate of the same CA still joins.
        with running([NodeClient(coord.address, Node(NodeContext("client-0"), {"echo": _echo}),
                                 identity=ident)]):
            assert coord.wait_for_nodes(1, 30)
            assert coord.nodes() == ["client-0"]
