"""Base class for children that report to their supervisor."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import pykka
from loguru import logger
from pykka import ActorDeadError, ActorRef

from supervisors.messages import ChildExited, ChildFailed


class SupervisedActor(pykka.ThreadingActor):
    """A pykka `ThreadingActor` that tells its supervisor how it ends.

    - an exception in `on_start`, in handling a told message, or in `on_stop`
      reports a failure (pykka itself does not call `on_failure` for `on_start`);
    - a normal stop reports a normal exit, which only permanent children get
      restarted for;
    - `report_failure(error)` reports a failure while the actor stays alive; the
      supervisor then restarts it in place by calling `on_restart()` in the
      actor's own thread, and its ref and mailbox stay valid.

    Without a parent (`parent=None`) it is an ordinary actor.
    """

    def __init__(self, *args: Any, parent: ActorRef[Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parent = parent
        self._exit_reported = False

    @property
    def supervised(self) -> bool:
        return self.parent is not None

    def report_failure(self, error: BaseException) -> None:
        """Tell the supervisor this actor failed but is still alive.

        Safe to call from any thread. The supervisor's strategy decides: usually
        `on_restart()` is called after the backoff delay; on Stop or Escalate the
        actor is stopped. Calling it again before the restart is ignored.
        """
        if not self._notify(ChildFailed(self.actor_urn, error, alive=True)):
            logger.bind(actor=str(self)).warning(
                "failure reported with no supervisor to handle it: {!r}", error
            )

    def on_restart(self) -> None:
        """Hook: the supervisor restarts this live actor after a reported failure.

        Runs in the actor's own thread, after the restart delay, before any
        message stashed for it by the supervisor. Raising reports a new failure.
        """

    def _run_on_restart(self) -> None:
        # Reached through a pykka ProxyCall told by the supervisor, so it runs in
        # this actor's thread; an escaping exception would kill the actor instead
        # of reporting a failure of the restart.
        try:
            self.on_restart()
        except Exception as error:
            logger.bind(actor=str(self)).warning("on_restart failed: {!r}", error)
            self.report_failure(error)

    def _notify(self, message: ChildFailed | ChildExited) -> bool:
        if self.parent is None:
            return False
        try:
            self.parent.tell(message)
        except ActorDeadError:
            return False
        return True

    def _before_abnormal_exit(self) -> None:
        """Hook for subclasses that own resources to release when the actor crashes."""

    def _die(self, error: BaseException) -> bool:
        """Stop this actor, reporting `error` instead of a normal exit.

        Returns False if no supervisor heard about it.
        """
        self._exit_reported = True
        heard = self._notify(ChildFailed(self.actor_urn, error, alive=False))
        self.stop()
        return heard

    # pykka calls _handle_failure whenever the actor dies from an exception:
    # in on_start (where on_failure is never called), while handling a told
    # message, and in on_stop. It is the one place that sees every crash.
    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        first_report = not self._exit_reported
        self._exit_reported = True
        if first_report:
            try:
                self._before_abnormal_exit()
            except Exception:
                logger.exception("cleanup after a crash failed in {}", self)
        super()._handle_failure(exception_type, exception_value, traceback)
        if first_report:
            error = exception_value or RuntimeError(f"{self} died from {exception_type!r}")
            self._notify(ChildFailed(self.actor_urn, error, alive=False))

    def _stop(self) -> None:
        super()._stop()
        if not self._exit_reported:
            self._exit_reported = True
            self._notify(ChildExited(self.actor_urn))
