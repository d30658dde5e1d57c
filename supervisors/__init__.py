"""Supervision for pykka actors: strategies, exponential backoff, escalation, trees."""

from supervisors.backoff import JitterKind, RandomSource, delay_bounds, nominal_delay
from supervisors.child import (
    ChildCounts,
    ChildSpec,
    ChildState,
    ChildStatus,
    RestartType,
)
from supervisors.clock import Clock, MonotonicClock, TimerHandle
from supervisors.delays import MAX_DELAY_SECONDS, check_delay
from supervisors.directives import Directive, Escalate, Restart, Resume, Stop
from supervisors.errors import (
    BrokenStrategy,
    ChildNotFound,
    ChildUnavailable,
    DuplicateChild,
    EscalatedFailure,
    NormalExit,
    RestartIntensityExceeded,
    StashOverflow,
    SupervisorError,
    SupervisorShutDown,
    SupervisorStopped,
)
from supervisors.failure import EscalationEvent, Failure
from supervisors.intensity import RestartIntensity
from supervisors.messages import (
    AskChild,
    CountChildren,
    GetChild,
    ResetBackoff,
    RestartChild,
    SendToChild,
    StartChild,
    StopChild,
    WhichChildren,
)
from supervisors.scope import Scope, plan_scope
from supervisors.strategy import (
    DEFAULT_RESET_AFTER,
    CallableStrategy,
    ExponentialBackoff,
    SupervisorStrategy,
    as_strategy,
    is_hard_error,
)
from supervisors.supervised import SupervisedActor
from supervisors.supervisor import Supervisor, ask_child

__all__ = [
    "DEFAULT_RESET_AFTER",
    "MAX_DELAY_SECONDS",
    "AskChild",
    "BrokenStrategy",
    "CallableStrategy",
    "ChildCounts",
    "ChildNotFound",
    "ChildSpec",
    "ChildState",
    "ChildStatus",
    "ChildUnavailable",
    "Clock",
    "CountChildren",
    "Directive",
    "DuplicateChild",
    "Escalate",
    "EscalatedFailure",
    "EscalationEvent",
    "ExponentialBackoff",
    "Failure",
    "GetChild",
    "JitterKind",
    "MonotonicClock",
    "NormalExit",
    "RandomSource",
    "ResetBackoff",
    "Restart",
    "RestartChild",
    "RestartIntensity",
    "RestartIntensityExceeded",
    "RestartType",
    "Resume",
    "Scope",
    "SendToChild",
    "StartChild",
    "StashOverflow",
    "Stop",
    "StopChild",
    "SupervisedActor",
    "Supervisor",
    "SupervisorError",
    "SupervisorShutDown",
    "SupervisorStopped",
    "SupervisorStrategy",
    "TimerHandle",
    "WhichChildren",
    "as_strategy",
    "ask_child",
    "check_delay",
    "delay_bounds",
    "is_hard_error",
    "nominal_delay",
    "plan_scope",
]
