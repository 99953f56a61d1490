"""The connect-ip address pool: one address per request, honoured requests, reuse only later."""

from __future__ import annotations

import ipaddress

import pytest

from ramp.flows.ip_pool import AddressPool, PoolExhausted

A = ipaddress.ip_address


def test_addresses_come_from_the_pool_and_skip_the_edge_s_own() -> None:
    pool = AddressPool(["192.0.2.0/29", "2001:db8:1::/120"])
    assert pool.gateway(4) == A("192.0.2.1") and pool.gateway(6) == A("2001:db8:1::1")
    got = [pool.take(4) for _ in range(5)]
    assert got == [A(f"192.0.2.{i}") for i in range(2, 7)]  # not .0, .1 (edge) or .7
    with pytest.raises(PoolExhausted):
        pool.take(4)
    assert pool.take(6) == A("2001:db8:1::2")


def test_a_requested_address_is_given_when_free() -> None:
    pool = AddressPool(["192.0.2.0/24"])
    assert pool.take(4, A("192.0.2.50")) == A("192.0.2.50")
    # taken: another client asking for it gets another one
    other = pool.take(4, A("192.0.2.50"))
    assert other != A("192.0.2.50") and other in ipaddress.ip_network("192.0.2.0/24")
    # outside the pool, or the edge's own: not given
    assert pool.take(4, A("198.51.100.1")) not in (A("198.51.100.1"), A("192.0.2.50"))
    assert pool.take(4, A("192.0.2.1")) != A("192.0.2.1")


def test_an_address_given_back_is_not_reused_at_once() -> None:
    pool = AddressPool(["192.0.2.0/28"])
    first = pool.take(4)
    pool.give_back(first)
    assert pool.take(4) != first
    assert pool.in_use(4) == 1
    for _ in range(pool.capacity(4) - 1):
        pool.take(4)
    with pytest.raises(PoolExhausted):
        pool.take(4)
    pool.give_back(first)
    assert pool.take(4) == first  # the only free one


def test_a_pool_without_ipv6_has_no_ipv6_address() -> None:
    pool = AddressPool(["192.0.2.0/24"])
    assert pool.gateway(6) is None
    with pytest.raises(KeyError):
        pool.take(6)
