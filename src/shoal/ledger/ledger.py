"""The ledger: append a signed entry, read a round's entries (verified), wait for new ones.

A :class:`Ledger` sits on any :class:`~shoal.ledger.store.KeyValueStore` — etcd in deployment,
:class:`~shoal.ledger.store.MemoryStore` in simulation — and trusts it for availability and
order only. Everything it returns was checked against the enrolled devices' public keys
(``ROOT/registry/``), and everything it refused is logged with the reason and kept in
:attr:`Ledger.problems`:

* an entry of a device that is not enrolled, or that was written after the device's revocation;
* an entry under a key that does not match what it says (a device writing under another's
  prefix, which etcd's RBAC also refuses), or of the wrong job, round or kind;
* a signature that does not verify (a forged or altered entry);
* an entry rewritten after it was written: its version is not 1, or its revision or content
  changed since this ledger first read it (an administrator of the store can do that; Raft
  cannot stop it, but the signatures and the chain make it visible);
* a chain break: an entry whose ``prev`` is not the hash of its device's previous entry;
* a replaced registry record: a device's public key is pinned when this ledger first reads it,
  so an administrator who swaps in a key of its own cannot sign in the device's name.

:meth:`Ledger.audit` walks every device's whole chain of a job — what a newcomer or an auditor
runs to check history nobody watched live.

**What a read costs is bounded by the registry, not by what devices wrote.** A device may
write any key under its own prefix (etcd's RBAC cannot tell an entry from junk), so a hostile
one can put thousands of keys beside its entries — under the job's round prefix, with names
that look like entries, under other jobs. The ledger never ranges over a device's prefix to
read a round: :meth:`Ledger.read_rounds` asks the store for the exact keys of the round's
entries (three per enrolled device, :func:`~shoal.ledger.keys.entry_key`) at one revision, and
:meth:`Ledger.follow` / :meth:`Ledger.wait` watch those keys only
(:meth:`~shoal.ledger.store.KeyValueStore.watch_keys`). Junk is never read there, so it can
neither hide an honest entry nor make a round unreadable. :meth:`Ledger.audit` and
:meth:`Ledger.head`, which must see a device's whole chain, list one device's keys of the job at
a time without their values and read only its entry keys: junk keys are counted and ignored
(their values, however big, are never read), and a device with more keys than the store returns
under one prefix, or whose keys cannot be read, is reported without stopping the audit of the
others. An entry's value is a small signed JSON: one over
:data:`~shoal.ledger.entry.MAX_ENTRY_BYTES` is refused before it is parsed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ShoalError, TransportError
from ..net.limits import LogLimiter
from .entry import Entry, Signer, entry_hash, sign_entry, verify_entry
from .keys import (
    DEFAULT_ROOT,
    KINDS,
    entry_key,
    parse_entry_key,
    peer_prefix,
    peers_prefix,
    registry_prefix,
    revoked_key,
    revoked_prefix,
)
from .store import KeyValueStore, LedgerAccessError, Record, TooManyRecords

__all__ = ["Enrolled", "Ledger", "LedgerError", "RoundView"]

log = logging.getLogger(__name__)

MAX_PROBLEMS = 1000
"""Problems kept in :attr:`Ledger.problems` (the oldest go first; a hostile device cannot grow
a peer's memory by writing bad entries)."""


MAX_CACHED = 20_000
"""Verified entries a ledger remembers so that reading them again costs no verification."""

MAX_AUDIT_LINES = 20
"""Problems :meth:`Ledger.audit` lists per device (then one line saying how many more): a
device that wrote thousands of bad entries gets a bounded report."""

MAX_WARNINGS_PER_DEVICE = 20
"""Warnings a ledger logs about one device per minute (:class:`~shoal.net.limits.LogLimiter`);
:attr:`Ledger.problems` keeps them all, up to :data:`MAX_PROBLEMS`."""


class LedgerError(ShoalError):
    """An entry could not be written (it exists: entries are written once) or the ledger
    refuses an operation."""


@dataclass(frozen=True)
class Enrolled:
    """An enrolled device: its public key, the revision of its enrollment, and the revision of
    its revocation (``None`` while it is not revoked)."""

    device: str
    public_key: bytes
    revision: int
    revoked: int | None = None


@dataclass
class RoundView:
    """A round's verified entries, read at store ``revision``: per kind, ``device -> (entry,
    create revision)``; ``active``: the devices enrolled and not revoked at that revision
    (``enrolled``: the registry as read then)."""

    job: str
    round: int
    revision: int
    active: list[str] = field(default_factory=list)
    enrolled: dict[str, Enrolled] = field(default_factory=dict, repr=False)
    updates: dict[str, tuple[Entry, int]] = field(default_factory=dict)
    closes: dict[str, tuple[Entry, int]] = field(default_factory=dict)
    merged: dict[str, tuple[Entry, int]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set, repr=False)
    """Entry keys :meth:`Ledger.follow` refused for this view: not watched again, so a device
    rewriting its own key wakes a follower once (an entry is written once: whatever the key
    holds later, the next :meth:`Ledger.read_rounds` of the round reads and checks)."""

    def of(self, kind: str) -> dict[str, tuple[Entry, int]]:
        """The entries of ``kind``."""
        return {"update": self.updates, "close": self.closes, "merged": self.merged}[kind]


class Ledger:
    """Signed, chained entries on a key-value store; see the module docstring.

    Args:
        store: the replicated store (etcd, or in-process).
        root: the key prefix of this ledger.
    """

    def __init__(self, store: KeyValueStore, root: str = DEFAULT_ROOT):
        self.store = store
        self.root = root
        self.problems: list[str] = []
        self._said: set[str] = set()
        self._seen: dict[str, tuple[int, str]] = {}  # key -> (create revision, entry hash)
        self._heads: dict[tuple[str, str], tuple[int, str]] = {}  # (job, device) -> (seq, hash)
        self._known: list[str] = []  # the enrolled devices of the last registry read
        self._valid: dict[str, tuple[int, int, bytes, Entry]] = {}  # verified, by key
        self._pinned: dict[str, tuple[bytes, int]] = {}  # device -> key and revision first read
        self._warn = LogLimiter(MAX_WARNINGS_PER_DEVICE)

    def __repr__(self) -> str:
        return f"Ledger({self.store!r}, root={self.root!r})"

    # -- who may write --------------------------------------------------------------------

    def enrolled(self) -> dict[str, Enrolled]:
        """The enrolled devices (revoked ones included, with their revocation revision)."""
        return self.enrolled_at()[0]

    def enrolled_at(self) -> tuple[dict[str, Enrolled], int]:
        """:meth:`enrolled`, and the store revision it was read at (to watch for what comes
        after it, e.g. :meth:`wait_revocation`)."""
        (reg, rev), revision = self.store.ranges([registry_prefix(self.root),
                                                  revoked_prefix(self.root)])
        return self._parse_registry(reg, rev), revision

    def wait_revocation(self, devices: Sequence[str], revision: int, timeout: float) -> bool:
        """Block until one of ``devices`` is revoked after store ``revision`` (``True``) or
        ``timeout`` seconds pass (``False``); it watches their revocation keys only."""
        keys = [revoked_key(d, self.root) for d in devices]
        return bool(self.store.watch_keys(revoked_prefix(self.root), keys, revision,
                                          max(0.0, timeout)))

    def _parse_registry(self, reg: Sequence[Record], rev: Sequence[Record]) -> dict[str, Enrolled]:
        revoked = {r.key.removeprefix(revoked_prefix(self.root)): r.create_revision for r in rev}
        out: dict[str, Enrolled] = {}
        for r in reg:
            device = r.key.removeprefix(registry_prefix(self.root))
            try:
                d = json.loads(r.value)
                key = bytes.fromhex(d["public_key"])
                if d["device"] != device or len(key) != 32:
                    raise ValueError("it names another device or holds no 32-byte key")
            except (ValueError, KeyError, TypeError) as e:
                self._problem(f"the registry record of {device!r} is malformed ({e}); the "
                              "device is treated as not enrolled")
                continue
            pinned = self._pinned.setdefault(device, (key, r.create_revision))
            if pinned != (key, r.create_revision):
                # Only the store's administrator can replace a registry record: with a key of
                # its own, it could then sign entries in the device's name.
                self._problem(f"the registry record of {device!r} was replaced (its key or "
                              f"revision changed since revision {pinned[1]}): an insider with "
                              "write access to the store rewrote enrollment; the device's "
                              "entries are checked against the key first read")
                key = pinned[0]
            out[device] = Enrolled(device, key, r.create_revision, revoked.get(device))
        self._known = sorted(out)
        return out

    def active(self) -> list[str]:
        """The enrolled devices not revoked, sorted."""
        return sorted(d for d, e in self.enrolled().items() if e.revoked is None)

    # -- writing ----------------------------------------------------------------------------

    def head(self, job: str, device: str) -> tuple[int, str]:
        """``(seq, hash)`` of ``device``'s newest entry of ``job`` (``(0, "")`` for none),
        read from the store the first time (a peer that restarts continues its chain)."""
        if (job, device) not in self._heads:
            records, _ = self._chain(device, job)
            best = (0, "")
            for r in records:
                try:
                    e = Entry.decode(r.value)
                except ValueError:
                    continue
                if e.device == device and e.seq > best[0]:
                    best = (e.seq, entry_hash(e))
            self._heads[(job, device)] = best
        return self._heads[(job, device)]

    def _chain(self, device: str, job: str) -> tuple[list[Record], int]:
        """The records of ``device``'s entry keys of ``job`` and how many other keys (junk) it
        wrote under its prefix of the job: the prefix's keys are listed without their values
        (:meth:`~shoal.ledger.store.KeyValueStore.list_keys`), and only the entry keys among
        them are read (:meth:`~shoal.ledger.store.KeyValueStore.read`, in transactions whose
        answers are bounded whatever the values), so big junk values are never read."""
        listed, _ = self.store.list_keys(f"{peer_prefix(device, self.root)}{job}/")
        keys = [k for k in listed if (p := parse_entry_key(k, self.root)) is not None
                and p[:2] == (device, job)]
        _, got, _ = self.store.read((), keys)
        return [r for r in got if r is not None], len(listed) - len(keys)

    def append(self, entry: Entry, signer: Signer) -> Entry:
        """Sign ``entry`` (its ``seq`` and ``prev`` set from its device's chain) and write it
        once; the signed entry. :class:`LedgerError` when its key was written before, or when
        it would not be an entry key (:func:`~shoal.ledger.keys.parse_entry_key`: every reader
        would take it for junk) — a job that is empty or holds a ``/``, a negative round, an
        unknown kind."""
        key = entry_key(entry.device, entry.job, entry.round, entry.kind, self.root)
        if parse_entry_key(key, self.root) != (entry.device, entry.job, entry.round,
                                               entry.kind):
            raise LedgerError(
                f"ledger: refusing to write the {entry.kind!r} entry of device "
                f"{entry.device!r}, job {entry.job!r}, round {entry.round}: its key {key!r} is "
                "no entry key, so every reader would ignore it. A job and a device id are "
                "non-empty and hold no '/', a round is >= 0 and a kind is one of "
                f"{', '.join(KINDS)}; set swarm.job to a name like 'mnist-2024'.")
        seq, prev = self.head(entry.job, entry.device)
        signed = sign_entry(dataclasses.replace(entry, seq=seq + 1, prev=prev), signer)
        revision = self.store.create(key, signed.encode())
        if revision is None:
            raise LedgerError(f"ledger: {key!r} was already written; entries are written once "
                              f"(device {entry.device!r} wrote its {entry.kind} entry of round "
                              f"{entry.round} before).")
        h = entry_hash(signed)
        self._heads[(entry.job, entry.device)] = (signed.seq, h)
        self._seen[key] = (revision, h)
        return signed

    # -- reading ----------------------------------------------------------------------------

    def read_round(self, job: str, round: int,
                   devices: Sequence[str] | None = None) -> RoundView:
        """The verified entries of ``job``'s ``round`` by ``devices`` (default: every enrolled
        device), all read at one store revision."""
        return self.read_rounds(job, [round], devices)[0]

    def read_rounds(self, job: str, rounds: Sequence[int],
                    devices: Sequence[str] | None = None) -> list[RoundView]:
        """:meth:`read_round` of each of ``rounds``, and the registry, in one read at one store
        revision (the devices enrolled since the last read are read again at once).

        The read asks for the registry and for the exact key of each kind of entry of each
        device in each round (:meth:`~shoal.ledger.store.KeyValueStore.read`): ``2 + 3 x
        devices x rounds`` requests, each answering at most one record but the registry's,
        however many other keys any device wrote under its prefix."""
        while True:
            names = list(devices) if devices is not None else list(self._known)
            keys = [entry_key(d, job, r, kind, self.root)
                    for r in rounds for d in names for kind in KINDS]
            (reg, rev), got, revision = self.store.read(
                [registry_prefix(self.root), revoked_prefix(self.root)], keys)
            enrolled = self._parse_registry(reg, rev)
            if devices is not None or set(enrolled) <= set(names):
                break  # else: a device enrolled since we last looked; read its entries too
        views = []
        records = iter(got)
        for round in rounds:
            view = RoundView(job, round, revision, active=sorted(
                d for d, e in enrolled.items() if e.revoked is None), enrolled=enrolled)
            for device in names:
                for _kind in KINDS:
                    r = next(records)
                    if r is None:
                        continue
                    entry = self._verified(r, enrolled, job)
                    if entry is None:
                        continue
                    if entry.round != round:
                        self._problem(f"{r.key!r}: the entry says round {entry.round}, its "
                                      f"key round {round}; refused", device)
                        continue
                    view.of(entry.kind)[device] = (entry, r.create_revision)
            views.append(view)
        return views

    def _verified(self, r: Record, enrolled: Mapping[str, Enrolled], job: str) -> Entry | None:
        """The entry in record ``r`` if it passes every check of the module docstring."""
        owner = r.key.removeprefix(peers_prefix(self.root)).split("/", 1)[0]
        parts = parse_entry_key(r.key, self.root)
        if parts is None:
            self._problem(f"{r.key!r} is not an entry key; refused", owner)
            return None
        device, key_job, _, kind = parts
        who = enrolled.get(device)
        if who is None:
            self._problem(f"{r.key!r}: device {device!r} is not enrolled; entry refused", owner)
            return None
        if who.revoked is not None and r.create_revision > who.revoked:
            self._problem(f"{r.key!r}: device {device!r} was revoked (revision {who.revoked}) "
                          f"before it wrote this entry (revision {r.create_revision}); refused",
                          owner)
            return None
        cached = self._valid.get(r.key)
        if cached is not None and cached[:2] == (r.create_revision, r.version) \
                and cached[2] == r.value:
            return cached[3]  # read before, verified, unchanged: no second verification
        try:
            entry = Entry.decode(r.value)
        except ValueError as e:
            self._problem(f"{r.key!r}: {e}; refused", owner)
            return None
        if (entry.device, entry.job, entry.kind) != (device, key_job, kind) or key_job != job:
            self._problem(f"{r.key!r}: the entry says device {entry.device!r}, job "
                          f"{entry.job!r}, kind {entry.kind!r}, which is not its key (written "
                          "under another device's prefix, or moved); refused", owner)
            return None
        bad = verify_entry(entry, who.public_key)
        if bad is not None:
            self._problem(f"{r.key!r}: {bad} (forged or altered); refused", owner)
            return None
        h = entry_hash(entry)
        seen = self._seen.get(r.key)
        if r.version != 1 or (seen is not None and seen != (r.create_revision, h)):
            self._problem(f"{r.key!r} was rewritten after it was written (version {r.version}"
                          + (f", first read at revision {seen[0]}" if seen else "")
                          + "): an insider with write access to the store changed history; "
                          "refused", owner)
            return None
        self._seen.setdefault(r.key, (r.create_revision, h))
        head = self._heads.get((job, device))
        if head is not None and entry.seq == head[0] + 1:
            if entry.prev != head[1]:
                self._problem(f"{r.key!r}: its prev hash does not match {device!r}'s previous "
                              "entry (the chain was broken: an entry was deleted, replaced or "
                              "replayed); refused", owner)
                return None
            self._heads[(job, device)] = (entry.seq, h)
        elif head is None or entry.seq > head[0]:
            self._heads[(job, device)] = (entry.seq, h)
        if len(self._valid) >= MAX_CACHED:
            self._valid.clear()
        self._valid[r.key] = (r.create_revision, r.version, r.value, entry)
        return entry

    def follow(self, view: RoundView, timeout: float, kinds: Sequence[str] = ()) -> bool:
        """Wait up to ``timeout`` seconds for entries of ``view``'s round (of ``kinds``) written
        after ``view.revision`` and add them to ``view`` — verified against the registry
        ``view`` was read with — without reading the round again; whether any came.

        It watches the exact keys of the entries ``view`` still lacks, of the devices enrolled
        and not revoked in ``view`` (:meth:`~shoal.ledger.store.KeyValueStore.watch_keys`): no
        other write wakes it, and a key refused once (``view.refused``) is not watched again,
        so a device rewriting its own keys wakes a follower at most once per key."""
        wanted = [k for k in (kinds or KINDS) if k in KINDS]
        keys: dict[str, tuple[str, str]] = {}
        for device, who in sorted(view.enrolled.items()):
            if who.revoked is not None:
                continue  # whatever it writes now comes after its revocation
            for kind in wanted:
                key = entry_key(device, view.job, view.round, kind, self.root)
                if device not in view.of(kind) and key not in view.refused:
                    keys[key] = (device, kind)
        got = self.store.watch_keys(peers_prefix(self.root), list(keys), view.revision,
                                    max(0.0, timeout))
        added = False
        for r in got:
            view.revision = max(view.revision, r.mod_revision)
            entry = self._verified(r, view.enrolled, view.job)
            if entry is None or entry.round != view.round or r.key not in keys:
                view.refused.add(r.key)
                continue
            device, kind = keys[r.key]
            view.of(kind)[device] = (entry, r.create_revision)
            added = True
        return added

    def wait(self, job: str, revision: int, timeout: float, round: int,
             kinds: Sequence[str] = ()) -> bool:
        """Block until an entry of ``job``'s ``round`` (of ``kinds``, when given) by a device
        enrolled at the last registry read is written after store ``revision`` (``True``) or
        ``timeout`` seconds pass (``False``). It watches those entries' exact keys only, so
        no other write wakes a waiting peer (nor can a flood of them delay it)."""
        names = self._known or sorted(self.enrolled())
        keys = [entry_key(d, job, round, k, self.root) for d in names
                for k in (kinds or KINDS) if k in KINDS]
        return bool(self.store.watch_keys(peers_prefix(self.root), keys, revision,
                                          max(0.0, timeout)))

    def audit(self, job: str) -> list[str]:
        """Check every enrolled device's whole chain of ``job`` (signatures, versions,
        ``seq`` 1, 2, ... without gaps, ``prev`` links); the problems found (empty: intact).

        Each device's prefix of the job is read on its own, so one device's keys cannot stop
        the audit of the others: keys that are not entry keys are counted (one line per
        device) and never parsed, a device with more keys than the store returns under one
        prefix (:class:`~shoal.ledger.store.TooManyRecords`) is reported as not audited, and
        each device gets at most :data:`MAX_AUDIT_LINES` lines. The prefix's keys are listed
        without their values and only its entry keys are read (in transactions bounded
        whatever the values weigh), so big values under junk keys are never read; a device
        whose keys still cannot be read (a :class:`~shoal.errors.TransportError` other than a
        refusal of this reader by RBAC) is reported as not audited and the audit goes on."""
        enrolled = self.enrolled()
        found: list[str] = []
        for device in sorted(enrolled):
            prefix = f"{peer_prefix(device, self.root)}{job}/"
            try:
                records, junk = self._chain(device, job)
            except TooManyRecords as flood:
                found.append(f"{device!r} has more than {flood.limit} keys under {prefix!r}; its "
                             f"chain of job {job!r} was not audited (it wrote a flood of keys "
                             "under its own prefix)")
                continue
            except LedgerAccessError:
                raise  # this reader may not read the ledger: no device can be audited
            except TransportError as failed:
                found.append(f"{device!r}: its chain of job {job!r} under {prefix!r} was not "
                             f"audited: reading it failed ({failed})")
                continue
            mine: list[str] = []
            chain: list[tuple[Entry, Record]] = []
            for r in records:
                parts = parse_entry_key(r.key, self.root)
                if parts is None:  # _chain reads entry keys only
                    continue
                _, _, key_round, key_kind = parts
                try:
                    e = Entry.decode(r.value)
                except ValueError as err:
                    mine.append(f"{r.key!r}: {err}")
                    continue
                bad = verify_entry(e, enrolled[device].public_key)
                if bad is not None:
                    mine.append(f"{r.key!r}: {bad}")
                elif r.version != 1:
                    mine.append(f"{r.key!r} was rewritten after it was written (version "
                                f"{r.version})")
                elif e.device != device or e.job != job or e.kind != key_kind:
                    mine.append(f"{r.key!r}: the entry does not match its key")
                elif e.round != key_round:
                    mine.append(f"{r.key!r}: the entry says round {e.round}, not its key's")
                else:
                    chain.append((e, r))
            chain.sort(key=lambda er: er[0].seq)
            prev = ""
            for i, (e, r) in enumerate(chain, start=1):
                if e.seq != i:
                    mine.append(f"{device!r}'s chain of job {job!r} skips from entry {i - 1} "
                                f"to {e.seq} at {r.key!r} (an entry was deleted)")
                    break
                if e.prev != prev:
                    mine.append(f"{r.key!r}: its prev hash does not match {device!r}'s entry "
                                f"{i - 1} (an entry was replaced or replayed)")
                    break
                prev = entry_hash(e)
            if len(mine) > MAX_AUDIT_LINES:
                mine[MAX_AUDIT_LINES:] = [f"{device!r}: {len(mine) - MAX_AUDIT_LINES} more "
                                          f"problems in its entries of job {job!r}"]
            if junk:
                mine.append(f"{device!r} wrote {junk} keys under {prefix!r} that are not entry "
                            "keys; ignored")
            found += mine
            for text in mine:
                self._problem(text, device)
        return found

    def _problem(self, text: str, about: str = "") -> None:
        """Record ``text`` (once) in :attr:`problems` and log it — at most
        :data:`MAX_WARNINGS_PER_DEVICE` a minute about one device (``about``; by default the
        device the key in ``text`` belongs to)."""
        if text in self._said:
            return
        self._said.add(text)
        self._warn.warning(about or "(ledger)", "ledger: %s", text)
        self.problems.append(text)
        if len(self.problems) > MAX_PROBLEMS:
            gone = self.problems.pop(0)
            self._said.discard(gone)

