"""
Rule reloads (SIGHUP): re-read the rule files off the reactor thread, one
reload at a time, put the new rules in force and close the connections they
deny once quiet.  L{echotw.service.EchoService} holds one L{RuleReloader}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.drain import QuietCloser, connections
from echotw.factory import EchoFactory
from echotw.protocol import LINGER_TIMEOUT
from echotw.rules.files import RuleFileError, RuleSource
from echotw.rules.policy import AccessRules

RELOAD_GRACE = LINGER_TIMEOUT
"""
Seconds a connection denied by a reload is still echoed while it keeps
sending, before it is closed gracefully anyway.
"""


class RuleReloader:
    """
    Reloads of C{ruleSource} into C{factory.rules}, coalesced: reloads asked
    for while one runs become one more.  A file that fails keeps the old
    rules in force; open connections that the new rules deny are closed by
    C{closer} (shared with the shutdown drain, which stops it) within
    L{RELOAD_GRACE} seconds.

    @ivar ruleSource: where the rules come from; L{None} or a source without
        files makes a reload a logged no-op.
    @ivar threads: the reactor whose thread pool reads the files, or L{None}
        to read them in the reactor thread.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        factory: EchoFactory,
        closer: QuietCloser,
        ruleSource: RuleSource | None = None,
        threads: IReactorThreads | None = None,
        log: Logger | None = None,
    ) -> None:
        """
        @param log: where the reload events go; the owning service passes its
            own, so that the events keep its namespace.
        """
        self.factory = factory
        self.closer = closer
        self.ruleSource = ruleSource
        self.threads = threads
        if log is not None:
            self._log = log
        self._reloading: Deferred[bool] | None = None
        self._reloadAgain = False

    def requestReload(self) -> Deferred[bool]:
        """
        Reload the rule files (SIGHUP), reading them off the reactor thread;
        a request made while a reload is running adds one more reload after
        it, however many requests come in the meantime.  Fires with whether
        the last reload put new rules in force.
        """
        if self._reloading is not None:
            self._reloadAgain = True
            return self._reloading
        source = self._filesToReload()
        if source is None:
            return succeed(False)
        if self.threads is None:
            loading: Deferred[AccessRules] = maybeDeferred(source.load)
        else:
            loading = deferToThreadPool(self.threads, self.threads.getThreadPool(), source.load)
        done: Deferred[bool] = Deferred()
        self._reloading = done

        def loaded(rules: AccessRules) -> bool:
            self.applyRules(rules)
            return True

        def failed(failure: Failure) -> bool:
            error = failure.trap(RuleFileError) and failure.value
            assert isinstance(error, RuleFileError)
            self._reloadFailed(error)
            return False

        def next(result: bool) -> None:
            self._reloading = None
            if self._reloadAgain:
                self._reloadAgain = False
                self.requestReload().chainDeferred(done)
            else:
                done.callback(result)

        loading.addCallbacks(loaded, failed).addCallback(next)
        return done

    def reload(self) -> bool:
        """
        Re-read the rule files now, in the reactor thread; return whether
        the new rules are in force.
        """
        source = self._filesToReload()
        if source is None:
            return False
        try:
            rules = source.load()
        except RuleFileError as e:
            self._reloadFailed(e)
            return False
        self.applyRules(rules)
        return True

    def _filesToReload(self) -> RuleSource | None:
        """
        The rule source to re-read, or L{None} (and a line saying so) when
        there are no rule files.
        """
        if self.ruleSource is None or not self.ruleSource.hasFiles:
            self._log.info("SIGHUP: no rule files to reload", event="reload-skipped")
            return None
        return self.ruleSource

    def _reloadFailed(self, error: Exception) -> None:
        self._log.error(
            "Rules not reloaded, the previous ones stay in force: {error}",
            event="reload-failed",
            error=str(error),
        )

    def applyRules(self, rules: AccessRules) -> None:
        """
        Put C{rules} in force, and close the open connections they deny once
        they are quiet.
        """
        factory = self.factory
        factory.rules = rules
        denied = [
            p
            for p in list(factory.protocols)
            if p.peer is not None and not p.finishing and rules(p.peer, p.listener) is not None
        ]
        self.closer.close(denied, "denied by reload", RELOAD_GRACE)
        self._log.info(
            "Rules reloaded: {allow} allow and {deny} deny networks; "
            "closing {closed} {connections} they deny",
            event="reloaded",
            allow=len(rules.allow),
            deny=len(rules.deny),
            closed=len(denied),
            connections=connections(len(denied)),
        )
