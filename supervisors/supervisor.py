"""The supervisor actor: a thin shell that moves messages and applies the pure policies."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pykka
from loguru import logger
from pykka import ActorDeadError, ActorRef, Future
from pykka._envelope import Envelope
from pykka.messages import ProxyCall

from supervisors.child import ChildCounts, ChildRecord, ChildSpec, ChildState, RestartType
from supervisors.clock import Clock, MonotonicClock, TimerHandle
from supervisors.delays import check_delay
from supervisors.directives import Directive, Escalate, Restart, Resume, Stop
from supervisors.errors import (
    BrokenStrategy,
    ChildNotFound,
    ChildUnavailable,
    DuplicateChild,
    EscalatedFailure,
    NormalExit,
    RestartIntensityExceeded,
    SupervisorError,
    SupervisorShutDown,
    SupervisorStopped,
)
from supervisors.failure import EscalationEvent, Failure
from supervisors.intensity import RestartIntensity
from supervisors.messages import (
    AskChild,
    ChildExited,
    ChildFailed,
    CountChildren,
    GetChild,
    ResetBackoff,
    RestartChild,
    RestartDue,
    SendToChild,
    StartChild,
    StopChild,
    WhichChildren,
)
from supervisors.scope import plan_scope
from supervisors.stash import Stashed
from supervisors.strategy import SupervisorStrategy, as_strategy
from supervisors.supervised import SupervisedActor

DEFAULT_STASH_LIMIT = 100
DEFAULT_STOP_TIMEOUT = 5.0

StrategyLike = SupervisorStrategy | Callable[[Failure], Directive] | None
EscalationHandler = Callable[[EscalationEvent], None]


class _AskAwareInbox(queue.Queue[Any]):
    """Remembers whether the envelope being handled was asked.

    A request that fails raises its typed error to an asker; the same request
    merely told must not take the whole supervision tree down with it.
    """

    last_was_ask = False

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        envelope = super().get(block, timeout)
        self.last_was_ask = getattr(envelope, "reply_to", None) is not None
        return envelope


def _exc_info(error: BaseException) -> tuple[type[BaseException], BaseException, None]:
    return type(error), error, None


class Supervisor(SupervisedActor):
    """A pykka actor that starts, watches and restarts its children.

    `Supervisor.start(strategy=..., children=[ChildSpec(...)], clock=None,
    on_escalation=None, parent=None, name=None, stash_limit=100, stop_timeout=5.0)`.
    A supervisor is itself a `SupervisedActor`, so a ChildSpec whose start is
    `lambda parent: Supervisor.start(..., parent=parent)` nests it in a tree.
    """

    def __init__(
        self,
        strategy: StrategyLike = None,
        children: Iterable[ChildSpec] = (),
        clock: Clock | None = None,
        on_escalation: EscalationHandler | None = None,
        parent: ActorRef[Any] | None = None,
        *,
        name: str | None = None,
        stash_limit: int = DEFAULT_STASH_LIMIT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        super().__init__(parent=parent)
        self.strategy = as_strategy(strategy)
        self.name = name or f"supervisor-{self.actor_urn.rsplit('-', 1)[-1][:8]}"
        self._owns_clock = clock is None
        self.clock: Clock = clock if clock is not None else MonotonicClock(f"{self.name}-timer")
        self._on_escalation = on_escalation
        self._stash_limit = stash_limit
        self._stop_timeout = stop_timeout
        self._intensity = RestartIntensity(self.strategy.max_restarts, self.strategy.within)
        self._records: dict[str, ChildRecord] = {}
        for spec in children:
            if spec.id in self._records:
                raise DuplicateChild(spec.id, self.name)
            self._records[spec.id] = ChildRecord(spec, stash_limit)
        self._timers: dict[int, TimerHandle] = {}
        self._timer_keys = itertools.count()
        self._shut_down = False
        self._log = logger.bind(supervisor=self.name)

    @staticmethod
    def _create_actor_inbox() -> _AskAwareInbox:
        return _AskAwareInbox()

    def __str__(self) -> str:
        return f"Supervisor {self.name!r} ({self.actor_urn})"

    # -- lifecycle -------------------------------------------------------------

    def on_start(self) -> None:
        self._log.info(
            "starting with {} children, strategy {!r}", len(self._records), self.strategy
        )
        for record in list(self._records.values()):
            self._start_from_spec(record, restarted=False)

    def on_stop(self) -> None:
        self._shutdown(SupervisorStopped)

    def _before_abnormal_exit(self) -> None:
        self._shutdown(SupervisorStopped)

    def _shutdown(self, why: type[SupervisorStopped]) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._stop_children(list(self._records.values()))
        for record in self._records.values():
            self._fail_stash(record, why(self.name, record.id))
        if self._owns_clock and isinstance(self.clock, MonotonicClock):
            self.clock.close()
        self._log.info("stopped")

    # -- message dispatch ------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, ChildFailed):
            return self._on_child_failed(message)
        if isinstance(message, ChildExited):
            return self._on_child_exited(message)
        if isinstance(message, RestartDue):
            return self._on_restart_due(message)
        if isinstance(message, AskChild):
            return self._ask_child(message)
        try:
            return self._on_request(message)
        except SupervisorError as error:
            if getattr(self.actor_inbox, "last_was_ask", True):
                raise
            self._log.warning("told request {!r} failed: {}", message, error)
            return None

    def _on_request(self, message: Any) -> Any:
        if self._shut_down and isinstance(message, StartChild | RestartChild):
            # Queued before the escalation's stop: acting on it would start
            # children that nobody stops, on a clock already closed.
            raise SupervisorShutDown(self.name, message)
        now = self.clock.now()
        if isinstance(message, WhichChildren):
            return [r.status(now, self.strategy.reset_after) for r in self._records.values()]
        if isinstance(message, CountChildren):
            return self._count_children()
        if isinstance(message, GetChild):
            record = self._record(message.child_id)
            return record.ref if record.alive else None
        if isinstance(message, SendToChild):
            self._route(self._record(message.child_id), Stashed(message.message))
            return None
        if isinstance(message, StartChild):
            return self._start_child(message.spec)
        if isinstance(message, StopChild):
            return self._stop_child(message.child_id, delete=message.delete)
        if isinstance(message, RestartChild):
            return self._restart_child(self._record(message.child_id))
        if isinstance(message, ResetBackoff):
            self._record(message.child_id).reset_backoff()
            self._log.bind(child=message.child_id).info("backoff reset by request")
            return None
        return super().on_receive(message)

    def _record(self, child_id: str) -> ChildRecord:
        try:
            return self._records[child_id]
        except KeyError:
            raise ChildNotFound(child_id, self.name, self._records) from None

    def _record_by_urn(self, urn: str) -> ChildRecord | None:
        for record in self._records.values():
            if record.ref is not None and record.ref.actor_urn == urn:
                return record
        return None

    # -- notices from children -------------------------------------------------

    def _on_child_failed(self, notice: ChildFailed) -> None:
        record = self._record_by_urn(notice.child_urn)
        if record is None or self._shut_down:
            return
        if not notice.alive:
            record.forget_ref()
        if record.state is not ChildState.RUNNING:
            # Already waiting for a restart (a second report, or the reporting
            # actor died meanwhile): the pending restart covers it.
            return
        self._handle_failure_of(record, notice.error)

    def _on_child_exited(self, notice: ChildExited) -> None:
        record = self._record_by_urn(notice.child_urn)
        if record is None or self._shut_down:
            return
        record.forget_ref()
        if record.state is not ChildState.RUNNING:
            return
        if record.spec.restart is RestartType.PERMANENT:
            self._handle_failure_of(record, NormalExit(record.id))
            return
        self._log.bind(child=record.id).info(
            "{} child stopped normally; not restarting it", record.spec.restart.value
        )
        record.mark_stopped()
        self._fail_stash(record, ChildUnavailable(record.id, "stopped", None))

    # -- the decision ----------------------------------------------------------

    def _handle_failure_of(self, record: ChildRecord, error: BaseException) -> None:
        now = self.clock.now()
        log = self._log.bind(child=record.id)
        failure = record.record_failure(error, now, self.strategy.reset_after)
        decided = self._decide(failure)
        if isinstance(decided, BrokenStrategy):
            log.opt(exception=decided.__cause__).error("{}", decided)
            record.last_error = decided
            self._escalate(record, attrs.evolve(failure, error=decided), whole_supervisor=False)
            return
        directive = decided
        if isinstance(directive, Resume):
            if record.alive:
                log.info("failure #{} resumed: {!r}", failure.consecutive_failures, error)
                return
            log.warning("a dead child cannot be resumed; replacing it now")
            directive = Restart(0.0)
        if isinstance(directive, Restart) and record.spec.restart is RestartType.TEMPORARY:
            directive = Stop()
        if isinstance(directive, Restart) and not self._intensity.allow(now):
            limit = self._intensity
            assert limit.max_restarts is not None
            error = RestartIntensityExceeded(record.id, limit.max_restarts, limit.within)
            failure = Failure(
                child_id=record.id,
                error=error,
                consecutive_failures=failure.consecutive_failures,
                uptime=failure.uptime,
                restart_history=failure.restart_history,
                previous_delay=failure.previous_delay,
                at=now,
            )
            record.last_error = error
            self._escalate(record, failure, whole_supervisor=True)
            return
        if isinstance(directive, Restart):
            log.warning(
                "failure #{} ({!r}); restarting in {:.3f} s",
                failure.consecutive_failures,
                error,
                directive.delay,
            )
            self._schedule_restart(record, directive.delay, now)
        elif isinstance(directive, Stop):
            log.warning(
                "failure #{} ({!r}); stopping the child", failure.consecutive_failures, error
            )
            self._stop_children([record])
            self._fail_stash(record, ChildUnavailable(record.id, "stopped", error))
        else:
            self._escalate(record, failure, whole_supervisor=False)

    def _decide(self, failure: Failure) -> Directive | BrokenStrategy:
        """Ask the strategy; anything but a valid directive is a BrokenStrategy."""
        strategy = self.strategy
        try:
            directive: object = strategy.decide(failure)
        except Exception as raised:
            broken = BrokenStrategy(strategy, failure.child_id, failure.error, f"raised {raised!r}")
            broken.__cause__ = raised
            return broken
        if not isinstance(directive, Resume | Restart | Stop | Escalate):
            return BrokenStrategy(
                strategy,
                failure.child_id,
                failure.error,
                f"returned {directive!r} ({type(directive).__name__}), which is not a directive",
            )
        if isinstance(directive, Restart):
            # Restart checks its delay when built; this catches one that got
            # past it (a subclass, object.__setattr__) before it reaches a timer.
            try:
                check_delay(directive.delay, "Restart delay")
            except (TypeError, ValueError) as bad:
                broken = BrokenStrategy(
                    strategy, failure.child_id, failure.error, f"returned {directive!r}: {bad}"
                )
                broken.__cause__ = bad
                return broken
        return directive

    def _schedule_restart(self, record: ChildRecord, delay: float, now: float) -> None:
        start_order = list(self._records)
        affected = [
            self._records[i] for i in plan_scope(self.strategy.scope, record.id, start_order)
        ]
        siblings = [r for r in affected if r is not record and r.state is ChildState.RUNNING]
        self._stop_children(siblings)
        group: list[tuple[str, int]] = []
        due = now + delay
        for member in affected:
            if member is record:
                group.append((member.id, member.mark_restarting(due, delay)))
            elif member in siblings:
                if member.spec.restart is RestartType.TEMPORARY:
                    self._fail_stash(member, ChildUnavailable(member.id, "stopped", None))
                    continue
                self._log.bind(child=member.id).info(
                    "restarting with {!r} ({})", record.id, self.strategy.scope.value
                )
                group.append((member.id, member.mark_restarting(due, None)))
        key = next(self._timer_keys)
        due_message = RestartDue(tuple(group), key)
        try:
            timer = self.clock.call_later(delay, lambda: self._tell_self(due_message))
        except Exception as clock_error:
            # Without a timer the children just marked restarting would wait
            # forever: a supervisor that cannot keep time gives up as a whole.
            self._log.bind(child=record.id).opt(exception=True).error(
                "clock {!r} refused a {!r} s restart timer; escalating", self.clock, delay
            )
            failure = Failure(
                child_id=record.id,
                error=clock_error,
                consecutive_failures=record.consecutive_failures,
                uptime=0.0,
                restart_history=tuple(record.restart_history),
                previous_delay=record.last_delay,
                at=now,
            )
            record.last_error = clock_error
            self._escalate(record, failure, whole_supervisor=True)
            return
        self._timers[key] = timer

    def _tell_self(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except ActorDeadError:
            pass

    def _on_restart_due(self, due: RestartDue) -> None:
        self._timers.pop(due.timer_key, None)
        if self._shut_down:
            return
        for child_id, generation in due.children:
            record = self._records.get(child_id)
            if (
                record is not None
                and record.generation == generation
                and record.state is ChildState.RESTARTING
            ):
                self._restart_now(record)

    def _restart_now(self, record: ChildRecord) -> ActorRef[Any] | None:
        ref = record.ref
        if ref is not None and ref.is_alive() and issubclass(ref.actor_class, SupervisedActor):
            try:
                ref.tell(ProxyCall(attr_path=("_run_on_restart",), args=(), kwargs={}))
            except ActorDeadError:
                record.forget_ref()
            else:
                record.mark_running(ref, self.clock.now(), restarted=True)
                self._log.bind(child=record.id).info(
                    "restarted in place (restart #{})", record.restarts
                )
                self._flush_stash(record)
                return ref
        self._stop_children([record], state=record.state)
        return self._start_from_spec(record, restarted=True)

    def _start_from_spec(self, record: ChildRecord, *, restarted: bool) -> ActorRef[Any] | None:
        log = self._log.bind(child=record.id)
        try:
            ref = record.spec.start(self.actor_ref)
            if not isinstance(ref, ActorRef):
                raise TypeError(
                    f"ChildSpec {record.id!r}: start(parent) must return the child's "
                    f"ActorRef, got {ref!r}"
                )
        except Exception as error:
            log.warning("start failed: {!r}", error)
            # A start that raises is a child that failed right away.
            record.mark_running(None, self.clock.now(), restarted=restarted)
            self._handle_failure_of(record, error)
            return None
        record.mark_running(ref, self.clock.now(), restarted=restarted)
        if restarted:
            log.info("restarted from its spec (restart #{})", record.restarts)
        else:
            log.info("started")
        self._flush_stash(record)
        return ref

    def _escalate(self, record: ChildRecord, failure: Failure, *, whole_supervisor: bool) -> None:
        error = failure.error
        self._stop_children([record], state=ChildState.FAILED)
        self._fail_stash(record, ChildUnavailable(record.id, "failed", error))
        if whole_supervisor:
            self._stop_children([r for r in self._records.values() if r is not record])
        if self.parent is not None:
            self._log.bind(child=record.id).warning(
                "escalating {!r} to the parent supervisor", error
            )
            self._shutdown(SupervisorStopped)
            if self._die(EscalatedFailure(self.name, record.id, error)):
                return
        escalated = EscalatedFailure(self.name, record.id, error)
        event = EscalationEvent(
            supervisor=self.name,
            child_id=record.id,
            error=error,
            failure=failure,
            path=escalated.path,
            root_cause=escalated.root_cause,
        )
        self._log.bind(child=record.id, path="/".join(event.path)).error(
            "escalation reached the root: child {!r} failed with {!r} (root cause {!r})",
            record.id,
            error,
            event.root_cause,
        )
        if self._on_escalation is not None:
            try:
                self._on_escalation(event)
            except Exception:
                self._log.exception("on_escalation handler raised")

    # -- stopping --------------------------------------------------------------

    def _stop_children(
        self, records: list[ChildRecord], state: ChildState = ChildState.STOPPED
    ) -> None:
        """Stop in reverse start order, each within its timeout."""
        order = list(self._records.values())
        for record in sorted(records, key=order.index, reverse=True):
            ref = record.ref
            # Forget the ref first: the exit notice the child sends while
            # stopping must not look like a failure.
            # An escalated child keeps saying why it is down.
            record.mark_stopped(ChildState.FAILED if record.state is ChildState.FAILED else state)
            if ref is None or not ref.is_alive():
                continue
            timeout = record.spec.stop_timeout or self._stop_timeout
            try:
                ref.stop(block=True, timeout=timeout)
            except pykka.Timeout:
                self._log.bind(child=record.id).warning(
                    "did not stop within {} s; abandoning it", timeout
                )

    def _stop_child(self, child_id: str, *, delete: bool) -> None:
        record = self._record(child_id)
        self._stop_children([record])
        self._fail_stash(record, ChildUnavailable(child_id, "stopped", None))
        self._log.bind(child=child_id).info(
            "stopped by request{}", " and deleted" if delete else ""
        )
        if delete:
            del self._records[child_id]

    # -- dynamic children ------------------------------------------------------

    def _start_child(self, spec: ChildSpec) -> ActorRef[Any] | None:
        if spec.id in self._records:
            raise DuplicateChild(spec.id, self.name)
        record = ChildRecord(spec, self._stash_limit)
        try:
            ref = spec.start(self.actor_ref)
            if not isinstance(ref, ActorRef):
                raise TypeError(f"ChildSpec {spec.id!r}: start(parent) must return an ActorRef")
        except Exception as error:
            self._log.bind(child=spec.id).warning("StartChild failed: {!r}", error)
            raise
        self._records[spec.id] = record
        record.mark_running(ref, self.clock.now(), restarted=False)
        self._log.bind(child=spec.id).info("started by request")
        return ref

    def _restart_child(self, record: ChildRecord) -> ActorRef[Any] | None:
        if record.state is ChildState.RUNNING and record.alive:
            record.mark_restarting(self.clock.now(), None)
        return self._restart_now(record)

    def _count_children(self) -> ChildCounts:
        live = [r.ref for r in self._records.values() if r.alive and r.ref is not None]
        supervisors = sum(1 for ref in live if issubclass(ref.actor_class, Supervisor))
        return ChildCounts(
            specs=len(self._records),
            active=len(live),
            supervisors=supervisors,
            workers=len(live) - supervisors,
            restarting=sum(1 for r in self._records.values() if r.state is ChildState.RESTARTING),
        )

    # -- messages through the supervisor ----------------------------------------

    def _ask_child(self, request: AskChild) -> Future[Any]:
        reply: Future[Any] = self._create_future()
        try:
            self._route(self._record(request.child_id), Stashed(request.message, reply))
        except SupervisorError as error:
            reply.set_exception(_exc_info(error))
        return reply

    def _route(self, record: ChildRecord, item: Stashed) -> None:
        if record.state is ChildState.RUNNING and not record.alive and record.ref is not None:
            if not issubclass(record.ref.actor_class, SupervisedActor):
                # A plain pykka child cannot report its death; notice it here.
                dead = record.ref
                record.forget_ref()
                self._handle_failure_of(record, ActorDeadError(f"{dead} is dead"))
        if record.state is ChildState.RUNNING and record.alive and record.ref is not None:
            self._deliver(record, record.ref, item)
        elif record.state is ChildState.RUNNING or record.state is ChildState.RESTARTING:
            # RUNNING without a live actor: its failure notice is still on its way.
            record.stash.push(item)
        else:
            raise ChildUnavailable(record.id, record.state.value, record.last_error)

    def _deliver(self, record: ChildRecord, ref: ActorRef[Any], item: Stashed) -> None:
        if item.reply is None:
            try:
                ref.tell(item.message)
            except ActorDeadError:
                self._log.bind(child=record.id).warning(
                    "child died before {!r} could be delivered", item.message
                )
            return
        if not ref.is_alive():
            item.reply.set_exception(_exc_info(ActorDeadError(f"{ref} is dead")))
            return
        # Envelope is what ActorRef.ask puts in the inbox; using it directly lets
        # the child answer the original asker without the supervisor waiting.
        ref.actor_inbox.put(Envelope(item.message, reply_to=item.reply))

    def _flush_stash(self, record: ChildRecord) -> None:
        ref = record.ref
        if ref is None:
            return
        for item in record.stash.drain():
            self._deliver(record, ref, item)

    def _fail_stash(self, record: ChildRecord, error: SupervisorError) -> None:
        for item in record.stash.drain():
            if item.reply is not None:
                item.reply.set_exception(_exc_info(error))
            else:
                self._log.bind(child=record.id).warning(
                    "dropping stashed message {!r}: {}", item.message, error
                )


def ask_child(
    supervisor: ActorRef[Any], child_id: str, message: Any, timeout: float | None = None
) -> Any:
    """Ask `message` of a supervised child through its supervisor and wait for the answer.

    While the child restarts the message waits in the supervisor's stash; raises
    StashOverflow, ChildUnavailable, ChildNotFound, or pykka.Timeout.
    """
    reply: Future[Any] = supervisor.ask(AskChild(child_id, message), timeout=timeout)
    return reply.get(timeout=timeout)
