"""The supervisor actor: a thin shell that moves messages and applies the pure policies."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import pykka
from loguru import logger
from pykka import ActorDeadError, ActorRef, Future
from pykka.messages import ProxyCall

from supervisors.any_actor import StartActor
from supervisors.child import (
    ChildCounts,
    ChildRecord,
    ChildSpec,
    ChildState,
    ChildStatus,
    RestartType,
)
from supervisors.clock import Clock, MonotonicClock, TimerHandle
from supervisors.decisions import decide
from supervisors.directives import Directive, Restart, Resume, Stop
from supervisors.errors import (
    ChildNotFound,
    ChildUnavailable,
    DuplicateChild,
    EscalatedFailure,
    NormalExit,
    SupervisorError,
    SupervisorShutDown,
    SupervisorStopped,
)
from supervisors.failure import EscalationEvent, Failure
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
from supervisors.replies import ReplyRelay
from supervisors.scope import plan_scope
from supervisors.stash import Stashed
from supervisors.strategy import SupervisorStrategy, as_strategy, policy_of
from supervisors.supervised import SupervisedActor

DEFAULT_STASH_LIMIT = 100
DEFAULT_STOP_TIMEOUT = 5.0
CONCURRENT_STOP_WINDOW = 32
"""With ``stop_concurrently``, how many children are told to stop at once; the next is
told as the oldest finishes. Telling a thousand at once makes a thousand threads
runnable together, and their GIL hand-offs cost more than the stops themselves
(1,000 serve links: 2.1 s all at once, 1.3 s with a window of 16 to 64)."""

StrategyLike = SupervisorStrategy | Callable[[Failure], Directive] | None
EscalationHandler = Callable[[EscalationEvent], None]


class Supervisor(SupervisedActor):
    """A pykka actor that starts, watches and restarts its children.

    `Supervisor.start(strategy=..., children=[ChildSpec(...)], clock=None,
    on_escalation=None, parent=None, name=None, stash_limit=100, stop_timeout=5.0,
    stop_concurrently=False)`: with `stop_concurrently`, children stopped together (at
    shutdown, or the siblings of a one-for-all restart) are told in a window of
    `CONCURRENT_STOP_WINDOW` at once and waited for together (for independent
    children; OTP's reverse order, one at a time, otherwise).
    A supervisor is itself a `SupervisedActor`, so a ChildSpec whose start is
    `lambda parent: Supervisor.start(..., parent=parent)` nests it in a tree.

    It reads the strategy's policy (`scope`, `reset_after`, `max_restarts`,
    `within`) once, here, with `policy_of`; `decide` is asked on every failure.
    In its own thread (a subclass's handlers), `child_status(id)` and
    `child_statuses()` read its children's state; from elsewhere ask
    `WhichChildren()`.
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
        stop_concurrently: bool = False,
    ) -> None:
        super().__init__(parent=parent)
        # OTP's order (reverse start order, one child at a time) by default: a
        # child may depend on one started before it. Children known to be
        # independent (a daemon's links) are told many at once, so stopping a
        # thousand does not take the sum of all their times.
        self._stop_concurrently = stop_concurrently
        self.strategy = as_strategy(strategy)
        self.policy = policy_of(self.strategy)
        self.name = name or f"supervisor-{self.actor_urn.rsplit('-', 1)[-1][:8]}"
        self._owns_clock = clock is None
        self.clock: Clock = clock if clock is not None else MonotonicClock(f"{self.name}-timer")
        self._on_escalation = on_escalation
        self._stash_limit = stash_limit
        self._stop_timeout = stop_timeout
        self._restart_times: tuple[float, ...] = ()
        self._records: dict[str, ChildRecord] = {}
        for spec in children:
            if spec.id in self._records:
                raise DuplicateChild(spec.id, self.name)
            self._records[spec.id] = ChildRecord(spec, stash_limit)
        self._timers: dict[int, TimerHandle] = {}
        self._timer_keys = itertools.count()
        self._shut_down = False
        self._log = logger.bind(supervisor=self.name)

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
            # A request that fails raises its typed error to an asker; the same
            # request merely told must not take the whole tree down with it.
            if self.replying_to_asker():
                raise
            self._log.warning("told request {!r} failed: {}", message, error)
            return None

    def _on_request(self, message: Any) -> Any:
        if self._shut_down and isinstance(message, StartChild | RestartChild):
            # Queued before the escalation's stop: acting on it would start
            # children that nobody stops, on a clock already closed.
            raise SupervisorShutDown(self.name, message)
        if isinstance(message, WhichChildren):
            return self.child_statuses()
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

    # -- reading the children, in the supervisor's own thread -------------------

    def child_status(self, child_id: str) -> ChildStatus:
        """The status of one child, as a `WhichChildren()` row; raises ChildNotFound.

        Not thread-safe: call it in this actor's thread (its handlers, `on_start`,
        a subclass's methods); from other threads ask `WhichChildren()`.
        """
        return self._record(child_id).status(self.clock.now(), self.policy.reset_after)

    def child_statuses(self) -> list[ChildStatus]:
        """Every child's status in start order: what `WhichChildren()` answers."""
        now = self.clock.now()
        return [r.status(now, self.policy.reset_after) for r in self._records.values()]

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
        self._child_failed(record, notice.error)

    def _on_child_exited(self, notice: ChildExited) -> None:
        record = self._record_by_urn(notice.child_urn)
        if record is None or self._shut_down:
            return
        record.forget_ref()
        if record.state is not ChildState.RUNNING:
            return
        if record.spec.restart is RestartType.PERMANENT:
            self._child_failed(record, NormalExit(record.id))
            return
        self._log.bind(child=record.id).info(
            "{} child stopped normally; not restarting it", record.spec.restart.value
        )
        record.mark_stopped()
        self._fail_stash(record, ChildUnavailable(record.id, "stopped", None))

    # -- the decision ----------------------------------------------------------

    def _child_failed(self, record: ChildRecord, error: BaseException) -> None:
        now = self.clock.now()
        log = self._log.bind(child=record.id)
        failure = record.record_failure(error, now, self.policy.reset_after)
        verdict = decide(
            self.strategy,
            self.policy,
            failure,
            alive=record.alive,
            restart_type=record.spec.restart,
            restart_times=self._restart_times,
        )
        self._restart_times = verdict.restart_times
        directive = verdict.directive
        if verdict.broken is not None:
            log.opt(exception=verdict.broken.__cause__).error("{}", verdict.broken)
        if verdict.resumed_dead:
            log.warning("a dead child cannot be resumed; replacing it now")
        if isinstance(directive, Resume):
            log.info("failure #{} resumed: {!r}", failure.consecutive_failures, error)
        elif isinstance(directive, Restart):
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
            record.last_error = verdict.failure.error
            self._escalate(record, verdict.failure, whole_supervisor=verdict.whole_supervisor)

    def _schedule_restart(self, record: ChildRecord, delay: float, now: float) -> None:
        start_order = list(self._records)
        affected = [self._records[i] for i in plan_scope(self.policy.scope, record.id, start_order)]
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
                    "restarting with {!r} ({})", record.id, self.policy.scope.value
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
            self._child_failed(record, error)
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
        """Stop in reverse start order, each within its timeout (a window at once if concurrent)."""
        position = {child_id: index for index, child_id in enumerate(self._records)}
        stopping: deque[tuple[ChildRecord, Future[bool], float]] = deque()
        for record in sorted(records, key=lambda r: position.get(r.id, -1), reverse=True):
            ref = record.ref
            # Forget the ref first: the exit notice the child sends while
            # stopping must not look like a failure.
            # An escalated child keeps saying why it is down.
            record.mark_stopped(ChildState.FAILED if record.state is ChildState.FAILED else state)
            if ref is None or not ref.is_alive():
                continue
            timeout = record.spec.stop_timeout or self._stop_timeout
            if not self._stop_concurrently:
                try:
                    ref.stop(block=True, timeout=timeout)
                except pykka.Timeout:
                    self._abandoned(record, timeout)
                continue
            if len(stopping) >= CONCURRENT_STOP_WINDOW:
                self._await_stopped(stopping.popleft())
            stopping.append((record, ref.stop(block=False), time.monotonic() + timeout))
        while stopping:
            self._await_stopped(stopping.popleft())

    def _await_stopped(self, stopping: tuple[ChildRecord, Future[bool], float]) -> None:
        record, stopped, deadline = stopping
        try:
            stopped.get(timeout=max(0.0, deadline - time.monotonic()))
        except pykka.Timeout:
            self._abandoned(record, record.spec.stop_timeout or self._stop_timeout)
        except ActorDeadError:
            pass  # it was already stopping: gone either way

    def _abandoned(self, record: ChildRecord, timeout: float) -> None:
        self._log.bind(child=record.id).warning("did not stop within {} s; abandoning it", timeout)

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
        relay = ReplyRelay()
        try:
            self._route(self._record(request.child_id), Stashed(request.message, relay))
        except SupervisorError as error:
            relay.fail(error)
        return relay.future

    @staticmethod
    def _reports_its_end(record: ChildRecord) -> bool:
        """Whether the child tells this supervisor how it ended."""
        if isinstance(record.spec.start, StartActor):
            return True
        return record.ref is not None and issubclass(record.ref.actor_class, SupervisedActor)

    def _route(self, record: ChildRecord, item: Stashed) -> None:
        if record.state is ChildState.RUNNING and not record.alive and record.ref is not None:
            if not self._reports_its_end(record):
                # A pykka child started by hand, not through ChildSpec.for_actor,
                # cannot report its death; notice it here.
                dead = record.ref
                record.forget_ref()
                self._child_failed(record, ActorDeadError(f"{dead} is dead"))
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
        # The child answers into the ask's own future (an ActorDeadError if it is
        # dead); the relay hands that future to the original asker, so the
        # supervisor never waits for the answer.
        item.reply.forward(ref.ask(item.message, block=False))

    def _flush_stash(self, record: ChildRecord) -> None:
        ref = record.ref
        if ref is None:
            return
        for item in record.stash.drain():
            self._deliver(record, ref, item)

    def _fail_stash(self, record: ChildRecord, error: SupervisorError) -> None:
        for item in record.stash.drain():
            if item.reply is not None:
                item.reply.fail(error)
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
