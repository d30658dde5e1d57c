"""Development PKI for the mirror link: a CA, one server certificate per source
cluster and a client certificate for the mirror.

The mirror dials a source with SNI set to the source's cluster id, so each source
certificate carries exactly that cluster id as its only DNS subjectAltName; adding
catch-alls such as ``localhost`` would make the name check meaningless.

This is for development and tests only: keys are unencrypted on disk (protected
by file permissions) and there is no revocation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_CA_COMMON_NAME",
    "MAX_PEM_BYTES",
    "CertKeyPair",
    "CertificateAuthority",
    "DevPki",
    "PemFileError",
    "PkiFile",
    "PkiUpdate",
    "generate_dev_pki",
    "key_matches_certificate",
    "load_certificate_file",
    "load_private_key_file",
    "parse_subject_name",
    "update_dev_pki",
    "validate_dns_name",
    "write_pair",
]

DEFAULT_CA_COMMON_NAME = "mirror-actors dev CA"
DEFAULT_VALID_DAYS = 365

# Peers' clocks are rarely in perfect agreement; a certificate minted just now
# must not be rejected as "not yet valid" by a peer running slightly behind.
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)

CERT_FILE_MODE = 0o644
KEY_FILE_MODE = 0o600
DIRECTORY_MODE = 0o700

_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_DNS_NAME_LENGTH = 253
_MAX_COMMON_NAME_LENGTH = 64  # RFC 5280 ub-common-name
_ALLOWED_DESCRIPTION = (
    "allowed: DNS labels of ASCII letters, digits and hyphens (1-63 characters, "
    "not starting or ending with a hyphen), separated by single dots, "
    f"at most {_MAX_DNS_NAME_LENGTH} characters in total, e.g. 'us-east'"
)

_SupportedKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address | str

# PEM files larger than this are not certificates or keys.
MAX_PEM_BYTES = 1024 * 1024


@frozen
class CertKeyPair:
    """Paths of a PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert: Path
    key: Path


def _freeze_sources(sources: Mapping[str, CertKeyPair]) -> Mapping[str, CertKeyPair]:
    return MappingProxyType(dict(sources))


@frozen
class DevPki:
    """Files of a generated development PKI; see :func:`generate_dev_pki`."""

    directory: Path
    ca: CertKeyPair
    sources: Mapping[str, CertKeyPair] = field(converter=_freeze_sources)
    mirror: CertKeyPair

    def source(self, cluster_id: str) -> CertKeyPair:
        """Return the server certificate and key of the source ``cluster_id``.

        Raises KeyError naming the known cluster ids when there is none.
        """
        try:
            return self.sources[cluster_id]
        except KeyError:
            known = ", ".join(repr(c) for c in sorted(self.sources)) or "none"
            raise KeyError(
                f"no source certificate for cluster id {cluster_id!r} in {self.directory}; "
                f"known cluster ids: {known}"
            ) from None


