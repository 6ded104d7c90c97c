"""A client of the gateway's JSON protocol for the Python suites: numbered commands whose
replies are matched by id, and deliveries queued as they come in between."""

import asyncio
import json

from websockets.asyncio.client import connect

TIMEOUT = 30.0


class GatewayClient:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 1
        self.deliveries = []

    @classmethod
    async def open(cls, url, **kwargs):
        """Connect to `url` (…/ws, with any query)."""
        options = dict(open_timeout=TIMEOUT, close_timeout=5, ping_interval=None, max_size=None)
        options.update(kwargs)
        return cls(await connect(url, **options))

    async def recv(self):
        return json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))

    async def command(self, op, **fields):
        """Send a command and return its reply; deliveries that come first are kept."""
        cid = self.next_id
        self.next_id += 1
        await self.ws.send(json.dumps({"id": cid, "op": op, **fields}))
        while True:
            msg = await self.recv()
            if msg.get("id") == cid:
                return msg
            self.deliveries.append(msg)

    async def delivery(self):
        """The next delivery (a message with a sequence number)."""
        if self.deliveries:
            return self.deliveries.pop(0)
        while True:
            msg = await self.recv()
            if "seq" in msg and "ok" not in msg:
                return msg

    async def close(self):
        await self.ws.close()
