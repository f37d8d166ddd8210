"""Canary exposure: does a next-character model memorise a secret one phone typed?

Carlini et al. 2019 ("The Secret Sharer: evaluating and testing unintended memorization in
neural networks", USENIX Security) insert a *canary* into the training text: a fixed format
with a random slot, e.g. ``"my pin is 1234"`` with the four digits drawn at random. After
training, every possible filling ``r`` of the slot (the candidate space ``R``, here
``10**4`` PINs) is scored by its *log-perplexity* under the model,
``Px(r) = -sum_i log2 p(x_i | x_<i)`` over the characters of the slot given the format's prefix
(natural logs here; the base does not change the ranking), and the inserted secret's *rank*
among them is read off. The *exposure* is

    exposure = log2 |R| - log2 rank,     rank = |{r' in R : Px(r') <= Px(r)}|

(Definition 3 of the paper: ties count against the secret, so the rank is at least 1 and a
model that scores every candidate alike gives rank ``|R|`` and exposure 0). A secret the model
ranks first has the largest exposure, ``log2 |R|`` bits: an attacker who enumerates the
candidates in the model's order finds it at once. A secret the model never saw has a rank
uniform over ``1..|R|`` (if no ties), so its exposure has mean
``log2 |R| - log2(|R|!) / |R|``, close to ``log2 e ≈ 1.44`` bits, and
``P[exposure >= x] ≈ 2**-x``: small values, spread below a few bits.

When ``R`` is too large to enumerate, the paper estimates exposure from the distribution of
random candidates' log-perplexities: ``exposure ≈ -log2 P[Px(random r') <= Px(r)]``, either from
the empirical CDF of sampled candidates or from a skew-normal fitted to them (which can
extrapolate past the samples' range, the paper's choice for large exposures).

The keyboard scenario (``examples/keyboard.py``): a phone's text is cut into windows of
characters over a vocabulary (``KEYBOARD_VOCAB``, the example's ``string.printable[:95]``, a
character's id its position), and the model maps a ``(B, T)`` window of ids to next-character
logits at every position, ``(B, V, T)``. :func:`insert` puts the canary into one phone's text or
windows; :func:`log_perplexity` and :func:`exposure` query the trained model.

* :class:`Canary`, :func:`make_canary` — the format and its random secret.
* :func:`insert` — the canary in one client's data, ``copies`` times.
* :func:`log_perplexity`, :func:`candidate_log_perplexities` — the model's score of a text, of
  every candidate filling (batched).
* :func:`exposure`, :func:`exposure_from_log_perplexities` — the audit.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.arrays import ArrayData
from ..errors import ConfigError
from .membership import ModelLike, model_logits

__all__ = [
    "KEYBOARD_VOCAB",
    "Canary",
    "candidate_log_perplexities",
    "encode",
    "expected_random_exposure",
    "exposure",
    "exposure_from_log_perplexities",
    "insert",
    "log_perplexity",
    "make_canary",
]

KEYBOARD_VOCAB = string.printable[:95]
"""The keyboard example's vocabulary: digits, letters, punctuation, space (id 94)."""


def encode(text: str, vocab: str = KEYBOARD_VOCAB) -> Tensor:
    """Character ids of ``text`` (int64, a character's id is its position in ``vocab``); a
    character outside ``vocab`` is a :class:`~shoal.errors.ConfigError` (a canary must be
    typeable on the model's keyboard)."""
    lookup = {c: i for i, c in enumerate(vocab)}
    bad = sorted({c for c in text if c not in lookup})
    if bad:
        raise ConfigError(f"encode: characters {bad!r} are not in the model's vocabulary.")
    return torch.tensor([lookup[c] for c in text], dtype=torch.long)


