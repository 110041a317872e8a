"""Secure aggregation's building blocks: Shamir, parameters and graph, ring bound, quantization,
the AES-256-CTR PRG, key-set signatures, and a source check that no secret comes from numpy or random."""

from __future__ import annotations

import ast
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import neurofed.wire.secagg as secagg_pkg
from neurofed.wire.errors import ProtocolError, WireError
from neurofed.wire.secagg import (
    KeySet,
    Reveal,
    RoundContext,
    SecAggClient,
    SecAggConfig,
    SecAggParameterError,
    check_k_t,
    choose_ring,
    default_k_t,
    gaussian_tail_bound,
)
from neurofed.wire.secagg.masking import clip_factor, l2_norm, masked_ring
from neurofed.wire.secagg.prg import BLOCK_WORDS, apply_stream, apply_streams, stream_words
from neurofed.wire.secagg.quantize import clip_l2, from_ring, stochastic_round, to_ring
from neurofed.wire.secagg.shamir import PRIME, SHARE_LEN, combine_secret, split_secret
from tests.wire.secagg_helpers import Fed

# --- Shamir ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "n"), [(2, 2), (2, 3), (3, 5), (6, 9)])
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(t, n):
    secret = os.urandom(32)
    shares = split_secret(secret, t, n)
    assert [i for i, _ in shares] == list(range(1, n + 1))
    for combo in itertools.islice(itertools.combinations(shares, t), 40):
        assert combine_secret(list(combo)) == secret
    assert combine_secret(shares) == secret  # more than t: fine
    for combo in itertools.islice(itertools.combinations(shares, t - 1), 40):
        assert combine_secret(list(combo)) != secret


@pytest.mark.parametrize("secret", [bytes(32), b"\xff" * 32, (1).to_bytes(32, "big")])
def test_the_extreme_32_byte_secrets_round_trip(secret):
    """0, 1 and 2^256 - 1 are field elements (p = 2^256 + 297 is above every 32-byte secret)."""
    shares = split_secret(secret, 3, 5)
    assert all(len(s) == SHARE_LEN for _, s in shares)
    assert combine_secret(shares[1:4]) == secret


def test_the_sharing_field_is_prime_and_holds_every_32_byte_secret():
    import flint

    assert flint.fmpz(PRIME).is_prime()
    assert 2**256 < PRIME < 2 ** (8 * SHARE_LEN)


def test_shares_of_a_value_above_32_bytes_are_refused_not_truncated():
    """Field elements from 2^256 to p - 1 are no 32-byte secret: shares a peer crafted to
    reconstruct one raise (the coordinator then tries other subsets) instead of wrapping."""
    import flint

    field = flint.fmpz_mod_ctx(PRIME)
    poly = flint.fmpz_mod_poly_ctx(field)([2**256 + 5, 7])  # degree 1: any 2 shares reconstruct
    shares = [(i, int(poly(i)).to_bytes(SHARE_LEN, "big")) for i in (1, 2)]
    with pytest.raises(ValueError, match="do not reconstruct a 32-byte secret"):
        combine_secret(shares)


def test_a_share_outside_the_field_is_refused_at_the_door():
    """A 33-byte value at or above p is no share: combine refuses it and a reveal carrying one
    is malformed (a peer cannot smuggle a value the field does not hold into a reconstruction)."""
    shares = split_secret(os.urandom(32), 2, 3)
    bad = PRIME.to_bytes(SHARE_LEN, "big")
    with pytest.raises(ValueError, match="malformed share"):
        combine_secret([shares[0], (2, bad)])
    reveal = Reveal("site-01", bytes(32), {"site-02": (1, bad)}, {})
    with pytest.raises(ProtocolError, match="not an element of the sharing field"):
        Reveal.from_bytes(reveal.to_bytes())
    short = Reveal("site-01", bytes(32), {"site-02": (1, bad[1:])}, {})
    with pytest.raises(ProtocolError, match="expected 33 bytes"):
        Reveal.from_bytes(short.to_bytes())


