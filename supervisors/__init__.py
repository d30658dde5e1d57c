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
from supervisors.decisions import Verdict, ask_strategy, decide, settle
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
from supervisors.intensity import RestartIntensity, admit_restart
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
from supervisors.replies import DeferredReplies, reply, reply_error
from supervisors.scope import Scope, plan_scope
from supervisors.strategy import (
    DEFAULT_RESET_AFTER,
    CallableStrategy,
    ExponentialBackoff,
    Policy,
    SupervisorStrategy,
    as_strategy,
    is_hard_error,
    policy_of,
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
    "DeferredReplies",
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
    "Policy",
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
    "Verdict",
    "WhichChildren",
    "admit_restart",
    "as_strategy",
    "ask_child",
    "ask_strategy",
    "check_delay",
    "decide",
    "delay_bounds",
    "is_hard_error",
    "nominal_delay",
    "plan_scope",
    "policy_of",
    "reply",
    "reply_error",
    "settle",
]
