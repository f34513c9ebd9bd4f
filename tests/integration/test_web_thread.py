"""``/metrics`` is served from a thread of its own: a scrape does not wait for the main loop."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from pathlib import Path

import pytest

from agents.app import create_app
from agents.embedded import EmbeddedRedis, free_port
from agents.settings import Settings
from tests.conftest import metric_samples


@pytest.mark.integration
def test_metrics_answer_while_the_main_loop_is_blocked(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    port = free_port()
    settings = Settings(
        redis_url=redis_server.url,
        redis_prefix="webthread",
        web_port=port,
        data_dir=str(tmp_path),
        identity_key="test",
    )
    app = create_app(settings, partitions=4)
    answered = threading.Event()
    pages: list[bytes] = []

    def scrape() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as response:
            pages.append(response.read())
        answered.set()

    async def main() -> None:
        await app.web.start()
        try:
            threading.Thread(target=scrape, daemon=True).start()
            # Blocks this loop (as a long step does) until the scrape is answered: a page served
            # by this loop could not answer before the wait gave up.
            assert answered.wait(timeout=20), "/metrics waited for the main loop"
        finally:
            await app.web.stop()

    asyncio.run(main())
    # Read from Redis by the web thread's own client (an asyncio client belongs to one loop).
    assert metric_samples(pages[0].decode())["kpi_store_up"] == {frozenset(): 1.0}