def test_t_minus_1_shares_are_independent_of_the_secret():
    """The same t-1 indices of shares of two different secrets are distributed alike: over many
    splits, the low byte of share 1 is uniform whatever the secret (chi-square on one byte)."""
    for secret in (bytes(32), b"\xff" * 32):
        counts = np.zeros(256)
        for _ in range(2000):
            counts[split_secret(secret, 3, 5)[0][1][-1]] += 1
        expected = 2000 / 256
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < 400  # 255 degrees of freedom: mean 255, this is far in the tail


# --- parameters and graph ----------------------------------------------------------------------


def test_defaults_are_sound_for_3_to_100_sites():
    for n in range(3, 101):
        k, t = default_k_t(n)
        check_k_t(n, k, t)
        assert 2 * t > k and t >= 2
        if n <= 10:
            assert k == n - 1
    assert default_k_t(100) == (20, 14)


def test_graph_is_regular_symmetric_and_deterministic():
    for n in (3, 4, 7, 10, 11, 25, 60, 100):
        sites = [f"s{i}" for i in range(n)]
        cfg = SecAggConfig.create(RoundContext("f", "r", 1, 0), sites, 10, 1.0)
        g = cfg.graph
        assert all(len(v) == cfg.k for v in g.values())
        assert all(u in g[v] for u in g for v in g[u]) and all(u not in g[u] for u in g)
        again = SecAggConfig.create(RoundContext("f", "r", 1, 0), reversed(sites), 10, 1.0)
        assert again.graph == g and again.digest == cfg.digest
    sites = [f"s{i}" for i in range(40)]
    g0 = SecAggConfig.create(RoundContext("f", "r", 1, 0), sites, 10, 1.0).graph
    g1 = SecAggConfig.create(RoundContext("f", "r", 1, 1), sites, 10, 1.0).graph
    assert g0 != g1  # another attempt, another graph
    with pytest.raises(SecAggParameterError, match="odd"):
        SecAggConfig.create(RoundContext("f", "r", 1, 0), sites[:11], 10, 1.0, k=5)


@pytest.mark.parametrize(
    ("n", "k", "t", "words"),
    [
        (2, 1, 2, "at least 3"),
        (5, 4, 5, "exceeds the degree"),
        (5, 4, 1, "at least 2"),
        (10, 8, 4, "must exceed k/2"),
        (11, 5, 3, "k*n odd"),
        (5, 5, 3, "between 2 and n-1"),
    ],
)
def test_impossible_parameters_are_refused_with_a_reason(n, k, t, words):
    with pytest.raises(SecAggParameterError, match=words.replace("*", r"\*")):
        check_k_t(n, k, t) if n >= 3 else default_k_t(n)
    assert issubclass(SecAggParameterError, WireError)


def test_ring_bound_and_choice():
    bits, e = choose_ring(10.0, 4096)
    assert bits == 32 and 4096 * (10.0 * 2.0**e + 2) <= 2**31 - 1
    assert 4096 * (10.0 * 2.0 ** (e + 1) + 2) > 2**31 - 1  # the finest scale that fits
    assert choose_ring(10.0, 4096, scale_log2=30) == (64, 30)
    with pytest.raises(SecAggParameterError):
        choose_ring(10.0, 4096, bits=32, scale_log2=30)
    with pytest.raises(SecAggParameterError):
        choose_ring(1e9, 2**30, bits=32)
    with pytest.raises(SecAggParameterError):
        choose_ring(-1.0, 10)
    # worst case: every site at +C on one coordinate, weight budget exhausted, rounding up
    cfg = SecAggConfig.create(RoundContext("f", "r", 1, 0), ["a", "b", "c"], 1, 10.0)
    worst = cfg.max_total_weight * (cfg.clip * cfg.scale + 1)
    assert worst < 2 ** (cfg.bits - 1)
    # a noise bound for Gaussian noise over 5 M coordinates at 2^-40
    nb = gaussian_tail_bound(0.01, 5_000_000)
    assert 0.09 < nb < 0.11
    noisy = SecAggConfig.create(RoundContext("f", "r", 1, 0), ["a", "b", "c"], 1, 10.0, noise_bound=nb)
    assert noisy.max_total_weight * ((noisy.clip + nb) * noisy.scale + 2) < 2**31