def validate_dns_name(name: str, *, what: str = "name") -> str:
    """Check that ``name`` can be used as a DNS subjectAltName and TLS SNI.

    Returns the name unchanged; raises ValueError saying what is wrong and what is
    allowed. IP-address-looking names are rejected because TLS clients check them
    against IP subjectAltNames instead of DNS ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    problem: str | None = None
    if not name:
        problem = "it is empty"
    elif len(name) > _MAX_DNS_NAME_LENGTH:
        problem = f"it is {len(name)} characters long"
    else:
        for label in name.split("."):
            if not label:
                problem = "it has an empty label (leading, trailing or doubled dot)"
                break
            if not _DNS_LABEL.fullmatch(label):
                problem = f"label {label!r} is not a valid DNS label"
                break
    if problem is None:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            problem = "it looks like an IP address"
    if problem is not None:
        raise ValueError(f"invalid {what} {name!r}: {problem}; {_ALLOWED_DESCRIPTION}")
    return name


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _require_aware(value: dt.datetime, what: str) -> dt.datetime:
    # cryptography silently treats naive datetimes as UTC; a naive local time
    # would shift validity by the UTC offset, so insist on explicit zones.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, e.g. datetime.now(datetime.UTC)")
    return value


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    # ECDSA keys only sign in TLS 1.3; no encipherment usages apply.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 is fast to generate and is supported by aioquic's TLS 1.3 signatures.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: _SupportedKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path`` with ``data``, created with ``mode`` from the start.

    The temporary file is created by ``mkstemp`` (owner-only) and its mode fixed
    before any byte is written, so a private key is never readable by others, even
    when overwriting an existing file that had looser permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_pair(directory: Path | str, stem: str, cert_pem: bytes, key_pem: bytes) -> CertKeyPair:
    """Write ``<stem>.pem`` (mode 0o644) and ``<stem>.key`` (mode 0o600) into ``directory``."""
    if not stem or "/" in stem or os.sep in stem or stem in (".", ".."):
        raise ValueError(f"stem must be a plain file name without separators, got {stem!r}")
    base = Path(directory)
    pair = CertKeyPair(cert=base / f"{stem}.pem", key=base / f"{stem}.key")
    _write_file(pair.key, key_pem, KEY_FILE_MODE)
    _write_file(pair.cert, cert_pem, CERT_FILE_MODE)
    return pair


class CertificateAuthority:
    """A signing CA: its certificate and private key, held in memory."""

    def __init__(self, certificate: x509.Certificate, private_key: _SupportedKey) -> None:
        """Wrap an existing CA certificate and its key; see :meth:`create` and :meth:`load`."""
        if certificate.public_key() != private_key.public_key():
            raise ValueError("the CA private key does not match the CA certificate")
        self._certificate = certificate
        self._private_key = private_key

    @classmethod
    def create(
        cls,
        common_name: str = DEFAULT_CA_COMMON_NAME,
        valid_days: int = DEFAULT_VALID_DAYS,
    ) -> CertificateAuthority:
        """Create a new self-signed CA with a fresh P-256 key."""
        if valid_days <= 0:
            raise ValueError(f"valid_days must be positive, got {valid_days}")
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _utcnow()
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + dt.timedelta(days=valid_days))
            # path_length=0: this CA signs leaves only, never intermediate CAs.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, cert_path: Path | str, key_path: Path | str) -> CertificateAuthority:
        """Load a CA from a PEM certificate and an unencrypted PEM private key."""
        certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TypeError(
                f"unsupported CA key type {type(key).__name__} in {key_path}; "
                "expected an EC or RSA private key"
            )
        return cls(certificate, key)

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return self._certificate

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM encoded."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, cert_path: Path | str, key_path: Path | str) -> CertKeyPair:
        """Write the CA certificate (0o644) and private key (0o600) as PEM files."""
        pair = CertKeyPair(cert=Path(cert_path), key=Path(key_path))
        _write_file(pair.key, _key_pem(self._private_key), KEY_FILE_MODE)
        _write_file(pair.cert, self.cert_pem, CERT_FILE_MODE)
        return pair

    def issue(
        self,
        common_name: str,
        dns_names: Sequence[str],
        *,
        ip_addresses: Sequence[IpAddress] = (),
        client: bool = False,
        server: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """Issue a leaf certificate with a fresh P-256 key.

        Returns ``(cert_pem, key_pem)``. ``dns_names`` become the DNS
        subjectAltNames verbatim (no validation, so tests can mint deliberately
        wrong certificates) and ``ip_addresses`` the IP address ones; with
        neither the extension is omitted. ``server`` and
        ``client`` select the serverAuth / clientAuth extended key usages; with
        neither, the extension is omitted. Validity defaults to 5 minutes ago until
        365 days from now; pass ``not_after`` in the past for an expired
        certificate.
        """
        if isinstance(dns_names, str):
            # A bare string is a Sequence[str] of characters; almost surely a bug.
            raise TypeError("dns_names must be a sequence of names, not a single str")
        if not 1 <= len(common_name) <= _MAX_COMMON_NAME_LENGTH:
            raise ValueError(
                f"common_name must be 1-{_MAX_COMMON_NAME_LENGTH} characters, "
                f"got {len(common_name)}: {common_name!r}"
            )
        now = _utcnow()
        start = (
            now - CLOCK_SKEW_ALLOWANCE
            if not_before is None
            else _require_aware(not_before, "not_before")
        )
        end = (
            now + dt.timedelta(days=DEFAULT_VALID_DAYS)
            if not_after is None
            else _require_aware(not_after, "not_after")
        )
        if end <= start:
            raise ValueError(f"not_after ({end}) must be later than not_before ({start})")

        key = _new_key()
        public_key = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self._private_key, hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        # Prefer the CA's own SKI so chain builders match it exactly, even for a
        # loaded CA whose SKI was computed by another tool.
        try:
            ski = self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            public_key = self._private_key.public_key()
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _checked_names(clusters: Iterable[str], mirror_name: str, valid_days: int) -> list[str]:
    """The cluster ids, checked as DNS names and common names, unique; and the mirror name."""
    if isinstance(clusters, str):
        # Iterating a str yields characters: "us-east" would become seven clusters.
        raise TypeError("clusters must be an iterable of cluster ids, not a single str")
    cluster_ids = [validate_dns_name(c, what="cluster id") for c in clusters]
    validate_dns_name(mirror_name, what="mirror name")
    for name in [*cluster_ids, mirror_name]:
        # The name doubles as the subject CN, which X.509 caps at 64 characters.
        if len(name) > _MAX_COMMON_NAME_LENGTH:
            raise ValueError(
                f"invalid name {name!r}: it is {len(name)} characters long; cluster ids and "
                f"the mirror name are also certificate common names, so at most "
                f"{_MAX_COMMON_NAME_LENGTH} characters are allowed"
            )
    seen: dict[str, str] = {}
    for cluster_id in cluster_ids:
        # DNS names (and some file systems) are case-insensitive, so 'US-East' and
        # 'us-east' would collide both on the wire and on disk.
        folded = cluster_id.lower()
        if folded in seen:
            raise ValueError(
                f"duplicate cluster id {cluster_id!r} (same DNS name as {seen[folded]!r}); "
                "cluster ids must be unique, compared case-insensitively"
            )
        seen[folded] = cluster_id
    if valid_days <= 0:
        raise ValueError(f"valid_days must be positive, got {valid_days}")
    return cluster_ids


def generate_dev_pki(
    out_dir: Path | str,
    clusters: Iterable[str],
    *,
    mirror_name: str = "mirror",
    valid_days: int = DEFAULT_VALID_DAYS,
    overwrite: bool = True,
) -> DevPki:
    """Generate a CA, one source server certificate per cluster and a mirror client
    certificate in ``out_dir``.

    Files: ``ca.pem``/``ca.key``, ``source-<cluster>.pem``/``.key`` (serverAuth,
    the cluster id as CN and sole DNS subjectAltName), ``mirror.pem``/``mirror.key``
    (clientAuth, ``mirror_name`` as CN and DNS subjectAltName). Keys are mode 0o600;
    the directory is created with mode 0o700. Cluster ids and ``mirror_name`` must
    be valid DNS names (ValueError otherwise). With ``overwrite=False``, raises
    FileExistsError before writing anything if any of the files already exists.
    """
    cluster_ids = _checked_names(clusters, mirror_name, valid_days)
    directory = Path(out_dir)
    stems = ["ca", "mirror", *(f"source-{c}" for c in cluster_ids)]
    if not overwrite:
        existing = [
            str(directory / f"{stem}{suffix}")
            for stem in stems
            for suffix in (".pem", ".key")
            if (directory / f"{stem}{suffix}").exists()
        ]
        if existing:
            raise FileExistsError(
                f"refusing to overwrite existing PKI files (overwrite=False): {', '.join(existing)}"
            )
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)

    ca = CertificateAuthority.create(valid_days=valid_days)
    ca_pair = ca.write(directory / "ca.pem", directory / "ca.key")
    # Leaves expire with the CA rather than (milliseconds) after it.
    not_after = ca.certificate.not_valid_after_utc

    sources: dict[str, CertKeyPair] = {}
    for cluster_id in cluster_ids:
        cert_pem, key_pem = ca.issue(
            cluster_id, [cluster_id], server=True, client=False, not_after=not_after
        )
        sources[cluster_id] = write_pair(directory, f"source-{cluster_id}", cert_pem, key_pem)

    cert_pem, key_pem = ca.issue(
        mirror_name, [mirror_name], server=False, client=True, not_after=not_after
    )
    mirror = write_pair(directory, "mirror", cert_pem, key_pem)
    return DevPki(directory=directory, ca=ca_pair, sources=sources, mirror=mirror)


# -- PEM files as a command or a config file names them ------------------------------


class PemFileError(ValueError):
    """A file that should be a PEM certificate or key and is not; the message names it."""


def _read_pem(path: str | Path) -> bytes:
    text = str(path)
    if not text:
        raise PemFileError("expected a file name, got ''")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise PemFileError(f"{text}: no such file") from None
    except IsADirectoryError:
        raise PemFileError(f"{text} is a directory, expected a PEM file") from None
    except OSError as error:
        raise PemFileError(f"cannot read {text}: {error.strerror or error}") from None
    if len(data) > MAX_PEM_BYTES:
        raise PemFileError(f"{text} is larger than {MAX_PEM_BYTES} bytes: not a PEM file")
    return data


def load_certificate_file(path: str | Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file; ``PemFileError`` naming the file if it holds none."""
    data = _read_pem(path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise PemFileError(
            f"{path} is not a PEM certificate file (expected '-----BEGIN CERTIFICATE-----')"
        )
    return certificates


def load_private_key_file(path: str | Path) -> PrivateKeyTypes:
    """The unencrypted private key of a PEM file; ``PemFileError`` naming the file if not."""
    data = _read_pem(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PemFileError(
            f"{path} is an encrypted private key; give an unencrypted PEM key"
        ) from None
    except Exception:
        # cryptography raises ValueError, or UnsupportedAlgorithm for key types it lacks.
        raise PemFileError(
            f"{path} is not a PEM private key (expected '-----BEGIN ... PRIVATE KEY-----')"
        ) from None


def key_matches_certificate(cert_path: str | Path, key_path: str | Path) -> bool:
    """Whether the key in ``key_path`` is the one of the (first) certificate in ``cert_path``."""
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    certificate_key = load_certificate_file(cert_path)[0].public_key().public_bytes(der, spki)
    return load_private_key_file(key_path).public_key().public_bytes(der, spki) == certificate_key


def parse_subject_name(text: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A subjectAltName to add: an IP address (as an address) or a DNS name (checked)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        return validate_dns_name(text, what="name")
    except ValueError:
        raise ValueError(
            f"expected a DNS name or an IP address, got {text!r}; {_ALLOWED_DESCRIPTION}"
        ) from None


# -- adding to a PKI that exists -----------------------------------------------------


@frozen
class PkiFile:
    """What ``update_dev_pki`` did with one certificate and its key."""

    role: str
    """``CA``, ``source <cluster>`` or ``mirror``."""
    pair: CertKeyPair
    action: str
    """``created``, ``kept`` (already there and right), ``reissued`` (signed anew by the
    same CA, see ``reason``) or ``replaced`` (``force``: a new CA and all it signs)."""
    reason: str = ""


@frozen
class PkiUpdate:
    directory: Path
    ca: PkiFile
    sources: tuple[PkiFile, ...]
    mirror: PkiFile
    warnings: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[PkiFile, ...]:
        return (self.ca, *self.sources, self.mirror)


def _alt_names(certificate: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return (
        {name.lower() for name in san.get_values_for_type(x509.DNSName)},
        {str(address) for address in san.get_values_for_type(x509.IPAddress)},
    )


def _leaf_problem(
    ca: CertificateAuthority, pair: CertKeyPair, dns_names: Sequence[str], ips: Sequence[str]
) -> str | None:
    """Why an existing leaf cannot be kept as it is; None when it can."""
    if not pair.cert.exists() or not pair.key.exists():
        missing = pair.key if pair.cert.exists() else pair.cert
        return f"{missing} was missing"
    try:
        certificate = load_certificate_file(pair.cert)[0]
        if not key_matches_certificate(pair.cert, pair.key):
            return f"{pair.key} is not the key of {pair.cert}"
    except PemFileError as error:
        return str(error)
    try:
        certificate.verify_directly_issued_by(ca.certificate)
    except Exception:
        return "it was not signed by this CA"
    if certificate.not_valid_after_utc <= _utcnow():
        return "it had expired"
    have_dns, have_ips = _alt_names(certificate)
    lacking = sorted({n.lower() for n in dns_names} - have_dns) + sorted(set(ips) - have_ips)
    if lacking:
        return f"it lacked the names {', '.join(lacking)}"
    return None


def update_dev_pki(
    out_dir: Path | str,
    clusters: Iterable[str],
    *,
    mirror_name: str = "mirror",
    extra_names: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    force: bool = False,
    valid_days: int = DEFAULT_VALID_DAYS,
) -> PkiUpdate:
    """Make or extend a dev PKI in ``out_dir`` without ever replacing its CA by accident.

    - No CA there (neither ``ca.pem`` nor ``ca.key``): as ``generate_dev_pki``.
    - A CA there: it is loaded and kept.  Each named cluster's certificate, and
      the mirror's, is kept when it is signed by that CA, unexpired, matches its
      key and already names everything asked for; otherwise it is issued (again)
      by that CA.  Certificates the CA signed before go on being trusted.
    - ``force``: a new CA, and every named certificate issued by it; files of
      clusters not named stay as they are and are reported in ``warnings``,
      since they were signed by the CA just replaced.

    ``extra_names`` (DNS names or IP addresses) are added to every named
    cluster's source certificate, beside its cluster id: production sources are
    dialed by address.  Half a CA (one of the two files) or a CA that cannot be
    loaded raises ValueError naming the files, before anything is written.
    """
    cluster_ids = _checked_names(clusters, mirror_name, valid_days)
    extra = [parse_subject_name(str(name)) for name in extra_names]
    extra_dns = [str(n) for n in extra if isinstance(n, str)]
    extra_ips = [str(n) for n in extra if not isinstance(n, str)]
    directory = Path(out_dir)
    ca_pair = CertKeyPair(directory / "ca.pem", directory / "ca.key")
    present = [path for path in (ca_pair.cert, ca_pair.key) if path.exists()]
    ca: CertificateAuthority
    existing_ca = bool(present) and not force
    if existing_ca:
        if len(present) == 1:
            (have,) = present
            lacking = ca_pair.key if have == ca_pair.cert else ca_pair.cert
            raise ValueError(
                f"{directory} holds {have.name} but not {lacking.name}: that CA cannot sign; "
                "restore the missing file, or pass --force to make a new CA (every "
                "certificate the old one signed then stops being trusted)"
            )
        try:
            ca = CertificateAuthority.load(ca_pair.cert, ca_pair.key)
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(
                f"cannot use the CA in {ca_pair.cert} and {ca_pair.key}: {error}; fix them, "
                "or pass --force to make a new CA (every certificate the old one signed "
                "then stops being trusted)"
            ) from None
        ca_file = PkiFile("CA", ca_pair, "kept", "it signs what follows")
    else:
        ca = CertificateAuthority.create(valid_days=valid_days)
        replaced = bool(present)
        ca_file = PkiFile("CA", ca_pair, "replaced" if replaced else "created")
    not_after = ca.certificate.not_valid_after_utc

    # Decide everything before writing anything.
    plans: list[tuple[str, CertKeyPair, list[str], list[str], bool, str]] = []
    for cluster_id in cluster_ids:
        pair = CertKeyPair(
            directory / f"source-{cluster_id}.pem", directory / f"source-{cluster_id}.key"
        )
        plans.append(
            (f"source {cluster_id}", pair, [cluster_id, *extra_dns], extra_ips, False, cluster_id)
        )
    mirror_pair = CertKeyPair(directory / "mirror.pem", directory / "mirror.key")
    plans.append(("mirror", mirror_pair, [mirror_name], [], True, mirror_name))

    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    if not existing_ca:
        ca.write(ca_pair.cert, ca_pair.key)
    done: list[PkiFile] = []
    for role, pair, dns_names, ips, client, common_name in plans:
        existed = pair.cert.exists() or pair.key.exists()
        if existing_ca and existed:
            problem = _leaf_problem(ca, pair, dns_names, ips)
            if problem is None:
                done.append(PkiFile(role, pair, "kept", "already signed by this CA"))
                continue
            action, reason = "reissued", problem
        elif existed:
            action, reason = "replaced", "signed by the new CA"
        else:
            action, reason = "created", ""
        cert_pem, key_pem = ca.issue(
            common_name,
            dns_names,
            ip_addresses=ips,
            server=not client,
            client=client,
            not_after=not_after,
        )
        write_pair(directory, pair.cert.stem, cert_pem, key_pem)
        done.append(PkiFile(role, pair, action, reason))

    warnings: list[str] = []
    if present and force:
        named = {f"source-{c}.pem" for c in cluster_ids}
        for other in sorted(directory.glob("source-*.pem")):
            if other.name not in named:
                cluster = other.stem.removeprefix("source-")
                warnings.append(
                    f"{other} was signed by the CA just replaced: mirrors will not trust it; "
                    f"reissue it with --cluster {cluster}"
                )
    return PkiUpdate(
        directory=directory, ca=ca_file, sources=tuple(done[:-1]), mirror=done[-1],
        warnings=tuple(warnings),
    )  # fmt: skip
