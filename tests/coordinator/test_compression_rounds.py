"""--compression int8 / int8-topk through the round loop and the site agent over the in-memory
hub: the sites rebuild the coordinator's model to the byte round after round, keep their
error-feedback residual across a restart, and a site that missed rounds gets the whole model."""

from __future__ import annotations

import hashlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from neurofed.coordinator.errors import CoordinatorError
from neurofed.coordinator.rounds import RoundConfig
from neurofed.coordinator.strategies import STRATEGIES
from neurofed.launch.local import read_events
from neurofed.wire import compression as c
from neurofed.wire.api import COORDINATOR, MessageKind
from neurofed.wire.memory import MemoryHub
from tests.coordinator.helpers import (
    ShiftTrainer,
    finish,
    initial_weights,
    make_coordinator,
    run_in_thread,
    start_agent,
)


class NoisyTrainer(ShiftTrainer):
    """'Training' adds a different small random change every round (8-bit rounding and top-k
    really lose something, unlike a constant shift)."""

    def __init__(self, seed: int, num_train_cases: int = 2):
        super().__init__(shift=0.0, num_train_cases=num_train_cases)
        self.seed = seed
        self.changes: list[dict[str, np.ndarray]] = []

    def change(self, state_dict, k):
        rng = np.random.default_rng([self.seed, k])
        return {
            name: (rng.normal(size=tuple(v.shape)) * 1e-2).astype(np.float32)
            for name, v in state_dict.items()
            if v.is_floating_point()
        }

    def train(self, state_dict, epochs, **kw):
        import torch

        self.trained += 1
        ch = self.change(state_dict, self.trained)
        self.changes.append(ch)
        out = {k: (v + torch.from_numpy(ch[k]) if k in ch else v.clone()) for k, v in state_dict.items()}
        return SimpleNamespace(state_dict=out, num_cases=self.num_train_cases, loss=0.1, seconds=0.0, steps=3)


def _finish(t, box, stop, timeout=120):
    return finish(t, box, stop, timeout)


def _held_digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("codec", c.DELTA_CODECS)
def test_sites_and_coordinator_agree_on_the_model_after_ten_quantized_rounds(tmp_path, codec):
    hub = MemoryHub("testfed")
    stop = threading.Event()
    sites = ("site-a", "site-b")
    coord = make_coordinator(hub, tmp_path / "coord", sites, rounds=10, compression=codec, final_eval=False)
    for i, s in enumerate(sites):
        start_agent(hub, s, NoisyTrainer(seed=i), tmp_path, stop)
    results = _finish(*run_in_thread(coord), stop)
    assert [len(r.sites) for r in results] == [2] * 10 and not any(r.rejected for r in results)
    want = c.digest(coord.reconstructed)
    assert all(_held_digest(tmp_path / s) == want for s in sites)
    # every round after the first sent a delta against the previous one, named by the rebuilt model
    announced = [e for e in read_events(tmp_path / "coord") if e["event"] == "announce"]
    assert [e["model_encoding"] for e in announced] == ["full"] + [c.ENCODING[codec]] * 9
    # the global model and what the sites hold differ by the undelivered part only (small)
    gap = max(float(np.abs(coord.weights[k] - coord.reconstructed[k]).max()) for k in ("w", "b"))
    assert gap < 0.05, gap


def test_every_strategy_takes_int8_updates(tmp_path):
    names = [n for n in STRATEGIES if n != "fedopt"]
    for name in names:
        hub = MemoryHub("testfed")
        stop = threading.Event()
        sites = ("site-a", "site-b", "site-c")
        coord = make_coordinator(
            hub,
            tmp_path / name / "coord",
            sites,
            rounds=2,
            compression="int8",
            final_eval=False,
            strategy=name,
        )
        for i, s in enumerate(sites):
            start_agent(hub, s, NoisyTrainer(seed=i), tmp_path / name, stop)
        results = _finish(*run_in_thread(coord), stop)
        assert [len(r.sites) for r in results] == [3, 3] and all(r.aggregated for r in results), name
        assert not any(r.rejected for r in results), (name, [r.rejected for r in results])