def test_config_round_trip_and_site_side_check():
    cfg = SecAggConfig.create(RoundContext("f", "r", 2, 1), ["a", "b", "c", "d"], 100, 5.0)
    assert SecAggConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict() | {"t": 1}
    with pytest.raises(SecAggParameterError):
        SecAggConfig.from_dict(bad)
    with pytest.raises(SecAggParameterError):
        SecAggConfig.from_dict(cfg.to_dict() | {"scale_log2": 40})  # would wrap a 32-bit ring
    # a coordinator of the ChaCha20 format: its masks would not cancel against these, refused by name
    with pytest.raises(SecAggParameterError, match="secagg-config/1"):
        SecAggConfig.from_dict(cfg.to_dict() | {"format": "neurofed-secagg-config/1"})


# --- quantization and PRG ----------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_and_within_one_unit():
    v = np.full(200_000, 0.3) + np.arange(200_000) % 7
    q = stochastic_round(v.copy(), os.urandom(32))
    assert np.all(np.abs(q - v) < 1)
    assert abs(np.mean(q - v)) < 0.005
    key = os.urandom(32)
    assert np.array_equal(stochastic_round(v.copy(), key), stochastic_round(v.copy(), key))  # reproducible


def test_ring_round_trip_of_negative_values():
    q = np.array([-5, 0, 7, -(2**20)], dtype=np.int64)
    for dtype in (np.dtype("<u4"), np.dtype("<u8")):
        r = to_ring(q, 3, dtype)
        assert r.dtype == dtype
        assert list(from_ring(r)) == [-15, 0, 21, -3 * 2**20]


def test_prg_is_the_aes256_ctr_keystream_and_cancels():
    key = os.urandom(32)
    n = (1 << 20) // 4 * 2 + 123  # crosses block boundaries
    words = stream_words(key, n, "<u4")
    ref = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * n))
    assert words.tobytes() == ref
    acc = np.arange(n, dtype=np.uint32)
    apply_stream(acc, key, +1)
    apply_stream(acc, key, -1)
    assert np.array_equal(acc, np.arange(n, dtype=np.uint32))
    assert not np.array_equal(stream_words(os.urandom(32), 100), stream_words(os.urandom(32), 100))


def test_streams_side_by_side_add_up_to_the_streams_one_after_the_other():
    n = 3 * BLOCK_WORDS + 77  # a short last block
    keys = [(os.urandom(32), +1), (os.urandom(32), -1), (os.urandom(32), +1)]
    for dtype in ("<u4", "<u8"):
        one_by_one = np.arange(n, dtype=dtype)
        for key, sign in keys:
            apply_stream(one_by_one, key, sign)
        together = np.arange(n, dtype=dtype)
        apply_streams(together, keys)
        assert np.array_equal(together, one_by_one)
        apply_streams(together, [(k, -s) for k, s in keys])
        assert np.array_equal(together, np.arange(n, dtype=dtype))


@pytest.mark.parametrize("dtype", ["<u4", "<u8"])
@pytest.mark.parametrize("clip", [1e9, 0.5])  # within the clip, and clipped
@pytest.mark.parametrize("tail", [(), (1, -3)])
def test_the_one_pass_masked_input_equals_the_steps_done_apart(dtype, clip, tail):
    """``masked_ring`` (clip, quantize, weight, tail, noise and masks block by block) gives the
    same ring words as the readable steps one after the other (``quantize`` and ``apply_stream``)."""
    rng = np.random.default_rng(7)  # test data, not secrets
    m = 2 * BLOCK_WORDS + 1001
    vec = (rng.standard_normal(m) * 1e-2).astype(np.float32)
    coin, scale, weight = os.urandom(32), 2.0**15, 37
    masks = [(os.urandom(32), +1), (os.urandom(32), -1)]
    noise = rng.integers(-50, 50, m + len(tail)) if tail else None

    v, norm = clip_l2(vec, clip)
    assert l2_norm(vec) == pytest.approx(norm, rel=1e-12)
    v *= scale
    q = stochastic_round(v, coin)
    w = np.concatenate([q * np.int64(weight), np.asarray(tail, dtype=np.int64)])
    if noise is not None:
        w = w + noise
    want = to_ring(w, 1, np.dtype(dtype))
    for key, sign in masks:
        apply_stream(want, key, sign)

    got = masked_ring(
        vec, factor=clip_factor(norm, clip), scale=scale, weight=weight, coin_key=coin,
        dtype=np.dtype(dtype), masks=masks, tail=tail, noise=noise,
    )  # fmt: skip
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="non-finite"):
        clip_factor(float("nan"), clip)


