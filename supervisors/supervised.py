"""Children that report to their supervisor: `SupervisedActor`, and the reporting
that `ChildSpec.for_actor` mixes into any plain pykka actor."""

from __future__ import annotations

from typing import Any

from loguru import logger
from pykka import ActorDeadError, ActorRef

from supervisors._pykka import CrashFinish, LifecycleActor
from supervisors.messages import ChildExited, ChildFailed
from supervisors.replies import DeferringActor


class Reporter(LifecycleActor):
    """Tells `_supervisors_report_to()` how the actor ended, once.

    An exception in `on_start`, in handling a told message, or in `on_stop` is a
    failure (with that exception); a normal stop is a normal exit.
    """

    _supervisors_exit_reported = False

    def _supervisors_report_to(self) -> ActorRef[Any] | None:
        return None

    def _supervisors_cleanup(self) -> None:
        """Runs before pykka's own crash handling, on the first crash only."""

    def _supervisors_notify(self, message: ChildFailed | ChildExited) -> bool:
        parent = self._supervisors_report_to()
        if parent is None:
            return False
        try:
            parent.tell(message)
        except ActorDeadError:
            return False
        return True

    def _supervisors_crashed(self, error: BaseException, finish: CrashFinish) -> None:
        first_report = not self._supervisors_exit_reported
        self._supervisors_exit_reported = True
        if first_report:
            try:
                self._supervisors_cleanup()
            except Exception:
                logger.exception("cleanup after a crash failed in {}", self)
        finish()
        if first_report:
            self._supervisors_notify(ChildFailed(self.actor_urn, error, alive=False))

    def _supervisors_stopped(self) -> None:
        if not self._supervisors_exit_reported:
            self._supervisors_exit_reported = True
            self._supervisors_notify(ChildExited(self.actor_urn))


class SupervisedActor(DeferringActor, Reporter):
    """A pykka `ThreadingActor` that tells its supervisor how it ends.

    - an exception in `on_start`, in handling a told message, or in `on_stop`
      reports a failure (pykka itself does not call `on_failure` for `on_start`);
    - a normal stop reports a normal exit, which only permanent children get
      restarted for;
    - `report_failure(error)` reports a failure while the actor stays alive; the
      supervisor then restarts it in place by calling `on_restart()` in the
      actor's own thread, and its ref and mailbox stay valid;
    - `defer_reply()` answers an ask later (see `supervisors.replies`).

    Without a parent (`parent=None`) it is an ordinary actor. Any other pykka
    actor can be supervised too, through `ChildSpec.for_actor`, but only a
    `SupervisedActor` can report a failure it caught itself.
    """

    def __init__(self, *args: Any, parent: ActorRef[Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parent = parent

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
        return self._supervisors_notify(message)

    def _supervisors_report_to(self) -> ActorRef[Any] | None:
        return self.parent

    def _supervisors_cleanup(self) -> None:
        self._before_abnormal_exit()

    def _before_abnormal_exit(self) -> None:
        """Hook for subclasses that own resources to release when the actor crashes."""

    def _die(self, error: BaseException) -> bool:
        """Stop this actor, reporting `error` instead of a normal exit.

        Returns False if no supervisor heard about it.
        """
        self._supervisors_exit_reported = True
        heard = self._notify(ChildFailed(self.actor_urn, error, alive=False))
        self.stop()
        return heard
