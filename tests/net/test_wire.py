"""The wire format: round trips, chunking, versions, limits."""

from __future__ import annotations

import struct

import pytest
import torch

from shoal.errors import TransportError
from shoal.message import Message
from shoal.net import wire


def _roundtrip(message: Message, chunk: int, limit: int = 1 << 30) -> tuple[int, Message]:
    asm = wire.Assembler(limit)
    done = None
    frames = list(wire.encode_message(message, 7, chunk))
    for data in frames:
        f = wire.decode_frame(data)
        done = asm.header(f.payload) if f.type == wire.HEADER else asm.chunk(f.payload)
    assert done is not None
    return done


def test_every_dtype_round_trips_bit_exactly_in_small_chunks() -> None:
    tensors = {name: (torch.randn(5, 3) * 100).to(dtype) for name, dtype in wire.DTYPES.items()}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    m = Message("train", "coordinator", "n1", 4, tensors, {"a": [1, 2]}, {"loss": 0.5}, None)
    seq, out = _roundtrip(m, chunk=7)
    assert seq == 7
    assert (out.kind, out.src, out.dst, out.round, out.config, out.metrics, out.error) == \
        (m.kind, m.src, m.dst, m.round, m.config, m.metrics, m.error)
    assert list(out.tensors) == list(tensors)
    for k, v in tensors.items():
        assert out.tensors[k].dtype == v.dtype and torch.equal(out.tensors[k], v), k


def test_another_version_gets_a_clear_error() -> None:
    frame = next(wire.encode_message(Message("x", "a", "b", 1), 1))
    other = struct.pack(">4sHB", b"SHOL", 2, wire.HEADER) + frame[7:]
    with pytest.raises(TransportError) as info:
        wire.decode_frame(other)
    assert str(info.value) == ("wire: the peer speaks shoal wire format version 2, this node "
                               "speaks version 1; run the same shoal release on the "
                               "coordinator and the clients.")
    with pytest.raises(TransportError, match="does not speak the shoal protocol"):
        wire.decode_frame(b"HTTP/1.1 200 OK")


def test_an_oversized_message_is_refused_unread_and_its_chunks_skipped() -> None:
    m = Message("train", "n1", "coordinator", 1, {"w": torch.zeros(1000)})
    asm = wire.Assembler(max_bytes=1000)
    frames = [wire.decode_frame(d) for d in wire.encode_message(m, 3, chunk_size=512)]
    with pytest.raises(TransportError) as info:
        asm.header(frames[0].payload)
    assert str(info.value) == ("message of 4000 bytes is over the limit of 1000 bytes "
                               "(network.max_message_mb); refused unread.")
    assert all(asm.chunk(f.payload) is None for f in frames[1:])
    assert asm.skip == 0 and not asm.busy
    # The next message on the stream is read normally.
    small = Message("train", "n1", "coordinator", 1, {"w": torch.ones(10)})
    done = None
    for d in wire.encode_message(small, 4):
        f = wire.decode_frame(d)
        done = asm.header(f.payload) if f.type == wire.HEADER else asm.chunk(f.payload)
    assert done is not None and torch.equal(done[1].tensors["w"], torch.ones(10))


def test_a_header_lying_about_its_size_is_refused() -> None:
    body = {"seq": 1, "nbytes": 4, "message": Message("train", "a", "b", 1,
                                                     {"w": torch.ones(3)}).header()}
    with pytest.raises(TransportError) as info:
        wire.Assembler(1 << 20).header(body)
    assert str(info.value) == "wire: header declares 4 data bytes but its tensors need 12."