@dataclass(frozen=True)
class Canary:
    """A canary: ``prefix`` then a secret of ``length`` characters drawn from ``alphabet``,
    joined by ``sep`` (``"my pin is "``, ``"1234"``, ``"0123456789"``, 4 -> ``"my pin is 1234"``;
    with ``sep=" "``: ``"my pin is 1 2 3 4"``). The candidate space ``R`` is every string of
    ``length`` characters of ``alphabet``, ``len(alphabet) ** length`` of them."""

    prefix: str
    secret: str
    alphabet: str = string.digits
    length: int = 4
    sep: str = ""

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ConfigError(f"Canary: length must be >= 1 (got {self.length}).")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ConfigError(f"Canary: the alphabet must be non-empty without repeats "
                              f"(got {self.alphabet!r}).")
        if len(self.secret) != self.length or any(c not in self.alphabet for c in self.secret):
            raise ConfigError(f"Canary: the secret {self.secret!r} must be {self.length} "
                              f"characters of {self.alphabet!r}.")

    def fill(self, secret: str) -> str:
        """The canary's text with ``secret`` in the slot."""
        return self.prefix + self.sep.join(secret)

    @property
    def text(self) -> str:
        """The canary's text with its own secret, e.g. ``"my pin is 1234"``."""
        return self.fill(self.secret)

    @property
    def space_size(self) -> int:
        """``|R|``, the number of possible secrets."""
        return len(self.alphabet) ** self.length


def make_canary(prefix: str, alphabet: str = string.digits, length: int = 4, seed: int = 0, *,
                sep: str = "") -> Canary:
    """A :class:`Canary` whose secret is ``length`` characters drawn uniformly and independently
    from ``alphabet`` (a pure function of ``seed``)."""
    if not alphabet:
        raise ConfigError("make_canary: the alphabet is empty.")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(alphabet), (length,), generator=gen).tolist()
    return Canary(prefix, "".join(alphabet[i] for i in idx), alphabet, length, sep)


# --------------------------------------------------------------------------- insertion


def _insert_text(text: str, canary: Canary, copies: int, gen: torch.Generator) -> str:
    spaces = [i + 1 for i, c in enumerate(text) if c == " "]
    spots = [0, *spaces] if spaces else [0, len(text)]
    picks = sorted(spots[i] for i in torch.randint(0, len(spots), (copies,),
                                                   generator=gen).tolist())
    out, last = [], 0
    for p in picks:
        out.append(text[last:p])
        out.append(canary.text + " ")
        last = p
    out.append(text[last:])
    return "".join(out)


