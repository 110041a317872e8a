"""The local launcher's port picker: ports a server can still bind seconds later."""

from __future__ import annotations

import socket

from neurofed.procs import _ephemeral_range, free_port


def test_free_port_is_bindable_and_outside_the_ephemeral_range() -> None:
    lo, hi = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(not lo <= p <= hi for p in ports), (lo, hi, sorted(ports))
    assert len(ports) > 10, "random picks, so parallel runs rarely collide"
    for p in list(ports)[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_port_skips_a_port_someone_listens_on(monkeypatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken, taken, taken + 1 if taken + 1 < 65536 else taken - 1])

        class Rng:
            def choice(self, spans):
                return spans[0]

            def randrange(self, a, b):
                return next(picks)

        import random

        monkeypatch.setattr(random, "SystemRandom", Rng)
        got = free_port()
        assert got != taken and abs(got - taken) == 1
