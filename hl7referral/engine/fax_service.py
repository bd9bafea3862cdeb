"""The fax transport as a Twisted service: the agent's thread, its timer, the callback listener.

It moves time and HTTP requests around :class:`~hl7referral.engine.fax.FaxAgent`: the
agent's work (rendering, gateway calls, store writes) runs on one thread of its own with
its own store connection, so a slow gateway never holds up MLLP or Direct; the timer runs
on the injected clock (a ``twisted.internet.task.Clock`` in tests).

Invariants
----------
* One tick at a time: a tick that comes while the last one runs is skipped, so a row is
  submitted again only after the previous attempt's outcome is recorded.
* A status callback is answered 200 only after it is committed (refused ones get 400, a
  store failure 503 so that the gateway sends it again); applying it comes after.
* Callback bodies over :data:`MAX_CALLBACK` bytes are refused (413) unread.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ..config import EngineConfig
from ..store import Store
from ..store.outbox import Outbox
from .fax import FaxAgent

TICK = 1.0            # seconds between checks of the fax outbox
MAX_CALLBACK = 2 ** 20


class FaxService(Service):
    log = Logger()

    def __init__(self, config: EngineConfig, store: Store, reactor, *, clock=None, interval: float = TICK,
                 gateways=None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        self.outbox = Outbox(store)
        self.agent = FaxAgent(config.fax, self.outbox, {c.name: c for c in config.channels}, gateways=gateways)
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="hl7referral-fax")
        self.loop = LoopingCall(self.tick)
        self.loop.clock = self.clock
        self.interval = interval
        self.port = None
        self._ticking = False

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.loop.start(self.interval, now=True)
        routes = ", ".join(f"{ch or 'default'}: {r.name}" for ch, r in sorted(self.agent.routes.items()))
        self.log.info("fax: gateways {routes}", routes=routes or "none (fax sends fail with an alert)")

    def listen_callbacks(self) -> Deferred:
        """Start the status-callback listener ([fax.callbacks] endpoint); fires with the port."""
        from .smtp_server import listen  # the engine's one endpoint parser (tcp:, ssl:, unix:)
        root = Resource()
        fax = Resource()
        root.putChild(b"fax", fax)
        fax.putChild(b"callback", _Callbacks(self))
        d = listen(self.reactor, self.config.fax.callback_endpoint, Site(root))

        def listening(port):
            self.port = port
            self.log.info("fax: status callbacks on {addr}", addr=port.getHost())
            open_to = [r.ident for r in self.agent.routes.values() if r.gateway.supports_callbacks
                       and not getattr(r.gateway, "callback_token_env", "")]
            if open_to and getattr(port.getHost(), "host", "") not in ("127.0.0.1", "::1"):
                # Anyone who reaches the listener could mark a fax delivered.
                self.log.warn("fax: callbacks for {routes} carry no shared secret (callback_token_env) and the "
                              "listener is not on loopback", routes=", ".join(sorted(set(open_to))))
            return port
        return d.addCallback(listening)

    @inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self.loop.running:
            self.loop.stop()
        if self.port is not None:
            yield self.port.stopListening()
        self.pool.stop()

    def _thread(self, fn, *args) -> Deferred:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def tick(self) -> Deferred | None:
        if self._ticking:
            return None
        self._ticking = True
        d = self._thread(self.agent.tick, self.clock.seconds())
        d.addErrback(lambda f: self.log.failure("fax tick failed", f))

        def done(result):
            self._ticking = False
            return result
        return d.addBoth(done)

    def store_callback(self, channel: str, body: bytes, headers: dict[str, str]) -> Deferred:
        return self._thread(self.agent.store_callback, channel, body, headers, self.clock.seconds())


class _Callbacks(Resource):
    """``POST /fax/callback/<channel>``: a gateway's status callback for a channel's faxes."""

    def __init__(self, service: FaxService) -> None:
        super().__init__()
        self.service = service

    def getChild(self, path: bytes, request):
        return _ChannelCallback(self.service, path.decode("utf-8", "replace"))


class _ChannelCallback(Resource):
    isLeaf = True

    def __init__(self, service: FaxService, channel: str) -> None:
        super().__init__()
        self.service = service
        self.channel = channel

    def render_POST(self, request):
        body = request.content.read(MAX_CALLBACK + 1)
        if len(body) > MAX_CALLBACK:
            request.setResponseCode(413)
            return b"callback too large\n"
        headers = {k.decode("latin-1").lower(): v[0].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        d = self.service.store_callback(self.channel, body, headers)
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))  # the gateway hung up: answer no one

        def stored(result):
            if gone:
                return
            cid, refused = result
            if refused:
                request.setResponseCode(400)
                request.write(f"refused: {refused}\n".encode())
            else:
                request.write(f"ok {cid}\n".encode())
                self.service.tick()
            request.finish()

        def failed(failure):
            self.service.log.failure("fax callback for {channel} not stored", failure, channel=self.channel)
            if gone:
                return
            request.setResponseCode(503)
            request.write(b"not stored; send it again\n")
            request.finish()
        d.addCallbacks(stored, failed)
        return NOT_DONE_YET