# --- key sets ----------------------------------------------------------------------------------


def _keyset_setup():
    fed = Fed.make(4)
    cfg = fed.config(10)
    client = SecAggClient("site-00", cfg, fed.identities["site-00"], fed.roster)
    return fed, cfg, client, KeySet.from_bytes(client.make_keyset())


def test_keyset_verifies_and_binds_the_attempt():
    fed, cfg, client, ks = _keyset_setup()
    ks.verify(cfg, fed.roster, sender="site-00")
    assert client.make_keyset() == ks.to_bytes()  # idempotent
    other = fed.config(10, attempt=1)
    with pytest.raises(ProtocolError) as ei:
        ks.verify(other, fed.roster)
    assert ei.value.reason == "secagg-wrong-context"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda ks, fed: KeySet(**{**ks.__dict__, "signature": bytes(64)}), "secagg-bad-keyset-signature"),
        (
            lambda ks, fed: KeySet(**{**ks.__dict__, "mask_key": os.urandom(32)}),
            "secagg-bad-keyset-signature",
        ),
        (
            lambda ks, fed: KeySet(**{**ks.__dict__, "site": "site-01"}).signed(fed.identities["site-00"]),
            "secagg-bad-keyset-signature",
        ),
        (
            lambda ks, fed: KeySet(**{**ks.__dict__, "site": "site-99"}).signed(Ed25519PrivateKey.generate()),
            "secagg-not-participant",
        ),
        (lambda ks, fed: ks.signed(Ed25519PrivateKey.generate()), "secagg-bad-keyset-signature"),
    ],
)
def test_forged_or_unsigned_keyset_is_rejected_with_a_reason(mutate, reason):
    fed, cfg, _client, ks = _keyset_setup()
    bad = mutate(ks, fed)
    with pytest.raises(ProtocolError) as ei:
        KeySet.from_bytes(bad.to_bytes()).verify(cfg, fed.roster)
    assert ei.value.reason == reason
    # a site that gets it relayed refuses it too
    peer = SecAggClient("site-01", cfg, fed.identities["site-01"], fed.roster)
    peer.make_keyset()
    with pytest.raises(ProtocolError):
        peer.make_shares({bad.site: bad.to_bytes()})


def test_unsigned_or_garbled_keyset_bytes():
    fed, cfg, _client, ks = _keyset_setup()
    doc = ks.to_bytes().replace(b'"signature":"', b'"signature":"x')
    with pytest.raises(ProtocolError) as ei:
        KeySet.from_bytes(doc)
    assert ei.value.reason == "secagg-malformed"
    with pytest.raises(ProtocolError):
        KeySet.from_bytes(b"{}")


# --- no secret from numpy or random ------------------------------------------------------------


def test_no_secret_comes_from_numpy_random_or_random():
    """The library's source never calls numpy.random, Python's random, or a seeded numpy Generator:
    keys come from cryptography/os.urandom, share polynomials from ``secrets``, masks from AES-256-CTR."""
    folder = Path(secagg_pkg.__file__).parent
    sources = sorted(folder.glob("*.py"))
    assert len(sources) >= 8
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name in ("random", "numpy.random") for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("random", "numpy.random"), path
                assert not (node.module == "numpy" and any(a.name == "random" for a in node.names)), path
            if isinstance(node, ast.Attribute) and node.attr in ("random", "default_rng", "RandomState"):
                assert not (isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy")), (
                    path,
                    node.lineno,
                )
        text = path.read_text()
        assert "np.random" not in text and "numpy.random" not in text, path