def test_the_error_feedback_residual_survives_a_site_restart(tmp_path):
    """Round 1's update leaves a residual in the site's state folder; the restarted site adds it
    to round 2's change, so what the coordinator received over both rounds plus what is left is
    the sum of the two changes exactly."""
    hub = MemoryHub("testfed")
    coord = hub.endpoint(COORDINATOR)
    coord.start()
    w0 = {k: v for k, v in initial_weights().items()}
    w0["w"] = np.random.default_rng(5).normal(size=(64, 40)).astype(np.float32)  # >1024: top-k applies

    def publish(r, payload, meta, digest):
        coord.send(
            MessageKind.MODEL,
            r,
            meta={"round": r, "model_digest": digest, **meta},
            payload=payload,
            retain=True,
        )
        coord.send(
            MessageKind.TASK,
            r,
            meta={"round": r, "model_digest": digest, "train": True, "epochs": 1, "sites": {},
                  "session": "s1", "compression": "int8-topk", "topk_density": 0.05},
            retain=True,
        )  # fmt: skip

    def update_of(r, timeout=10.0):
        end = time.time() + timeout
        while time.time() < end:
            m = coord.receive(timeout=0.1)
            if m is not None and m.kind is MessageKind.UPDATE and m.round == r:
                return m
        raise AssertionError(f"no update for round {r}")

    from neurofed.edge_node.agent import SiteAgent

    def agent(trainer):
        ep = hub.endpoint("site-a")
        ep.start()
        return SiteAgent(ep, trainer, tmp_path / "site-a", resend_after=60)

    full = c.canonical(w0)
    publish(1, full, {"encoding": "full"}, hashlib.sha256(full).hexdigest())
    t1 = NoisyTrainer(seed=3)
    a1 = agent(t1)
    for _ in range(4):
        a1.step(timeout=0.2)
    u1 = update_of(1)
    assert u1.meta["encoding"] == "int8-topk-delta"
    residual_file = tmp_path / "site-a" / "residual-r0001.safetensors"
    assert residual_file.is_file(), "the residual is kept with the round's stored update"
    a1.ep.close()

    # round 2: the coordinator's delta (nothing changed: zero delta) against the model sent
    r1 = {k: np.array(v) for k, v in w0.items()}
    delta = {k: (np.zeros_like(v) if v.dtype.kind == "f" else v) for k, v in r1.items()}
    p2 = c.encode_delta(delta, "int8-topk")
    r2 = c.apply_delta(r1, p2)
    publish(2, p2, {"encoding": "int8-topk-delta", "base_digest": c.digest(r1)}, c.digest(r2))
    t2 = NoisyTrainer(seed=3)
    t2.trained = 1  # the same stream of changes as one process would have drawn
    a2 = agent(t2)  # a new process: the residual comes from the state folder only
    for _ in range(4):
        a2.step(timeout=0.2)
    u2 = update_of(2)
    sent = [c.decode_delta(u.payload, w0)["w"] for u in (u1, u2)]
    from safetensors.numpy import load_file

    left = load_file(str(tmp_path / "site-a" / "residual-r0002.safetensors"))["w"]
    true_total = t1.changes[0]["w"] + t2.changes[0]["w"]
    np.testing.assert_allclose(sent[0] + sent[1] + left, true_total, atol=1e-6)
    # round 2's update carried round 1's residual: without it the books would be off by that much
    r1_left = t1.changes[0]["w"] - sent[0]
    assert np.abs(r1_left).max() > 1e-3
    assert not residual_file.exists(), "the superseded residual is dropped once round 2's is stored"


def test_a_site_that_missed_rounds_gets_the_whole_model(tmp_path):
    """site-c takes part in round 1, is down for rounds 2 and 3 (the others carry on at quorum),
    and comes back holding round 1's model: round 4's delta does not apply, it asks, the
    coordinator sends the whole model once, and site-c trains from it."""
    hub = MemoryHub("testfed")
    stop = threading.Event()
    sites = ("site-a", "site-b", "site-c")
    coord = make_coordinator(
        hub, tmp_path / "coord", sites, rounds=5, min_sites=2, timeout=1.5, compression="int8",
        final_eval=False,
    )  # fmt: skip
    for i, s in enumerate(sites[:2]):
        start_agent(hub, s, NoisyTrainer(seed=i), tmp_path, stop)
    stop_c = threading.Event()
    trainer_c = NoisyTrainer(seed=9)
    train_once = trainer_c.train

    def train_and_go_down(*a, **kw):  # site-c goes down right after round 1 (this step still sends)
        stop_c.set()
        return train_once(*a, **kw)

    trainer_c.train = train_and_go_down
    agent_c, thread_c = start_agent(hub, "site-c", trainer_c, tmp_path, stop_c)
    t, box = run_in_thread(coord)
    end = time.time() + 30
    thread_c.join(30)
    agent_c.ep.close()
    held_r1 = _held_digest(tmp_path / "site-c")
    while len(coord.results) < 3 and time.time() < end + 30:
        time.sleep(0.05)
    trainer_c2 = NoisyTrainer(seed=9)
    start_agent(hub, "site-c", trainer_c2, tmp_path, stop)  # back, with round 1's model on disk
    results = _finish(t, box, stop)
    assert "site-c" in results[0].sites and "site-c" not in results[1].sites + results[2].sites
    assert "site-c" in results[-1].sites, [r.sites for r in results]
    assert trainer_c2.trained >= 1
    fulls = [e for e in read_events(tmp_path / "coord") if e["event"] == "full-model"]
    assert fulls and fulls[0]["site"] == "site-c" and len({e["round"] for e in fulls}) == len(fulls)
    assert _held_digest(tmp_path / "site-c") == c.digest(coord.reconstructed) != held_r1


def test_compression_settings_are_checked():
    base = {"rounds": 1, "expected_sites": ("a",), "min_sites": 1}
    with pytest.raises(CoordinatorError, match="--compression must be one of"):
        RoundConfig(**base, compression="zip")
    with pytest.raises(CoordinatorError, match="--fp16 is --compression fp16"):
        RoundConfig(**base, compression="int8", fp16=True)
    with pytest.raises(CoordinatorError, match="continue-global"):
        RoundConfig(**base, compression="int8", site_optimizer="continue-global")
    assert RoundConfig(**base, fp16=True).compression == "fp16"
    assert RoundConfig(**base, compression="fp16").fp16
