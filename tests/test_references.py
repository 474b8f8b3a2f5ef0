"""The rules for artifact references and download redirects (shared.references), as a pure function."""

from __future__ import annotations

import pytest

from control_plane.config import Settings
from shared.references import redirect_problem, reference_problem, shown_reference, without_credentials


@pytest.mark.parametrize(
    "url",
    [
        "https://huggingface.co/org/repo/resolve/main/model.gguf",
        "https://models.example:8443/a.gguf?sig=abc",
        "https://8.8.8.8/a.gguf",
        "https://[2606:4700::1111]/a.gguf",
        "https://[::ffff:8.8.8.8]/a.gguf",  # an IPv4-mapped public address
        "https://[64:ff9b::8.8.8.8]/a.gguf",  # NAT64 of a public address
        "https://xn--bcher-kva.example/a.gguf",  # an IDN in punycode
        "https://models.example./a.gguf",  # a fully qualified name
    ],
)
def test_public_https_references_are_accepted(url: str) -> None:
    assert reference_problem(url) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("s3://models/tinyllama.gguf", "s3:// references are not supported yet"),
        ("http://models.example/a.gguf", "http:// references are not supported"),
        ("ftp://models.example/a.gguf", "ftp:// references are not supported"),
        ("https://user:secret@models.example/a.gguf", "credentials"),
        ("https://token@models.example/a.gguf", "credentials"),
        ("https://@models.example/a.gguf", "credentials"),
        ("https://127.0.0.1:5432/", "loopback"),
        ("https://127.8.9.10/", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://10.1.2.3/a", "private"),
        ("https://172.16.0.1/a", "private"),
        ("https://192.168.1.1/a", "private"),
        ("https://100.64.0.1/a", "private"),  # carrier-grade NAT
        ("https://0.0.0.0/a", "reserved"),
        ("https://224.0.0.1/a", "reserved"),  # multicast
        ("https://[::1]/a", "loopback"),
        ("https://[fe80::1]/a", "link-local"),
        ("https://[fd00::1]/a", "private"),
        ("https://[::ffff:127.0.0.1]/a", "127.0.0.1 is a loopback"),  # IPv4-mapped loopback
        ("https://[::ffff:169.254.169.254]/a", "169.254.169.254 is a loopback"),
        ("https://localhost/a", "localhost is this machine"),
        ("https://LOCALHOST./a", "localhost is this machine"),
        ("https://api.localhost/a", "api.localhost is this machine"),
        ("https://2130706433/a", "write it as 127.0.0.1"),  # what the C resolver reads as 127.0.0.1
        ("https://127.1/a", "write it as 127.0.0.1"),
        ("https://0x7f.0.0.1/a", "write it as 127.0.0.1"),
        ("https://017700000001/a", "write it as 127.0.0.1"),
        ("https://exa_mple.com/a", "not a valid host name"),
        ("https://bücher.example/a", "not a valid host name"),
        ("https:///a.gguf", "names no host"),
        ("https://models.example:99999/a", "not a valid URL"),
        ("https://[zz::1]/a", "not a valid URL"),
        # IPv6 forms that carry an IPv4 address are judged as that address.
        ("https://[64:ff9b::169.254.169.254]/", "169.254.169.254 is a loopback"),  # NAT64
        ("https://[::169.254.169.254]/", "169.254.169.254 is a loopback"),  # IPv4-compatible
        ("https://[2002:a9fe:a9fe::1]/", "169.254.169.254 is a loopback"),  # 6to4
        ("https://[::ffff:0:7f00:1]/", "127.0.0.1 is a loopback"),  # SIIT
        ("https://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/", "reserved address"),  # Teredo: refused as IPv6
    ],
)
def test_unsafe_references_are_refused_with_a_reason(url: str, says: str) -> None:
    problem = reference_problem(url)
    assert problem is not None and says in problem, problem


def test_the_allow_list_admits_names_addresses_and_networks() -> None:
    assert reference_problem("https://10.1.2.3/a", allowed_hosts=["10.0.0.0/8"]) is None
    assert reference_problem("https://10.1.2.3/a", allowed_hosts=["10.1.2.3"]) is None
    assert reference_problem("https://[fd00::7]/a", allowed_hosts=["[fd00::/8]"]) is None
    assert reference_problem("https://[::ffff:10.0.0.9]/a", allowed_hosts=["10.0.0.0/24"]) is None
    assert reference_problem("https://localhost/a", allowed_hosts=["LOCALHOST"]) is None
    # Only what is listed: a neighbouring address, another name, and never credentials or http.
    assert reference_problem("https://10.1.2.4/a", allowed_hosts=["10.1.2.3"]) is not None
    assert reference_problem("https://api.localhost/a", allowed_hosts=["localhost"]) is not None
    assert reference_problem("https://u:p@10.1.2.3/a", allowed_hosts=["10.1.2.3"]) is not None
    assert reference_problem("http://10.1.2.3/a", allowed_hosts=["10.1.2.3"]) is not None


