"""traceroute and mtr from the client namespace through `ramp client run --tun`, with a router
between the connector and the origins (`Lab(router=True)`): every hop shows, in order.

    C --TUN/connect-ip--> edge (hop 1) --tunnel--> connector in P (hop 2) --> router R (hop 3)
      --> origin (hop 4)

The edge answers TTL expiry from its own address (the first of its connect-ip pool), the
connector from its address toward the destination, and the connector turns the router's
time-exceeded (IP_RECVERR) into a packet from the router's address.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from test_tun_client import ping, start_tun_lab

from ramp.testing.lab import (
    ORIGIN,
    ORIGIN6,
    PRIVATE_ROUTER_ADDR,
    PRIVATE_ROUTER_ADDR6,
    ROUTER_ADDR,
    ROUTER_ADDR6,
    Lab,
    LabProcess,
    Payload,
)

EDGE_HOP = "100.96.0.1"  # the first address of the edge's default masque_ip_pool
EDGE_HOP6 = "fd72:616d:7000::1"

LabOpener = Callable[..., AbstractContextManager[Lab]]


@pytest.fixture(scope="module")
def router_lab(
    tmp_path_factory: pytest.TempPathFactory, payload: Payload, lab_opener: LabOpener
) -> Iterator[tuple[Lab, LabProcess]]:
    with lab_opener(
        tmp_path_factory.mktemp("hops"), payload, standard=False, lab_kwargs={"router": True}
    ) as lab:
        yield lab, start_tun_lab(lab)


def traceroute_hops(lab: Lab, *args: str) -> list[str]:
    proc = lab.client.run(
        ["traceroute", "-I", "-n", "-q", "1", "-N", "1", "-w", "3", "-m", "8", *args],
        check=False,
        timeout=120,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    hops = []
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            hops.append(fields[1])
    return hops


def test_traceroute_lists_the_edge_the_connector_the_router_and_the_origin(
    router_lab: tuple[Lab, LabProcess],
) -> None:
    lab, _ = router_lab
    assert traceroute_hops(lab, ORIGIN) == [EDGE_HOP, PRIVATE_ROUTER_ADDR, ROUTER_ADDR, ORIGIN]


def test_traceroute_over_ipv6_too(router_lab: tuple[Lab, LabProcess]) -> None:
    lab, _ = router_lab
    assert traceroute_hops(lab, "-6", ORIGIN6) == [
        EDGE_HOP6,
        PRIVATE_ROUTER_ADDR6,
        ROUTER_ADDR6,
        ORIGIN6,
    ]


def test_mtr_reports_the_same_hops(router_lab: tuple[Lab, LabProcess]) -> None:
    lab, _ = router_lab
    proc = lab.client.run(
        ["mtr", "--report", "-c", "5", "-i", "0.2", "-n", ORIGIN], check=False, timeout=120
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    rows = re.findall(r"^\s*\d+\.\|--\s+(\S+)\s+([\d.]+)%", out, re.MULTILINE)
    assert [host for host, _ in rows] == [EDGE_HOP, PRIVATE_ROUTER_ADDR, ROUTER_ADDR, ORIGIN], out
    assert float(rows[-1][1]) == 0.0, out  # every probe reached the origin and came back


def test_echo_replies_keep_the_ttl_they_arrived_with(router_lab: tuple[Lab, LabProcess]) -> None:
    # the origin answers with TTL 64 and the router takes one: a reply rebuilt by the
    # connector would come back with a fresh 64
    lab, _ = router_lab
    for target, flag in ((ORIGIN, "-4"), (ORIGIN6, "-6")):
        got = ping(lab.client, target, flag, count=1)
        assert got.returncode == 0, got.stdout + got.stderr
        m = re.search(rb"(?:ttl|hlim)=(\d+)", got.stdout)
        assert m is not None, got.stdout
        assert int(m.group(1)) <= 63, got.stdout
