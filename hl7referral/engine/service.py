"""The engine as a Twisted service: store, committer thread, listeners.

``EngineService(config)`` opens and checks the store at construction, so a
bad store fails before the reactor runs, with one readable line. Starting the
service starts listening; ``ready`` fires with the bound addresses (or fails
with :class:`ListenError`). Stopping stops accepting, lets every commit in
flight finish, then closes the store.
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ..config import EngineConfig
from ..store import Checkpointer, Store, StoreError
from .committer import GroupCommitter
from .endpoints import describe_port, is_tls, server_endpoint
from .ingest import Ingest, policy_for
from .mllp import MLLPServerFactory
from .direct_service import DirectService
from .fax_service import FaxService
from .loop_service import LoopService
from .notify_service import NotifyService, make_render
from .processor import Processor
from .return_leg import ReturnService


CHECKPOINT_INTERVAL = 1.0  # seconds between background WAL checkpoints


class ListenError(RuntimeError):
    pass


class EngineService(MultiService):
    log = Logger()

    def __init__(self, config: EngineConfig, reactor=None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.store = Store.open(config.store_path, busy_timeout_ms=config.busy_timeout_ms, autocheckpoint=False)
        self.checkpointer = Checkpointer(config.store_path, config.busy_timeout_ms)
        self._checkpoints = LoopingCall(self._checkpoint)
        self._checkpoints.clock = reactor
        self.committer = GroupCommitter(self.store, lambda f, *a: reactor.callFromThread(f, *a))
        self.processor = Processor(config, self.committer, reactor) \
            if any(c.mapping or c.tracker for c in config.channels) else None
        after_mapping = frozenset(c.name for c in config.channels if c.ack_mode == "after-mapping")
        self.listeners: list[tuple[object, MLLPServerFactory, object]] = []
        for lc in config.listeners:
            channels = config.channels_for(lc.name)
            ingest = Ingest(lc.name, policy_for(lc, channels), self.committer, reactor, lc.on_store_failure,
                            trace=config.log_level == "debug", processor=self.processor,
                            after_mapping=after_mapping)
            factory = MLLPServerFactory(lc, ingest, reactor, tls=is_tls(lc.endpoint))
            self.listeners.append((lc, factory, server_endpoint(reactor, lc.endpoint, lc.base_dir)))
        # The transport thread gets its own connection: a shared one lets its
        # reads (SAVEPOINTs in sqlite-utils) break the writer's transactions.
        self.transport_store = Store.open(config.store_path, busy_timeout_ms=config.busy_timeout_ms,
                                          autocheckpoint=False)
        self.direct = DirectService(config, self.transport_store, reactor)
        self.direct.setServiceParent(self)
        # Fax has its own thread and connection too: a gateway that takes 30 s to answer
        # must not hold up Direct sends or MDNs.
        self.fax_store = Store.open(config.store_path, busy_timeout_ms=config.busy_timeout_ms, autocheckpoint=False)
        self.fax = FaxService(config, self.fax_store, reactor)
        self.fax.setServiceParent(self)
        self.direct.on_fax = self.fax.tick
        # The loop tracker writes through the committer (the writer's connection).
        self.loop = LoopService(config, self.committer, self.store, reactor, render=make_render(config))
        self.loop.setServiceParent(self)
        self.returns = ReturnService(config, self.committer, reactor)   # the note back to the referring chart
        self.returns.setServiceParent(self)
        self.loop.on_note = self.returns.on_note
        self.direct.on_note = self.returns.on_note
        self.direct.on_forward = self.returns.on_forward   # the specialist's side: a referral for our EHR
        # Notifications leave on their own thread and connection: a slow relay holds up nothing else.
        self.notify_store = Store.open(config.store_path, busy_timeout_ms=config.busy_timeout_ms,
                                       autocheckpoint=False)
        self.notify = NotifyService(config, self.notify_store, reactor)
        self.notify.setServiceParent(self)
        if self.processor is not None:
            self.processor.on_ready = self.direct.dispatch
            self.processor.loop = self.loop
            self.loop.on_release = self.processor.release
        self.ports: list = []
        self.ready: Deferred = Deferred()

    def startService(self) -> None:
        super().startService()
        self.committer.start()
        if self.processor is not None:
            self.processor.start()
        self._checkpoints.start(CHECKPOINT_INTERVAL, now=False)
        attempts = []
        if self.config.fax.callback_endpoint:
            attempts.append(self.fax.listen_callbacks().addErrback(self._fax_listen_failed))
        for lc, factory, endpoint in self.listeners:
            d = endpoint.listen(factory)
            d.addErrback(self._listen_failed, lc)
            attempts.append(d)
        done = DeferredList(attempts, fireOnOneErrback=True, consumeErrors=True)
        done.addCallbacks(self._listening, lambda f: self.ready.errback(f.value.subFailure))

    def _listen_failed(self, failure, lc):
        if failure.check(CannotListenError):
            reason = failure.value.socketError
            raise ListenError(f"cannot listen on {lc.endpoint}: {getattr(reason, 'strerror', reason)}")
        raise ListenError(f"cannot listen on {lc.endpoint}: {failure.getErrorMessage()}")

    def _fax_listen_failed(self, failure):
        raise ListenError(f"cannot listen on {self.config.fax.callback_endpoint} (fax.callbacks.endpoint): "
                          f"{failure.getErrorMessage()}")

    def _listening(self, results) -> None:
        bound = []
        if self.config.fax.callback_endpoint:
            results = results[1:]
        for (lc, factory, _), (_, port) in zip(self.listeners, results):
            self.ports.append(port)
            bound.append((lc, describe_port(port)))
            self.log.info("listening on {addr} ({name}, {kind}), channels: {channels}", addr=describe_port(port),
                          name=lc.name, kind="tls" if factory.tls else lc.endpoint.split(":")[0],
                          channels=", ".join(c.name for c in self.config.channels_for(lc.name)) or "none")
        self.ready.callback(bound)

    @inlineCallbacks
    def stopService(self):
        yield super().stopService()
        for port in self.ports:
            yield port.stopListening()
        for _, factory, _ in self.listeners:
            for proto in list(factory.connections):
                if proto.transport is not None:
                    proto.transport.loseConnection()
        if self.processor is not None:
            self.processor.stop()  # documents not yet saved are rebuilt at the next start
        # Let the commits already queued finish: their messages are on disk.
        yield self.committer.idle()
        self.committer.stop()
        if self._checkpoints.running:
            self._checkpoints.stop()
        try:
            self.checkpointer.run("TRUNCATE")
        except StoreError as exc:
            self.log.warn("final checkpoint: {error}", error=str(exc))
        self.checkpointer.close()
        self.transport_store.close()
        self.fax_store.close()
        self.notify_store.close()
        self.store.close()

    def _checkpoint(self):
        # Off the reactor and off the writer thread: copying WAL frames into the
        # database costs an fsync of its own that no commit should wait for.
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.checkpointer.run)
        d.addErrback(lambda f: self.log.warn("checkpoint: {error}", error=f.getErrorMessage()))
        return d

    def counts(self) -> dict[str, dict[str, int]]:
        return {lc.name: {**factory.ingest.counts, **factory.counts} for lc, factory, _ in self.listeners}
