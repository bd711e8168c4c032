"""Webhook targets refused at submission: every spelling of a non-public address the OS resolver would accept,
this machine's names, names that resolve inward; resolution bounded in time."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from worker.service.webhooks import WebhookHostUnresolved, WebhookURLError, check_webhook_target, check_webhook_url

INWARD = ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "0", "0x", "127.0.1", "LOCALHOST.", "localhost..",
          "Foo.LocalHost", "ip6-localhost", "[::ffff:127.0.0.1]", "[::1]", "[::]", "[::127.0.0.1]",
          "[64:ff9b::a00:1]", "[2002:c0a8:101::1]", "[fe80::1%25eth0]", "10.1", "0x0a.0x0.0.1", "012.0.0.1",
          "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "224.0.0.1", "255.255.255.255",
          "ｌｏｃａｌｈｏｓｔ", "１２７.０.０.１", "127。0。0。1"]


@pytest.mark.parametrize("host", INWARD)
@pytest.mark.parametrize("resolve", [False, True])
def test_inward_hosts_are_refused(host, resolve):
    with pytest.raises(WebhookURLError) as err:
        check_webhook_url(f"http://{host}:8080/hook", allow_private=False, resolve=resolve)
    assert err.value.code == "webhook_url_not_allowed", err.value
    with pytest.raises(ValueError, match="webhook_url"):
        check_webhook_target(f"https://{host}/hook", allow_private=False, timeout=2)


@pytest.mark.parametrize("name", [socket.gethostname(), socket.getfqdn(), socket.gethostname().upper() + "."])
def test_this_machines_own_names_are_refused(name):
    with pytest.raises(WebhookURLError, match="this host|private"):
        check_webhook_target(f"http://{name}:9000/hook", allow_private=False)


@pytest.mark.parametrize(("host", "pinned"), [("8.8.8.8", "8.8.8.8"), ("134744072", "8.8.8.8"),
                                              ("0x08.0x08.0x08.0x08", "8.8.8.8"), ("1.1", "1.0.0.1"),
                                              ("[2001:4860:4860::8888]", "2001:4860:4860::8888")])
def test_public_literal_addresses_are_accepted_and_pinned_as_read(host, pinned):
    check_webhook_target(f"https://{host}/hook", allow_private=False)
    assert check_webhook_url(f"https://{host}/hook", allow_private=False, resolve=True) == [pinned]


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http:///x", "http://u:p@example.com/", "http://a..b/",
                                 "http://a b/", "http://[::1/", "http://example.com:99999/", "http://[zz::1]/"])
def test_malformed_urls_are_invalid(url):
    with pytest.raises(WebhookURLError) as err:
        check_webhook_target(url, allow_private=False)
    assert err.value.code == "invalid"


def test_allow_private_accepts_loopback():
    for url in ("http://127.0.0.1:9000/hook", "http://localhost:9000/hook", "http://2130706433/"):
        check_webhook_target(url, allow_private=True)
        assert check_webhook_url(url, allow_private=True, resolve=True) == []


@pytest.fixture
def dns(monkeypatch):
    """A resolver for `*.hook.example` names: answers[name] is a list of addresses, or a callable."""
    real, answers = socket.getaddrinfo, {}

    def fake(host, port, *args, **kwargs):
        if not str(host).endswith(".hook.example"):
            return real(host, port, *args, **kwargs)
        answer = answers[host]
        addrs = answer() if callable(answer) else answer
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in addrs]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return answers


@pytest.mark.parametrize("addrs", [["10.0.0.7"], ["93.184.215.14", "127.0.0.1"], ["::1"], ["::ffff:192.168.0.1"]])
def test_names_resolving_to_any_private_address_are_refused(dns, addrs):
    dns["inward.hook.example"] = addrs
    with pytest.raises(WebhookURLError, match="private"):
        check_webhook_target("https://inward.hook.example/hook", allow_private=False)


def test_a_public_name_is_accepted_and_its_addresses_returned(dns):
    dns["ok.hook.example"] = ["93.184.215.14", "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    check_webhook_target("https://ok.hook.example/hook", allow_private=False)
    assert check_webhook_url("https://ok.hook.example/hook", allow_private=False, resolve=True) == [
        "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]


def test_resolution_is_bounded_and_an_unanswered_name_is_left_to_delivery(dns):
    release = threading.Event()
    dns["slow.hook.example"] = lambda: release.wait(10) and ["10.0.0.1"]
    dns["gone.hook.example"] = lambda: (_ for _ in ()).throw(socket.gaierror(socket.EAI_NONAME, "no such name"))
    try:
        start = time.monotonic()
        with pytest.raises(WebhookHostUnresolved, match="no answer within"):
            check_webhook_url("https://slow.hook.example/", allow_private=False, resolve=True, resolve_timeout=0.3)
        check_webhook_target("https://slow.hook.example/", allow_private=False, timeout=0.3)
        assert time.monotonic() - start < 2, "a slow resolver held the check past its timeout"
        with pytest.raises(WebhookHostUnresolved, match="no such name"):
            check_webhook_url("https://gone.hook.example/", allow_private=False, resolve=True)
        check_webhook_target("https://gone.hook.example/", allow_private=False)
    finally:
        release.set()