def test_dns_names_are_not_resolved_at_registration() -> None:
    # A name is judged as written: whatever it resolves to today says nothing about download time.
    assert reference_problem("https://localtest.me/a.gguf") is None
    assert reference_problem("https://name-that-does-not-resolve.invalid/a.gguf") is None


def test_the_allow_list_setting_reads_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMOPS_ARTIFACT_REFERENCE_ALLOWED_HOSTS", " mirror.lan, 10.0.0.0/8 ,,[fd00::1]")
    assert Settings().artifact_reference_allowed_hosts == ("mirror.lan", "10.0.0.0/8", "[fd00::1]")
    monkeypatch.delenv("SLMOPS_ARTIFACT_REFERENCE_ALLOWED_HOSTS")
    assert Settings().artifact_reference_allowed_hosts == ()


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("http://127.0.0.1:8080/v1/artifacts/x", "http://127.0.0.1:8080/blobs/x"),  # same origin
        ("https://cp.example/v1/artifacts/x", "https://cp.example/blobs/x"),
        ("http://127.0.0.1:8080/v1/artifacts/x", "https://cdn.example/x"),  # control plane -> CDN
        ("https://huggingface.co/r/resolve/main/m.gguf", "https://cdn-lfs.huggingface.co/r/m.gguf?x=1"),
    ],
)
def test_redirects_that_keep_or_raise_the_scheme_are_followed(source: str, target: str) -> None:
    assert redirect_problem(source, target) is None


@pytest.mark.parametrize(
    ("source", "target", "says"),
    [
        ("https://cdn.example/a", "http://cdn.example/a", "downgrade"),
        ("https://cdn.example/a", "http://other.example/a", "downgrade"),
        ("http://127.0.0.1:8080/a", "http://127.0.0.2:8080/a", "over plain http"),
        ("http://127.0.0.1:8080/a", "http://localhost:8080/a", "over plain http"),
        ("https://cdn.example/a", "https://127.0.0.1/a", "loopback"),
        ("https://cdn.example/a", "https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://cdn.example/a", "https://u:p@cdn2.example/a", "credentials"),
        ("https://cdn.example/a", "file:///etc/passwd", "file://"),
    ],
)
def test_redirects_that_weaken_the_transfer_are_refused(source: str, target: str, says: str) -> None:
    problem = redirect_problem(source, target)
    assert problem is not None and says in problem, problem


def test_an_allowed_private_host_may_be_redirected_to_over_https_only() -> None:
    assert redirect_problem("https://cdn.example/a", "https://10.0.0.5/a", allowed_hosts=["10.0.0.0/8"]) is None
    assert redirect_problem("https://cdn.example/a", "http://10.0.0.5/a", allowed_hosts=["10.0.0.0/8"]) is not None


def test_credentials_are_removed_from_a_reference_before_it_is_shown() -> None:
    assert without_credentials("https://user:secret@models.example:8443/a.gguf?x=1") == (
        "https://models.example:8443/a.gguf?x=1"
    )
    assert without_credentials("https://token@models.example/a") == "https://models.example/a"
    assert without_credentials("https://models.example/a@b") == "https://models.example/a@b"  # a path keeps its @
    assert without_credentials("https://[zz::1]/a") == "(an invalid URL)"


def test_secrets_in_a_references_query_string_are_redacted_before_it_is_shown() -> None:
    presigned = (
        "https://bucket.s3.amazonaws.com/m.gguf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026"
        "&X-Amz-Date=20261206T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=tok&X-Amz-Signature=abc123"
    )
    shown = shown_reference(presigned)
    assert "AKIA" not in shown and "abc123" not in shown and "=tok" not in shown
    assert shown.startswith("https://bucket.s3.amazonaws.com/m.gguf?X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    assert "X-Amz-Signature=REDACTED" in shown and "X-Amz-Expires=3600" in shown
    sas = shown_reference("https://acct.blob.core.windows.net/c/m.gguf?sv=2022&sig=s3cr3t&se=2026")
    assert sas == "https://acct.blob.core.windows.net/c/m.gguf?sv=2022&sig=REDACTED&se=2026"
    assert shown_reference("https://cdn.example/m.gguf?Signature=x&Key-Pair-Id=y&token=z&access_token=w") == (
        "https://cdn.example/m.gguf?Signature=REDACTED&Key-Pair-Id=REDACTED&token=REDACTED&access_token=REDACTED"
    )
    assert shown_reference("https://user:pw@models.example/a.gguf?rev=2") == "https://models.example/a.gguf?rev=2"
