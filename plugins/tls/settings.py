"""The tls plugin's settings: a listener's ``[listeners.tls]`` and a cluster's
``[clusters.NAME.tls]``, checked at load so that a bad value is a config error
naming its key path, not a handshake that fails later."""

from __future__ import annotations

import ssl
from typing import Literal

from pydantic import BaseModel, ConfigDict, FilePath, field_validator, model_validator

from sluice.secrets import Secret

__all__ = ["Certificate", "ClusterTls", "ListenerTls", "VERSIONS"]

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
Version = Literal["1.2", "1.3"]
# Envoy's names (its forward_client_cert_details); always_forward_only keeps what came.
ForwardMode = Literal["sanitize", "forward_only", "append_forward", "sanitize_set", "always_forward_only"]
Detail = Literal["by", "hash", "cert", "subject", "uri", "dns"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ciphers(value: str | None) -> str | None:
    if value is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError:
            raise ValueError(f"OpenSSL knows no cipher in {value!r}") from None
    return value


def _check_versions(model):
    if model.max_version is not None and VERSIONS[model.max_version] < VERSIONS[model.min_version]:
        raise ValueError(f"max_version {model.max_version} is below min_version {model.min_version}")
    return model


class Certificate(_Model):
    """One certificate of a listener, chosen by the SNI the client sent."""

    cert: FilePath
    key: FilePath
    key_password: Secret | None = None  # for an encrypted key (never prompted for); or { env/file = ... }
    # Names this pair serves: exact, or "*.example.com" (one label). Default: its DNS SANs.
    server_names: list[str] | None = None

    @field_validator("server_names")
    @classmethod
    def _names(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        for name in names:
            if not name or "*" in name[2:] or (name.startswith("*") and not name.startswith("*.")):
                raise ValueError(f"{name!r}: a name, or '*.' and a domain")
        return [n.lower().rstrip(".") for n in names]


class ListenerTls(_Model):
    # The default pair (served when no SNI matches); else the first of ``certificates``.
    cert: FilePath | None = None
    key: FilePath | None = None
    key_password: Secret | None = None
    certificates: list[Certificate] = []
    min_version: Version = "1.2"
    max_version: Version | None = None
    ciphers: str | None = None  # OpenSSL's cipher string, for TLS 1.2 (1.3's suites are OpenSSL's)
    client_auth: Literal["none", "request", "require"] = "none"
    client_ca: FilePath | None = None  # the CAs client certificates must chain to
    forward_client_cert: ForwardMode = "sanitize"
    client_cert_details: list[Detail] = ["hash", "subject", "uri", "dns"]

    _ciphers = field_validator("ciphers")(_check_ciphers)

    @model_validator(mode="after")
    def _consistent(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.cert is None and not self.certificates:
            raise ValueError("set cert and key, or at least one [[certificates]]")
        if self.client_auth != "none" and self.client_ca is None:
            raise ValueError(f"client_auth = {self.client_auth!r} needs client_ca (the CA bundle to verify with)")
        return _check_versions(self)

    def pairs(self) -> list[Certificate]:
        """Every pair, the default first."""
        first = [] if self.cert is None else [Certificate(cert=self.cert, key=self.key,
                                                          key_password=self.key_password)]
        return first + list(self.certificates)


class ClusterTls(_Model):
    verify: bool = True
    ca: FilePath | None = None
    server_name: str | None = None
    min_version: Version = "1.2"
    max_version: Version | None = None
    ciphers: str | None = None
    cert: FilePath | None = None  # the client certificate shown to upstreams (mesh mTLS)
    key: FilePath | None = None
    key_password: Secret | None = None
    # Pinning, after the handshake: the upstream's certificate must carry one of these
    # (DNS SANs, or the SPIFFE ID: its spiffe:// URI SAN); a mismatch is a connect failure.
    verify_san: list[str] = []
    verify_spiffe_id: list[str] = []

    _ciphers = field_validator("ciphers")(_check_ciphers)

    @model_validator(mode="after")
    def _consistent(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if (self.verify_san or self.verify_spiffe_id) and not self.verify:
            raise ValueError("verify_san and verify_spiffe_id pin a verified certificate: not with verify = false")
        return _check_versions(self)
