"""RabbitMQ serves STOMP and AMQP clients from one amq.topic exchange:
a mixed fleet works. Both directions, durable and fan-out."""

from __future__ import annotations

import queue
import uuid

import pytest

from deploybus.bus import Delivery, connect
from tests.conftest import broker_url

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("pub,sub", [("rabbitmq-stomp", "rabbitmq-amqp"),
                                     ("rabbitmq-amqp", "rabbitmq-stomp")])
def test_stomp_and_amqp_see_each_other(request: pytest.FixtureRequest, pub: str, sub: str) -> None:
    prefix = f"i{uuid.uuid4().hex[:10]}"
    publisher = connect(broker_url(pub, request, prefix))
    subscriber = connect(broker_url(sub, request, prefix))
    got: queue.Queue[Delivery] = queue.Queue()

    def handler(d: Delivery) -> None:
        d.ack()
        got.put(d)

    try:
        subscriber.subscribe("deploy.events", handler)
        subscriber.subscribe("deploy.requests.web1", handler, queue="agent-web1")
        publisher.publish("deploy.events", b'{"fan": "out"}')
        publisher.publish("deploy.requests.web1", b'{"durable": true}')
        bodies = {got.get(timeout=10).body for _ in range(2)}
        assert bodies == {b'{"fan": "out"}', b'{"durable": true}'}
    finally:
        publisher.close()
        subscriber.close()
