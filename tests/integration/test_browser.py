"""A real browser through the edge: headless Chromium in C, SOCKS5 on-ramp, a private page.

The page (30 images) lives on the private origin; Chromium runs in the client namespace with
`--proxy-server=socks5://203.0.113.1:1080` and the page itself counts the images that loaded.
C gets a default route to the edge (which forwards nothing) so that any connection Chromium
tried besides the proxy would leave a packet for the egress watch to see.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ramp.testing.browser import (
    WINDOW,
    EgressWatch,
    gallery_page,
    load_page,
    png_size,
    watch_egress,
    write_files,
)
from ramp.testing.lab import (
    APP_NAME,
    CLIENT_SOCKS,
    DNS_ZONE,
    EDGE_PUBLIC_ADDR,
    EDGE_PUBLIC_ADDR6,
    HTTP_PORT,
    MASQUE_PORT,
    ORIGIN,
    ORIGIN_NAME,
    ORIGIN_PREFIX,
    PRIVATE_DNS,
    SOCKS_PORT,
    SOCKS_PROXY,
    Lab,
    make_payload,
    wait_until,
)
from ramp.testing.origins import INDEX_BODY

IMAGES = 30
PROXIES = {
    "edge": (f"socks5://{SOCKS_PROXY}", "socks5"),  # the edge's own SOCKS5 on-ramp
    "client": (f"socks5://{CLIENT_SOCKS}", "masque"),  # `ramp client run` in C, over MASQUE
}
PROBE_PORT = 9  # nothing listens there: the probe only has to leave C


@pytest.fixture(scope="module", params=list(PROXIES))
def browser_lab(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    lab_opener: Callable[..., Any],
) -> Iterator[tuple[Lab, EgressWatch, str]]:
    """Tunnel "corp" for the origins and corp.example, an edge, a connector resolving with the
    private dnsmasq; the gallery under /gallery/ of the origin; an egress watch on C. For
    "client", `ramp client run` in C as well (a lab of its own: once a client identity
    exists, the edge's SOCKS5 on-ramp wants credentials, which Chromium cannot give)."""
    via: str = request.param
    # A small payload of its own: the session's 100 MiB file is of no use to a browser.
    payload = make_payload(tmp_path_factory.mktemp("www"), big_size=64 * 1024)
    write_files(payload.directory / "gallery", gallery_page(IMAGES))
    with lab_opener(tmp_path_factory.mktemp("browser"), payload, standard=False) as lab:
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
        lab.add_dns_route(DNS_ZONE, "corp")
        lab.start_edge()
        lab.start_connector(token, "--connect-timeout", "2", "--dns-resolver", PRIVATE_DNS)
        lab.wait_tunnel_connections("corp", 1)
        # The edge learns DNS routes from its store poll: the private name works once curl
        # gets through with it.
        wait_until(
            lambda: (
                lab.curl("--socks5-hostname", SOCKS_PROXY, f"http://{APP_NAME}/", timeout=5).stdout
                == INDEX_BODY
            ),
            30,
            interval=0.2,
            what=f"{APP_NAME} to be reachable through the edge",
        )
        if via == "client":
            lab.start_client(lab.client_token("browser"))
        watch = watch_egress(
            lab.client,
            [(EDGE_PUBLIC_ADDR, SOCKS_PORT), (EDGE_PUBLIC_ADDR, MASQUE_PORT)],
            gateways=[EDGE_PUBLIC_ADDR, EDGE_PUBLIC_ADDR6],
        )
        _check_the_watch_sees(lab, watch)
        yield lab, watch, via


def _check_the_watch_sees(lab: Lab, watch: EgressWatch) -> None:
    """An empty watch proves something only if it would have caught a packet: send one."""

    def probe() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"probe", (EDGE_PUBLIC_ADDR, PROBE_PORT))

    lab.client.call(probe)
    assert watch.seen() == [f"{EDGE_PUBLIC_ADDR} udp {PROBE_PORT}"]
    watch.reset()
    assert watch.seen() == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "host",
    [
        ORIGIN,  # Chromium sends the address
        ORIGIN_NAME,  # a name the edge resolves from its own /etc/hosts
        APP_NAME,  # a name only the private DNS knows, resolved through the tunnel
    ],
)
def test_chromium_loads_every_image_of_a_private_page(
    browser_lab: tuple[Lab, EgressWatch, str], tmp_path: Path, host: str
) -> None:
    lab, watch, via = browser_lab
    proxy, onramp = PROXIES[via]
    watch.reset()
    flows_before = len(lab.audit_records())
    shot = tmp_path / "gallery.png"

    result = load_page(
        f"http://{host}/gallery/index.html",
        proxy,
        screenshot=shot,
        timeout=60,
        netns=lab.client.name,
    )

    assert (result.loaded, result.total) == (IMAGES, IMAGES), f"failed: {result.failed}"
    assert f"loaded {IMAGES}/{IMAGES}" in result.dom
    data = shot.read_bytes()
    assert len(data) > 0
    assert png_size(data) == WINDOW
    # Nothing left C but the connections to the proxy ...
    assert watch.seen() == []
    # ... and the proxy was asked for the page's host only (the edge logs a flow as it ends).
    want = f"{host}:{HTTP_PORT}"
    records = wait_until(
        lambda: [r for r in lab.audit_records()[flows_before:] if r.get("onramp") == onramp],
        30,
        what=f"the edge's audit records of the flows to {want}",
    )
    assert {r["destination"] for r in records} == {want}
    assert all(r["result"] == "ok" for r in records), records
