"""--tls-cert/--tls-key: the proxy serves HTTPS itself, to the official SDK verifying a
self-signed certificate; SIGHUP's reload gives new connections a new pair and keeps the old
one when the new files are broken."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from llamacpp_proxy.config import ConfigError
from llamacpp_proxy.main import main, reload, tls_context

from .conftest import UNLIMITED_KEY, Stack, default_settings

CHAT = [{"role": "user", "content": "hi"}]


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in folder."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def sdk(stack: Stack, trusted: Path) -> openai.OpenAI:
    """The SDK over HTTPS, trusting only `trusted`, on one kept-alive connection."""
    verify = ssl.create_default_context(cafile=str(trusted))
    return openai.OpenAI(
        base_url=f"https://127.0.0.1:{stack.port}/v1",
        api_key=UNLIMITED_KEY,
        max_retries=0,
        timeout=20,
        http_client=httpx.Client(verify=verify),
    )


def test_the_sdk_talks_https_and_sighup_swaps_the_certificate(
    tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    first = self_signed(tmp_path, "first")
    second = self_signed(tmp_path, "second")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(first[0].read_bytes())
    live_key.write_bytes(first[1].read_bytes())
    stack = make_stack(tls_cert=live_cert, tls_key=live_key)

    with sdk(stack, first[0]) as client:
        for _ in range(2):  # the second on the same kept-alive TLS connection
            reply = client.chat.completions.create(model="m", messages=CHAT)
            assert reply.choices[0].message.content
        stream = client.chat.completions.create(model="m", messages=CHAT, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # Plain HTTP on the TLS port gets no answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{stack.port}/health", timeout=5)
    with sdk(stack, second[0]) as client, pytest.raises(openai.APIConnectionError):
        client.models.list()  # not yet: the server still shows the first certificate

    live_cert.write_bytes(second[0].read_bytes())
    live_key.write_bytes(second[1].read_bytes())
    stack.runner.call(lambda: reload(stack.ctx, stack.server))
    with sdk(stack, second[0]) as client:
        assert client.models.list().data
    with sdk(stack, first[0]) as client, pytest.raises(openai.APIConnectionError):
        client.models.list()

    # A broken pair on the next reload: the server keeps the second certificate.
    live_key.write_text("not a key")
    stack.runner.call(lambda: reload(stack.ctx, stack.server))
    with sdk(stack, second[0]) as client:
        assert client.models.list().data


def test_a_bad_pair_stops_the_start_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, _ = self_signed(tmp_path, "a")
    _, other_key = self_signed(tmp_path, "b")
    with pytest.raises(ConfigError, match="--tls-cert"):
        tls_context(default_settings(tls_cert=cert, tls_key=other_key))
    env = {"UNLIMITED_API_KEY": UNLIMITED_KEY}
    argv = ["--port", "0", "--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.key")]
    assert main(argv, env) == 2
    assert "--tls-cert" in capsys.readouterr().err
    assert main(["--port", "0", "--tls-cert", str(cert)], env) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