def _insert_rows(x: Tensor, y: Tensor, canary: Canary, copies: int, vocab: str,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
    if x.dim() != 2 or len(x) == 0:
        raise ConfigError(f"insert: expected non-empty (n, T) windows of character ids, got x of "
                          f"shape {tuple(x.shape)}.")
    n, t = x.shape
    ids = encode(canary.text, vocab).to(x.dtype)
    space = encode(" ", vocab).to(x.dtype) if " " in vocab else ids[:0]
    rows = torch.randint(0, n, (copies,), generator=gen).tolist()
    new_x, new_y = [], []
    if y.shape == x.shape:  # windows: predict every next character
        if len(ids) > t + 1:
            raise ConfigError(f"insert: the canary has {len(ids)} characters, more than a "
                              f"window of {t} inputs holds (T + 1 = {t + 1}).")
        for r in rows:
            filler = torch.cat([x[r], y[r, -1:]])  # the row's own t + 1 characters
            chars = torch.cat([ids, space, filler])[: t + 1]
            new_x.append(chars[:-1])
            new_y.append(chars[1:].to(y.dtype))
    elif y.shape == x.shape[:1]:  # (context, next character) pairs
        for r in rows:
            chars = torch.cat([x[r], ids])
            for j in range(len(ids)):
                new_x.append(chars[j : j + t])
                new_y.append(chars[j + t].to(y.dtype))
    else:
        raise ConfigError(f"insert: y must be (n, T) next characters of (n, T) windows or (n,) "
                          f"next characters of (n, w) contexts; got x {tuple(x.shape)}, "
                          f"y {tuple(y.shape)}.")
    cx, cy = torch.stack(new_x), torch.stack(new_y)
    # canary rows at random places among the original rows (whose order is kept)
    total = n + len(cx)
    where = torch.randperm(total, generator=gen)[: len(cx)].sort().values
    is_canary = torch.zeros(total, dtype=torch.bool)
    is_canary[where] = True
    out_x = torch.empty((total, *x.shape[1:]), dtype=x.dtype)
    out_y = torch.empty((total, *y.shape[1:]), dtype=y.dtype)
    out_x[~is_canary], out_y[~is_canary] = x, y
    out_x[is_canary], out_y[is_canary] = cx, cy
    return out_x, out_y


@overload
def insert(data: str, canary: Canary, copies: int, *, vocab: str = ...,
           seed: int = ...) -> str: ...
@overload
def insert(data: ArrayData, canary: Canary, copies: int, *, vocab: str = ...,
           seed: int = ...) -> ArrayData: ...
@overload
def insert(data: tuple[Tensor, Tensor], canary: Canary, copies: int, *, vocab: str = ...,
           seed: int = ...) -> tuple[Tensor, Tensor]: ...


def insert(data: Any, canary: Canary, copies: int, *, vocab: str = KEYBOARD_VOCAB,
           seed: int = 0) -> Any:
    """One client's data with the canary in it ``copies`` times, as if its user typed it.

    * ``str`` (a phone's raw text, before it is cut into windows): ``canary.text + " "`` at
      ``copies`` random word starts. Cutting into windows afterwards may split a copy across two
      windows or drop it (``examples/keyboard.py`` keeps at most 64 non-overlapping windows), so
      the number of intact copies the model trains on is at most ``copies``.
    * ``(x, y)`` tensors or an :class:`~shoal.data.arrays.ArrayData` of windows, ``x`` of shape
      ``(n, T)`` ids and ``y`` the next characters ``(n, T)`` (the keyboard's windows): each copy
      is one new window that *starts* with the canary (the model's state is fresh there, as in
      :func:`log_perplexity`), then a space and the characters of a random existing window.
      Exactly ``copies`` windows are added.
    * the same with ``y`` of shape ``(n,)`` (``x`` is ``(n, w)`` contexts, ``y`` the character
      after each): each copy adds one ``(context, next)`` pair per character of the canary's
      text, the contexts sliding from a random existing context into the canary.

    New rows go to random places among the old ones, whose order is kept. ``vocab`` encodes the
    canary (windows only); the placement is a pure function of ``seed``. Insert into exactly one
    client's data (the phone whose secret it is) before building its
    :class:`~shoal.data.federated.ClientData`.
    """
    if copies < 0:
        raise ConfigError(f"insert: copies must be >= 0 (got {copies}).")
    gen = torch.Generator().manual_seed(seed)
    if isinstance(data, str):
        return _insert_text(data, canary, copies, gen) if copies else data
    if isinstance(data, ArrayData):
        if not copies:
            return data
        return ArrayData.of(*_insert_rows(*data.tensors(), canary, copies, vocab, gen))
    if isinstance(data, tuple) and len(data) == 2:
        if not copies:
            return data
        return _insert_rows(data[0], data[1], canary, copies, vocab, gen)
    raise ConfigError(f"insert: data must be text, (x, y) tensors or ArrayData, got "
                      f"{type(data).__name__}.")


# --------------------------------------------------------------------------- scoring


def _nll_sums(logits_fn: Any, params: Any, ids: Tensor, start: int, context: int | None,
              pad: int, batch_size: int) -> Tensor:
    """``-sum log p(ids[:, j] | ids[:, :j])`` over ``j >= start`` for each row, float64."""
    n, length = ids.shape
    out = torch.empty(n, dtype=torch.float64)
    with torch.no_grad():
        for b in range(0, n, batch_size):
            chunk = ids[b : b + batch_size]
            total = torch.zeros(len(chunk), dtype=torch.float64)
            if context is None:
                logits = logits_fn(params, chunk[:, :-1])
                if logits.dim() != 3 or logits.shape[-1] != length - 1:
                    raise ConfigError(f"log_perplexity: a sequence model must map (B, T) ids to "
                                      f"(B, V, T) logits; got {tuple(logits.shape)} for "
                                      f"{tuple(chunk[:, :-1].shape)} (for a model of a fixed "
                                      "context window, pass context=).")
                logp = F.log_softmax(logits.double(), dim=1)
                picked = logp.gather(1, chunk[:, 1:].unsqueeze(1)).squeeze(1)
                total = -picked[:, start - 1 :].sum(1)
            else:
                padded = torch.cat([torch.full((len(chunk), context), pad, dtype=chunk.dtype),
                                    chunk], dim=1)
                for j in range(start, length):
                    logits = logits_fn(params, padded[:, j : j + context])
                    if logits.dim() == 3:
                        logits = logits[..., -1]
                    logp = F.log_softmax(logits.double(), dim=1)
                    total -= logp.gather(1, chunk[:, j : j + 1]).squeeze(1)
            out[b : b + len(chunk)] = total
    return out


def log_perplexity(predict_fn: ModelLike, params: Any, text: str | Canary, *,
                   start: int | None = None, vocab: str = KEYBOARD_VOCAB,
                   context: int | None = None, pad: str = " ") -> float:
    """``-sum ln p(text[j] | text[:j])`` over ``j >= start``: the model's surprise at the end of
    ``text`` given its beginning, in nats. For a :class:`Canary`, ``text`` is ``canary.text``
    and ``start`` defaults to ``len(canary.prefix)``: the secret part given the prefix.

    ``predict_fn(params, x)`` is the model (a module, an :class:`~shoal.metrics.Evaluator` or a
    function, as in :func:`~shoal.audits.membership.model_logits`), over ids of ``vocab``:

    * ``context=None``: a causal sequence model, ``(B, T)`` ids to ``(B, V, T)`` next-character
      logits (the keyboard's ``CharModel``), run once on ``text[:-1]`` from a fresh state.
    * ``context=w``: a model of ``w`` characters, ``(B, w)`` to the next character's logits
      ``(B, V)`` (or ``(B, V, w)``, of which the last position is read), run once per scored
      character on the ``w`` characters before it, left-padded with ``pad``.
    """
    if isinstance(text, Canary):
        start = len(text.prefix) if start is None else start
        text = text.text
    start = 1 if start is None else start
    if not 1 <= start <= len(text):
        raise ConfigError(f"log_perplexity: start must be in 1..{len(text)} (the first "
                          f"character has no context; got {start}).")
    ids = encode(text, vocab).unsqueeze(0)
    pad_id = int(encode(pad, vocab)[0]) if context is not None else 0
    return float(_nll_sums(model_logits(predict_fn), params, ids, start, context, pad_id, 1)[0])


def _secret_rows(canary: Canary, secrets: Tensor, vocab: str) -> Tensor:
    """Ids of the canary's text for each secret, ``secrets`` ``(N, length)`` alphabet indices."""
    alpha = encode(canary.alphabet, vocab)
    chars = alpha[secrets]
    if canary.sep and canary.length > 1:
        sep = encode(canary.sep, vocab)
        parts = [chars[:, :1]]
        for k in range(1, canary.length):
            parts += [sep.expand(len(chars), -1), chars[:, k : k + 1]]
        chars = torch.cat(parts, dim=1)
    prefix = encode(canary.prefix, vocab).expand(len(chars), -1)
    return torch.cat([prefix, chars], dim=1)


def _as_indices(canary: Canary, secrets: Sequence[str] | Tensor) -> Tensor:
    if isinstance(secrets, Tensor):
        return secrets.long()
    lookup = {c: i for i, c in enumerate(canary.alphabet)}
    for s in secrets:
        if len(s) != canary.length or any(c not in lookup for c in s):
            raise ConfigError(f"candidate {s!r} is not {canary.length} characters of "
                              f"{canary.alphabet!r}.")
    return torch.tensor([[lookup[c] for c in s] for s in secrets],
                        dtype=torch.long).view(-1, canary.length)


def _all_secrets(canary: Canary) -> Tensor:
    a, k = len(canary.alphabet), canary.length
    n = torch.arange(a**k)
    powers = a ** torch.arange(k - 1, -1, -1)
    return (n.unsqueeze(1) // powers) % a


def candidate_log_perplexities(predict_fn: ModelLike, params: Any, canary: Canary,
                               secrets: Sequence[str] | Tensor | None = None, *,
                               vocab: str = KEYBOARD_VOCAB, context: int | None = None,
                               pad: str = " ", batch_size: int = 1024) -> Tensor:
    """:func:`log_perplexity` of the canary's secret part for each candidate secret, a float64
    tensor, in batches of ``batch_size``. ``secrets``: strings, or an ``(N, length)`` tensor of
    indices into ``canary.alphabet``; ``None``: all of ``R`` in lexicographic order (the
    candidate with indices ``(i_1, ..., i_k)`` at position ``sum_j i_j a**(k - j)``)."""
    idx = _all_secrets(canary) if secrets is None else _as_indices(canary, secrets)
    ids = _secret_rows(canary, idx, vocab)
    pad_id = int(encode(pad, vocab)[0]) if context is not None else 0
    return _nll_sums(model_logits(predict_fn), params, ids, len(canary.prefix), context, pad_id,
                     batch_size)


def exposure_from_log_perplexities(canary_lp: float, candidate_lps: Any, *,
                                   space_size: int | None = None, method: str = "rank",
                                   ties: str = "paper") -> float:
    """Exposure in bits of a secret of log-perplexity ``canary_lp`` against candidates'
    log-perplexities ``candidate_lps``.

    * ``method="rank"``: ``candidate_lps`` is all of ``R`` (the secret included);
      ``log2 |R| - log2 rank``. ``ties="paper"``: ``rank = |{r' : Px(r') <= Px(r)}|`` (the
      paper's Definition 3: a uniform model gives rank ``|R|``, exposure 0); ``ties="mid"``:
      the mid-rank, ``|{Px(r') < Px(r)}| + (|{Px(r') = Px(r)}| + 1) / 2`` (a uniform model then
      gives ``log2(2|R| / (|R| + 1))``, about 1 bit, the mean rank of a random order).
    * ``method="empirical"``: ``candidate_lps`` are random samples of ``R``;
      ``-log2 (|{sampled <= canary}| + 1) / (n + 1)`` (the ``+ 1``, as if the secret were among
      the samples, keeps it finite: at most ``log2(n + 1)``).
    * ``method="skewnorm"``: ``-log2 F(canary_lp)`` for a skew-normal ``F`` fitted to the
      samples by maximum likelihood (the paper's extrapolation to large exposures), capped at
      ``log2 |R|`` if ``space_size`` is given.
    """
    lps = np.asarray(candidate_lps.cpu() if isinstance(candidate_lps, Tensor) else candidate_lps,
                     dtype=np.float64).ravel()
    if lps.size == 0 or np.isnan(lps).any() or math.isnan(canary_lp):
        raise ConfigError("exposure: need non-empty log-perplexities without NaN.")
    if method == "rank":
        size = lps.size if space_size is None else space_size
        below = int((lps < canary_lp).sum())
        equal = int((lps == canary_lp).sum())
        if equal == 0:
            raise ConfigError("exposure: method='rank' needs the secret among the candidates "
                              "(no candidate has the canary's log-perplexity).")
        if ties == "paper":
            rank = float(below + equal)
        elif ties == "mid":
            rank = below + (equal + 1) / 2
        else:
            raise ConfigError(f"exposure: ties must be 'paper' or 'mid' (got {ties!r}).")
        return math.log2(size) - math.log2(rank)
    if method == "empirical":
        return -math.log2((int((lps <= canary_lp).sum()) + 1) / (lps.size + 1))
    if method == "skewnorm":
        from scipy import stats

        a, loc, scale = stats.skewnorm.fit(lps)
        bits = -float(stats.skewnorm.logcdf(canary_lp, a, loc, scale)) / math.log(2)
        bits = max(bits, 0.0)
        return min(bits, math.log2(space_size)) if space_size is not None else bits
    raise ConfigError(f"exposure: method must be 'rank', 'empirical' or 'skewnorm' "
                      f"(got {method!r}).")


def exposure(predict_fn: ModelLike, params: Any, canary: Canary,
             candidates: Sequence[str] | None = None, samples: int | None = None,
             seed: int = 0, *, vocab: str = KEYBOARD_VOCAB, context: int | None = None,
             pad: str = " ", exact_limit: int = 100_000, estimate: str = "skewnorm",
             ties: str = "paper", batch_size: int = 1024) -> float:
    """The canary's exposure in bits under the model at ``params`` (see the module docstring).

    * ``candidates`` given: they are ``R`` (the canary's own secret is added if missing), ranked
      exactly.
    * else, if ``samples`` is ``None`` and ``|R| <= exact_limit``: all of ``R`` is enumerated and
      scored in batches, and the rank is exact: exposure ``log2 |R| - log2 rank``, at most
      ``log2 |R|``.
    * else ``samples`` (default 10 000) secrets drawn uniformly from ``R`` (with replacement, a
      pure function of ``seed``) estimate ``-log2 P[Px(random) <= Px(canary)]`` by ``estimate``:
      ``"skewnorm"`` (fit, the paper's choice) or ``"empirical"`` (CDF of the samples).

    ``ties`` is the rank's convention (:func:`exposure_from_log_perplexities`); ``vocab``,
    ``context``, ``pad`` describe the model (:func:`log_perplexity`).
    """
    kw: dict[str, Any] = dict(vocab=vocab, context=context, pad=pad, batch_size=batch_size)
    if candidates is not None:
        if samples is not None:
            raise ConfigError("exposure: give candidates or samples, not both.")
        pool = list(dict.fromkeys([*candidates, canary.secret]))
        lps = candidate_log_perplexities(predict_fn, params, canary, pool, **kw)
        # the canary's own score from the same batched computation as the others'
        return exposure_from_log_perplexities(float(lps[pool.index(canary.secret)]), lps,
                                              ties=ties)
    if samples is None and canary.space_size <= exact_limit:
        lps = candidate_log_perplexities(predict_fn, params, canary, None, **kw)
        own_index = int((_as_indices(canary, [canary.secret])[0]
                         * len(canary.alphabet) ** torch.arange(canary.length - 1, -1, -1)).sum())
        return exposure_from_log_perplexities(float(lps[own_index]), lps, ties=ties)
    n = 10_000 if samples is None else samples
    if n < 1:
        raise ConfigError(f"exposure: samples must be >= 1 (got {n}).")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(canary.alphabet), (n, canary.length), generator=gen)
    lps = candidate_log_perplexities(predict_fn, params, canary, idx, **kw)
    own = candidate_log_perplexities(predict_fn, params, canary, [canary.secret], **kw)
    return exposure_from_log_perplexities(float(own[0]), lps, space_size=canary.space_size,
                                          method=estimate)


def expected_random_exposure(space_size: int) -> float:
    """The mean exposure of a secret the model never saw, if the model's scores have no ties:
    the rank is then uniform on ``1..|R|``, and the mean is
    ``log2 |R| - log2(|R|!) / |R|`` (about ``log2 e ≈ 1.44`` bits for large ``|R|``)."""
    if space_size < 1:
        raise ConfigError(f"expected_random_exposure: space_size must be >= 1 (got "
                          f"{space_size}).")
    return math.log2(space_size) - math.lgamma(space_size + 1) / math.log(2) / space_size
