"""Secure aggregation end to end in memory: correctness against plaintext FedAvg, dropouts at every
phase, the consistency round, refusals, resume, and what the coordinator holds."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from neurofed.wire.errors import ProtocolError
from neurofed.wire.secagg import (
    BothSharesRequested,
    MaskedInput,
    MaskReuseRefused,
    SecAggClient,
    SecAggRoundFailed,
    SecAggServer,
    SurvivorList,
    UnmaskRequest,
)
from neurofed.wire.secagg.shamir import SHARE_LEN
from tests.wire.secagg_helpers import Drops, Fed, fedavg, random_updates, run_round, to_shares

LENGTH = 2000


@pytest.mark.parametrize("n", [3, 5, 10])
def test_sum_equals_plaintext_fedavg(n):
    fed = Fed.make(n)
    cfg = fed.config(LENGTH)
    ups, ws = random_updates(fed.sites, LENGTH, seed=n)
    res, *_ = run_round(fed, cfg, ups, ws)
    want = fedavg(ups, ws, fed.sites, cfg.clip)
    assert res.survivors == tuple(fed.sites) and res.recovered == () and res.left_out == ()
    assert res.total_weight == sum(ws.values())
    err = np.max(np.abs(res.mean - want))
    assert err < cfg.error_bound, (err, cfg.error_bound)
    # the bound is not vacuous: the error is of the order of the quantization step
    assert err > 0 and cfg.error_bound < 1e-4


def test_clipped_updates_and_64_bit_ring():
    fed = Fed.make(4)
    cfg = fed.config(LENGTH, clip=1.0, bits=64)
    ups, ws = random_updates(fed.sites, LENGTH, seed=7, scale=1.0)  # norms ~45, clipped to 1
    res, *_ = run_round(fed, cfg, ups, ws)
    assert cfg.bits == 64 and cfg.error_bound < 1e-12
    want = fedavg(ups, ws, fed.sites, cfg.clip)
    assert np.max(np.abs(res.mean - want)) < cfg.error_bound + 1e-15
    assert np.linalg.norm(res.mean) <= 1.0 + 1e-9


def test_three_of_ten_dropped_after_sharing_are_recovered():
    fed = Fed.make(10)
    cfg = fed.config(LENGTH)
    ups, ws = random_updates(fed.sites, LENGTH, seed=1)
    dropped = {"site-02", "site-05", "site-09"}
    res, *_ = run_round(fed, cfg, ups, ws, Drops(masked=dropped))
    survivors = [s for s in fed.sites if s not in dropped]
    assert res.survivors == tuple(survivors) and set(res.recovered) == dropped
    assert res.total_weight == sum(ws[s] for s in survivors)
    assert np.max(np.abs(res.mean - fedavg(ups, ws, survivors, cfg.clip))) < cfg.error_bound


def test_dropped_before_sharing_are_left_out():
    fed = Fed.make(10)
    cfg = fed.config(LENGTH)
    ups, ws = random_updates(fed.sites, LENGTH, seed=2)
    res, *_ = run_round(fed, cfg, ups, ws, Drops(keys={"site-00"}, shares={"site-07"}))
    survivors = [s for s in fed.sites if s not in ("site-00", "site-07")]
    assert res.left_out == ("site-00", "site-07") and res.recovered == ()
    assert np.max(np.abs(res.mean - fedavg(ups, ws, survivors, cfg.clip))) < cfg.error_bound


def test_dropped_after_input_still_counted_and_sparse_graph():
    """25 sites (k < n-1): drops at every phase; survivors that stop before echoing or revealing
    are still in the sum (their input arrived; their neighbours reveal their seeds). Six drops
    could all hit one neighbourhood, so t is lowered from the default 10 to 8 (still > k/2)."""
    fed = Fed.make(25)
    cfg = fed.config(500, k=14, t=8)
    assert cfg.k < cfg.n - 1
    ups, ws = random_updates(fed.sites, 500, seed=3)
    d = Drops(
        keys={"site-01"},
        shares={"site-04"},
        masked={"site-10", "site-17"},
        echo={"site-20"},
        reveal={"site-22"},
    )
    res, *_ = run_round(fed, cfg, ups, ws, d)
    survivors = [s for s in fed.sites if s not in d.keys | d.shares | d.masked]
    assert res.survivors == tuple(survivors)
    assert np.max(np.abs(res.mean - fedavg(ups, ws, survivors, cfg.clip))) < cfg.error_bound


def test_too_few_survivors_fails_and_a_fresh_attempt_succeeds(caplog):
    fed = Fed.make(5)
    cfg = fed.config(LENGTH)  # k=4, t=3
    ups, ws = random_updates(fed.sites, LENGTH, seed=4)
    with caplog.at_level(logging.WARNING), pytest.raises(SecAggRoundFailed) as ei:
        run_round(fed, cfg, ups, ws, Drops(masked={"site-00", "site-01", "site-02"}))
    assert ei.value.reason == "secagg-too-few-survivors"
    assert "retry with attempt 1" in caplog.text
    retry = fed.config(LENGTH, attempt=1)
    res, *_ = run_round(fed, retry, ups, ws, Drops(masked={"site-00"}))
    assert np.max(np.abs(res.mean - fedavg(ups, ws, fed.sites[1:], cfg.clip))) < cfg.error_bound


def test_too_few_reveals_fails_cleanly():
    fed = Fed.make(5)
    cfg = fed.config(LENGTH)
    ups, ws = random_updates(fed.sites, LENGTH, seed=5)
    with pytest.raises(SecAggRoundFailed) as ei:
        run_round(fed, cfg, ups, ws, Drops(reveal={"site-00", "site-01", "site-02"}))
    assert ei.value.reason == "secagg-too-few-shares"


def _to_masked(fed, n_drop_masked=(), length=LENGTH, seed=0):
    """Run up to the masked inputs; return (cfg, clients, server)."""
    cfg = fed.config(length)
    clients, server, _ = to_shares(fed, cfg)
    ups, ws = random_updates(fed.sites, length, seed=seed)
    for s, c in clients.items():
        if s not in n_drop_masked:
            server.add_masked_input(s, c.mask(ups[s], ws[s], server.shares_for(s)))
    return cfg, clients, server


def _sign_all(clients, lst_bytes, who):
    return {s: clients[s].consistency(lst_bytes) for s in who}


def test_both_shares_refused_with_enough_echoes_on_both_lists(caplog):
    """A coordinator tells two stories: site-04 survived (list a), site-04 dropped (list b).
    Even when a second list carries t valid echoes (the coordinator got t sites to sign it),
    a site that answered the first refuses to answer the second for a flipped neighbour."""
    fed = Fed.make(5)  # k=4, t=3
    cfg, clients, server = _to_masked(fed)
    a = SurvivorList(cfg.context, cfg.digest, tuple(fed.sites))
    b = SurvivorList(cfg.context, cfg.digest, tuple(s for s in fed.sites if s != "site-04"))
    req_a = UnmaskRequest(a.to_bytes(), _sign_all(clients, a.to_bytes(), ["site-00", "site-01", "site-02"]))
    reveal = clients["site-00"].unmask(req_a.to_bytes())
    # site-01..03 are fooled into echoing list b: three valid echoes (site-01, -02 already echoed a)
    req_b = UnmaskRequest(
        b.to_bytes(), {"site-03": clients["site-03"].consistency(b.to_bytes())} | req_a.echoes
    )
    with pytest.raises(ProtocolError) as ei:  # a's echoes do not verify for b: too few
        clients["site-00"].unmask(req_b.to_bytes())
    assert ei.value.reason == "secagg-too-few-echoes"
    # give b enough echoes by forging them with the real identities (a colluding majority)
    forged = {s: fed.identities[s].sign(b.echo_bytes()) for s in ("site-01", "site-02", "site-03")}
    with caplog.at_level(logging.ERROR), pytest.raises(BothSharesRequested) as ei:
        clients["site-00"].unmask(UnmaskRequest(b.to_bytes(), forged).to_bytes())
    assert ei.value.reason == "secagg-both-shares"
    assert "both shares of site-04" in caplog.text
    # the list it answered may be asked again (a resend): the same reveal, nothing more
    assert clients["site-00"].unmask(req_a.to_bytes()) == reveal


def test_second_survivor_list_is_not_echoed():
    fed = Fed.make(5)
    cfg, clients, _ = _to_masked(fed)
    a = SurvivorList(cfg.context, cfg.digest, tuple(fed.sites))
    b = SurvivorList(cfg.context, cfg.digest, tuple(fed.sites[:4]))
    clients["site-00"].consistency(a.to_bytes())
    assert clients["site-00"].consistency(a.to_bytes())  # repeat: fine
    with pytest.raises(BothSharesRequested):  # site-04 is site-00's neighbour (complete graph)
        clients["site-00"].consistency(b.to_bytes())


def test_survivor_list_not_echoed_by_t_sites_is_refused():
    fed = Fed.make(10)  # t = 6
    cfg, clients, server = _to_masked(fed)
    lst = server.close_inputs()
    echoes = _sign_all(clients, lst, fed.sites[:5])
    with pytest.raises(ProtocolError) as ei:
        clients["site-09"].unmask(UnmaskRequest(lst, echoes).to_bytes())
    assert ei.value.reason == "secagg-too-few-echoes"
    # an echo over a different list, or by a non-survivor, or a garbage signature does not count
    other = SurvivorList(cfg.context, cfg.digest, tuple(fed.sites[:9])).to_bytes()
    echoes["site-07"] = fed.identities["site-07"].sign(SurvivorList.from_bytes(other).echo_bytes())
    echoes["site-08"] = bytes(64)
    with pytest.raises(ProtocolError):
        clients["site-09"].unmask(UnmaskRequest(lst, echoes).to_bytes())
    # the server refuses to ask with fewer than t echoes
    for s in fed.sites[:5]:
        server.add_echo(s, clients[s].consistency(lst))
    with pytest.raises(ProtocolError) as ei:
        server.add_echo("site-05", bytes(64))
    assert ei.value.reason == "secagg-bad-echo"
    with pytest.raises(SecAggRoundFailed) as ei2:
        server.unmask_request()
    assert ei2.value.reason == "secagg-too-few-echoes"


def test_too_short_survivor_list_is_refused_by_sites():
    fed = Fed.make(5)  # t=3, min survivors 3
    cfg, clients, _ = _to_masked(fed)
    short = SurvivorList(cfg.context, cfg.digest, ("site-00", "site-01")).to_bytes()
    with pytest.raises(ProtocolError) as ei:
        clients["site-00"].consistency(short)
    assert ei.value.reason == "secagg-too-few-survivors"


def test_masks_are_fresh_per_attempt_and_resume_is_byte_identical():
    fed = Fed.make(4)
    ups, ws = random_updates(fed.sites, LENGTH, seed=6)
    runs = {}
    for attempt in (0, 1):
        cfg = fed.config(LENGTH, attempt=attempt)
        _, _, clients, masked = run_round(fed, cfg, ups, ws)
        runs[attempt] = (cfg, clients, masked)
    v0 = MaskedInput.from_bytes(runs[0][2]["site-00"]).vector
    v1 = MaskedInput.from_bytes(runs[1][2]["site-00"]).vector
    assert np.mean(v0 == v1) < 0.01  # same update, different masks

    # restore a site after it shared and before it masked: the same masked bytes
    fed2 = Fed.make(4)
    cfg = fed2.config(LENGTH)
    clients, server, keysets = to_shares(fed2, cfg)
    ups, ws = random_updates(fed2.sites, LENGTH, seed=8)
    saved = clients["site-01"].state()
    import json

    saved = json.loads(json.dumps(saved))  # through JSON, as on disk
    first = clients["site-01"].mask(ups["site-01"], ws["site-01"], server.shares_for("site-01"))
    restored = SecAggClient.from_state(saved, fed2.identities["site-01"], fed2.roster)
    assert restored.make_keyset() == clients["site-01"].make_keyset()
    assert restored.make_shares(keysets) == clients["site-01"].make_shares(keysets)
    again = restored.mask(ups["site-01"], ws["site-01"], server.shares_for("site-01"))
    assert again == first
    # restored after masking: the same input again is fine, another input is refused
    after = SecAggClient.from_state(restored.state(), fed2.identities["site-01"], fed2.roster)
    assert after.mask(ups["site-01"], ws["site-01"], server.shares_for("site-01")) == first
    with pytest.raises(MaskReuseRefused) as ei:
        after.mask(ups["site-01"] + 1e-3, ws["site-01"], server.shares_for("site-01"))
    assert ei.value.reason == "secagg-mask-reuse"
    with pytest.raises(MaskReuseRefused):
        after.mask(ups["site-01"], ws["site-01"] + 1, server.shares_for("site-01"))


def test_masked_vector_is_uncorrelated_with_the_update():
    """What the coordinator holds for one site looks uniform: correlation with the site's true
    quantized update below 0.01 over 400k coordinates, and the high bit balanced."""
    n, length = 3, 400_000
    fed = Fed.make(n)
    cfg = fed.config(length, clip=1000.0)
    rng = np.random.default_rng(9)
    ups = {s: (rng.standard_normal(length) * 0.5).astype(np.float32) for s in fed.sites}
    ws = dict.fromkeys(fed.sites, 1)
    _, _, clients, masked = run_round(fed, cfg, ups, ws)
    vec = MaskedInput.from_bytes(masked["site-00"]).vector
    signed = vec.view(np.int32).astype(np.float64)
    q = np.round(ups["site-00"].astype(np.float64) * cfg.scale)
    assert abs(np.corrcoef(signed, q)[0, 1]) < 0.01
    assert abs(np.corrcoef(vec.astype(np.float64), q)[0, 1]) < 0.01
    assert abs(np.mean(vec >= 2**31) - 0.5) < 0.005


def test_server_holds_one_model_sized_buffer_and_no_individual_update():
    fed = Fed.make(6)
    cfg, clients, server = _to_masked(fed, length=50_000)
    arrays = [v for v in vars(server).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and arrays[0].nbytes == 50_000 * 4
    nested = [
        v
        for v in vars(server).values()
        if isinstance(v, (dict, list))
        and any(isinstance(x, np.ndarray) for x in (v.values() if isinstance(v, dict) else v))
    ]
    assert nested == []


def test_server_refuses_bad_messages():
    fed = Fed.make(5)
    cfg = fed.config(LENGTH)
    clients = fed.clients(cfg)
    server = SecAggServer(cfg, fed.roster)
    ks = {s: c.make_keyset() for s, c in clients.items()}
    with pytest.raises(ProtocolError) as ei:
        server.add_keyset("site-01", ks["site-00"])
    assert ei.value.reason == "secagg-wrong-sender"
    for s in fed.sites:
        server.add_keyset(s, ks[s])
    server.add_keyset("site-00", ks["site-00"])  # a QoS 1 duplicate: ignored
    keysets = server.close_keysets()
    with pytest.raises(ProtocolError) as ei:
        server.add_keyset("site-00", ks["site-00"])
    assert ei.value.reason == "secagg-out-of-phase"
    bundles = {s: c.make_shares(keysets) for s, c in clients.items()}
    short = dict(list(bundles["site-00"].items())[:2])
    with pytest.raises(ProtocolError) as ei:
        server.add_shares("site-00", short)
    assert ei.value.reason == "secagg-wrong-recipients"
    for s in fed.sites:
        server.add_shares(s, bundles[s])
    server.close_shares()
    ups, ws = random_updates(fed.sites, LENGTH, seed=10)
    # site-00 opens only some of its bundles (a coordinator withholding one): its mask set is off
    partial = dict(list(server.shares_for("site-00").items())[:3])
    wrong = clients["site-00"].mask(ups["site-00"], ws["site-00"], partial)
    with pytest.raises(ProtocolError) as ei:
        server.add_masked_input("site-00", wrong)
    assert ei.value.reason == "secagg-wrong-mask-set"
    good = clients["site-01"].mask(ups["site-01"], ws["site-01"], server.shares_for("site-01"))
    server.add_masked_input("site-01", good)
    server.add_masked_input("site-01", good)  # duplicate: ignored, not added twice
    other = bytearray(good)
    other[-1] ^= 1  # the same header, another vector
    with pytest.raises(ProtocolError) as ei:
        server.add_masked_input("site-01", bytes(other))
    assert ei.value.reason == "secagg-duplicate"
    # a digest the caller verified names the input instead of a hash here: the same digest is a
    # repeat, another one a different input
    good3 = clients["site-03"].mask(ups["site-03"], ws["site-03"], server.shares_for("site-03"))
    server.add_masked_input("site-03", good3, digest=b"signed digest of the message")
    server.add_masked_input("site-03", good3, digest=b"signed digest of the message")
    with pytest.raises(ProtocolError) as ei:
        server.add_masked_input("site-03", good3, digest=b"signed digest of another message")
    assert ei.value.reason == "secagg-duplicate"
    with pytest.raises(ValueError):  # a site refuses a weight beyond the budget itself
        clients["site-02"].mask(ups["site-02"], cfg.max_total_weight + 1, server.shares_for("site-02"))


def test_server_refuses_inputs_past_the_weight_budget():
    fed = Fed.make(4)
    cfg = fed.config(LENGTH, max_total_weight=100)
    clients, server, _ = to_shares(fed, cfg)
    ups, _ = random_updates(fed.sites, LENGTH)
    for s in fed.sites[:2]:
        server.add_masked_input(s, clients[s].mask(ups[s], 45, server.shares_for(s)))
    with pytest.raises(ProtocolError) as ei:
        server.add_masked_input(
            "site-02", clients["site-02"].mask(ups["site-02"], 45, server.shares_for("site-02"))
        )
    assert ei.value.reason == "secagg-weight-over-budget"


def test_tampered_bundle_and_foreign_bundle_do_not_open():
    fed = Fed.make(4)
    cfg, clients, server = _to_masked(fed, n_drop_masked={"site-00"})
    got = server.shares_for("site-00")
    sender = next(iter(got))
    bad = bytearray(got[sender])
    bad[-1] ^= 1
    ups, ws = random_updates(fed.sites, LENGTH)
    with pytest.raises(ProtocolError) as ei:
        clients["site-00"].mask(ups["site-00"], ws["site-00"], {**got, sender: bytes(bad)})
    assert ei.value.reason == "secagg-bad-share-bundle"
    # a bundle addressed to site-01, passed to site-00 under the same sender
    to_other = (
        server._bundles[sender]["site-01"] if sender != "site-01" else server._bundles["site-02"]["site-01"]
    )
    with pytest.raises(ProtocolError):
        clients["site-00"].mask(ups["site-00"], ws["site-00"], {**got, sender: to_other})


def test_bad_share_from_a_revealer_is_survived_or_fails_cleanly():
    fed = Fed.make(10)  # t=6, 9 holders per seed: subsets are tried past a bad share
    cfg, clients, server = _to_masked(fed)
    ups, ws = random_updates(fed.sites, LENGTH, seed=0)
    lst = server.close_inputs()
    for s in fed.sites:
        server.add_echo(s, clients[s].consistency(lst))
    req = server.unmask_request()
    from neurofed.wire.secagg import Reveal

    for s in fed.sites:
        rev = Reveal.from_bytes(clients[s].unmask(req))
        if s == "site-00":  # lies about every share it holds
            rev = Reveal(
                rev.site,
                rev.survivors_digest,
                {p: (i, bytes(SHARE_LEN)) for p, (i, _) in rev.seed_shares.items()},
                {},
            )
        server.add_reveal(s, rev.to_bytes())
    res = server.finish()
    assert np.max(np.abs(res.mean - fedavg(ups, ws, fed.sites, cfg.clip))) < cfg.error_bound
