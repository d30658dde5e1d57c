"""Typed errors: the hard/transient split and wire codes of PROTOCOL.md section 4."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror_actors.wire import (
    ClusterIdMismatch,
    ErrorCode,
    HandshakeTimeout,
    HistoryDiverged,
    LinkNotConnected,
    MalformedFrame,
    MirrorError,
    MirrorPromoted,
    ObserverRoleViolation,
    ProtocolVersionMismatch,
    SnapshotTooLarge,
    SourceOverloaded,
    SourceShutdown,
    TlsVerificationError,
    TransportError,
    UnknownDatabase,
    error_for_code,
)

# One instance of every error class, with its expected class and wire code.
SAMPLES: list[tuple[MirrorError, bool, ErrorCode | None]] = [
    (ClusterIdMismatch("us-east", "eu-west"), True, ErrorCode.CLUSTER_ID),
    (ObserverRoleViolation("REQUEST_VOTE received"), True, ErrorCode.OBSERVER_ONLY),
    (ProtocolVersionMismatch(1, "source speaks 2"), True, ErrorCode.BAD_VERSION),
    (UnknownDatabase("orders", "us-east"), True, ErrorCode.UNKNOWN_DATABASE),
    (TlsVerificationError("unknown CA", hint="configure ca_file"), True, None),
    (MirrorPromoted("operator promoted it"), True, None),
    (MalformedFrame("bad bytes"), False, ErrorCode.MALFORMED),
    (SourceShutdown("stopping"), False, ErrorCode.SOURCE_SHUTDOWN),
    (HistoryDiverged("ahead of the log", lsn=100, mirror_term=1), True, ErrorCode.DIVERGED),
    (SourceOverloaded("stalled"), False, ErrorCode.OVERLOADED),
    (SnapshotTooLarge(10 << 30, 1 << 30), True, None),
    (HandshakeTimeout(2.5, "127.0.0.1:4433"), False, None),
    (TransportError("connection lost", quic_error_code=0x1A), False, None),
    (LinkNotConnected("send Connect"), False, None),
]
IDS = [type(error).__name__ for error, _, _ in SAMPLES]


def test_error_code_values_match_section_4() -> None:
    assert {code.name: int(code) for code in ErrorCode} == {
        "NONE": 0x00,
        "CLUSTER_ID": 0x01,
        "OBSERVER_ONLY": 0x02,
        "BAD_VERSION": 0x03,
        "UNKNOWN_DATABASE": 0x04,
        "MALFORMED": 0x05,
        "SOURCE_SHUTDOWN": 0x06,
        "DIVERGED": 0x07,
        "OVERLOADED": 0x08,
    }


@pytest.mark.parametrize(("error", "hard", "code"), SAMPLES, ids=IDS)
def test_hard_and_code_classification(
    error: MirrorError, hard: bool, code: ErrorCode | None
) -> None:
    assert isinstance(error, MirrorError)
    assert isinstance(error, Exception)
    assert error.hard is hard
    assert type(error).hard is hard
    assert error.code == code
    assert str(error) == error.message
    assert error.message


def test_every_mirror_error_subclass_is_covered() -> None:
    defined_here = {
        cls for cls in MirrorError.__subclasses__() if cls.__module__ == MirrorError.__module__
    }
    assert {type(error) for error, _, _ in SAMPLES} == defined_here


def test_base_error_is_transient_without_code() -> None:
    error = MirrorError("something")
    assert error.hard is False and error.code is None and str(error) == "something"


def test_hard_codes_are_exactly_the_configuration_errors() -> None:
    hard_codes = {code for error, hard, code in SAMPLES if hard and code is not None}
    assert hard_codes == {
        ErrorCode.CLUSTER_ID,
        ErrorCode.OBSERVER_ONLY,
        ErrorCode.BAD_VERSION,
        ErrorCode.UNKNOWN_DATABASE,
        ErrorCode.DIVERGED,
    }


def test_cluster_id_mismatch_names_both_ids() -> None:
    error = ClusterIdMismatch("us-east", "eu-west", "ack from 10.0.0.1")
    assert (error.expected, error.actual, error.detail) == (
        "us-east",
        "eu-west",
        "ack from 10.0.0.1",
    )
    assert "'us-east'" in str(error)
    assert "'eu-west'" in str(error)
    assert "ack from 10.0.0.1" in str(error)
    assert str(error).index("us-east") < str(error).index("eu-west")  # expected, then actual


def test_messages_carry_their_details() -> None:
    assert "orders" in str(UnknownDatabase("orders", "us-east"))
    assert "us-east" in str(UnknownDatabase("orders", "us-east"))
    assert "the source" in str(UnknownDatabase("orders"))
    assert "2.5 s" in str(HandshakeTimeout(2.5, "h:1"))
    assert "0x1a" in str(TransportError("lost", 0x1A))
    assert "QUIC" not in str(TransportError("lost"))
    assert "bad bytes" in str(MalformedFrame("bad bytes"))
    assert MalformedFrame("bad bytes").detail == "bad bytes"
    assert "version 1" in str(ProtocolVersionMismatch(1))
    assert "configure ca_file" in str(TlsVerificationError("unknown CA", "configure ca_file"))


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (ErrorCode.CLUSTER_ID, ClusterIdMismatch),
        (ErrorCode.OBSERVER_ONLY, ObserverRoleViolation),
        (ErrorCode.BAD_VERSION, ProtocolVersionMismatch),
        (ErrorCode.UNKNOWN_DATABASE, UnknownDatabase),
        (ErrorCode.MALFORMED, MalformedFrame),
        (ErrorCode.SOURCE_SHUTDOWN, SourceShutdown),
        (ErrorCode.DIVERGED, HistoryDiverged),
        (ErrorCode.OVERLOADED, SourceOverloaded),
    ],
)
def test_error_for_code_maps_each_code(code: ErrorCode, cls: type[MirrorError]) -> None:
    for raw in (code, int(code)):
        error = error_for_code(
            raw,
            "the detail",
            expected_cluster="us-east",
            remote_cluster="eu-west",
            database_id="orders",
            protocol_version=1,
        )
        assert type(error) is cls
        assert error.code == code
        assert "the detail" in str(error)


def test_error_for_code_fills_in_context() -> None:
    mismatch = error_for_code(1, "d", expected_cluster="us-east", remote_cluster="eu-west")
    assert isinstance(mismatch, ClusterIdMismatch)
    assert (mismatch.expected, mismatch.actual) == ("us-east", "eu-west")
    unknown = error_for_code(4, "d", expected_cluster="us-east", database_id="orders")
    assert isinstance(unknown, UnknownDatabase)
    assert (unknown.database_id, unknown.cluster_id) == ("orders", "us-east")
    remote = error_for_code(4, "d", expected_cluster="a", remote_cluster="b", database_id="x")
    assert isinstance(remote, UnknownDatabase) and remote.cluster_id == "b"
    version = error_for_code(3, "d", protocol_version=1)
    assert isinstance(version, ProtocolVersionMismatch) and version.ours == 1
    assert "the source reported" in str(error_for_code(5, "oops"))
    assert isinstance(error_for_code(5, ""), MalformedFrame)


def test_code_none_is_a_clean_close_by_the_source() -> None:
    error = error_for_code(0, "bye")
    assert type(error) is TransportError and not error.hard
    assert "closed the connection: bye" in str(error)


@given(st.integers(9, 2**62), st.text(max_size=20))
def test_unknown_codes_are_transport_errors(code: int, detail: str) -> None:
    error = error_for_code(code, detail)
    assert type(error) is TransportError
    assert error.hard is False
    assert f"0x{code:x}" in str(error)


@pytest.mark.parametrize(("error", "hard", "code"), SAMPLES, ids=IDS)
def test_errors_survive_pickle(error: MirrorError, hard: bool, code: ErrorCode | None) -> None:
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert type(copy) is type(error)
        assert copy.__dict__ == error.__dict__
        assert str(copy) == str(error)
        assert copy.args == error.args
        assert copy.hard is hard and copy.code == code


def test_pickled_attributes_intact() -> None:
    copy = pickle.loads(pickle.dumps(ClusterIdMismatch("a", "b", "c")))
    assert (copy.expected, copy.actual, copy.detail) == ("a", "b", "c")
    timeout = pickle.loads(pickle.dumps(HandshakeTimeout(1.5, "t")))
    assert (timeout.timeout, timeout.target) == (1.5, "t")
    transport = pickle.loads(pickle.dumps(TransportError("x", 7)))
    assert transport.quic_error_code == 7
    with pytest.raises(ClusterIdMismatch):
        raise copy


@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=30))
def test_cluster_mismatch_pickles_for_any_text(expected: str, actual: str, detail: str) -> None:
    error = ClusterIdMismatch(expected, actual, detail)
    assert repr(expected) in str(error) and repr(actual) in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.__dict__ == error.__dict__
