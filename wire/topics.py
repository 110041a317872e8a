"""MQTT topic names (design.md section 3) and their parsing.

nf/<fed>/task                                  TASK, retained, one packet
nf/<fed>/roster                                ROSTER, retained, one packet
nf/<fed>/status/<site>                         STATUS, one packet (also the MQTT will)
nf/<fed>/model/<round>/<msg>/<chunk>           MODEL chunks (retained for the current round)
nf/<fed>/receipts/<round>/<msg>/<chunk>        RECEIPTS
nf/<fed>/update/<site>/<round>/<msg>/<chunk>   UPDATE chunks
nf/<fed>/metrics/<site>/<round>/<msg>/<chunk>  METRICS
nf/<fed>/secagg/<site>/<round>/<msg>/<chunk>   SECAGG (secure aggregation steps of a site)
nf/<fed>/relay/<round>/<msg>/<chunk>           RELAY (secure aggregation steps for every site)
"""

from __future__ import annotations

from dataclasses import dataclass

from neurofed.wire.api import COORDINATOR, MessageKind
from neurofed.wire.errors import ProtocolError

SINGLE_PACKET = {MessageKind.TASK, MessageKind.STATUS, MessageKind.ROSTER}
_PER_SITE = {MessageKind.UPDATE, MessageKind.METRICS, MessageKind.SECAGG}


def prefix(federation: str) -> str:
    return f"nf/{federation}"


def topic_for(federation: str, kind: MessageKind, sender: str, round: int, msg_id: str, index: int) -> str:
    p = prefix(federation)
    if kind is MessageKind.TASK:
        return f"{p}/task"
    if kind is MessageKind.ROSTER:
        return f"{p}/roster"
    if kind is MessageKind.STATUS:
        return f"{p}/status/{sender}"
    if kind in _PER_SITE:
        return f"{p}/{kind}/{sender}/{round}/{msg_id}/{index}"
    return f"{p}/{kind}/{round}/{msg_id}/{index}"


def subscriptions(federation: str, role: str) -> list[str]:
    p = prefix(federation)
    if role == "coordinator":
        # model/# only to learn which retained model chunks exist (to clear old rounds).
        return [f"{p}/update/#", f"{p}/metrics/#", f"{p}/secagg/#", f"{p}/status/#", f"{p}/model/#"]
    return [f"{p}/task", f"{p}/roster", f"{p}/model/#", f"{p}/receipts/#", f"{p}/relay/#", f"{p}/status/#"]


@dataclass(frozen=True)
class TopicInfo:
    federation: str
    kind: MessageKind
    sender: str | None  # None where the topic does not name one (coordinator kinds: the coordinator)
    round: int | None
    msg_id: str | None
    index: int | None


def _int(text: str) -> int:
    if not text.isdigit() or len(text) > 10:
        raise ValueError(text)
    return int(text)


def parse_topic(topic: str) -> TopicInfo:
    parts = topic.split("/")
    try:
        if len(parts) < 3 or parts[0] != "nf":
            raise ValueError
        fed, kind = parts[1], MessageKind(parts[2])
        rest = parts[3:]
        if kind in (MessageKind.TASK, MessageKind.ROSTER) and not rest:
            return TopicInfo(fed, kind, COORDINATOR, None, None, None)
        if kind is MessageKind.STATUS and len(rest) == 1:
            return TopicInfo(fed, kind, rest[0], None, None, None)
        if kind in _PER_SITE and len(rest) == 4:
            return TopicInfo(fed, kind, rest[0], _int(rest[1]), rest[2], _int(rest[3]))
        if kind in (MessageKind.MODEL, MessageKind.RECEIPTS, MessageKind.RELAY) and len(rest) == 3:
            return TopicInfo(fed, kind, COORDINATOR, _int(rest[0]), rest[1], _int(rest[2]))
    except ValueError:
        pass
    raise ProtocolError("bad-topic", f"topic {topic!r} is not a neurofed topic")
