"""The hook runner as a user sees it: loading hook files, verdicts, and failing closed."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ramp.policy.hooks as hooks_module
from ramp.flows.flow import Decision, Destination, Flow, Identity, Route
from ramp.policy.hooks import (
    Allow,
    Deny,
    HookLoadError,
    Hooks,
    HookSpec,
    ProxyRequest,
    Reply,
    load_hooks,
)
from ramp.policy.hooks import LoadedHook as _LoadedHook

ALLOW_ALL = _LoadedHook(
    "policy", {"flow_start": lambda flow: Allow("test policy", "allow-all")}, {"flow_start": False}
)


class Recorder:
    """Stands in for the edge's metrics: what on_error and on_slow were told."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str, str]] = []
        self.slow: list[tuple[str, str]] = []

    def on_error(self, hook: str, point: str, kind: str) -> None:
        self.errors.append((hook, point, kind))

    def on_slow(self, hook: str, point: str) -> None:
        self.slow.append((hook, point))


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def hook_file(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def runner(
    tmp_path: Path, name: str, body: str, rec: Recorder, timeout: float = 0.05, **options: Any
) -> Hooks:
    loaded = load_hooks([HookSpec(hook_file(tmp_path, name, body), options)])
    return Hooks([ALLOW_ALL, *loaded], timeout, on_error=rec.on_error, on_slow=rec.on_slow)


def a_flow(user: str | None = "alice", host: str = "10.1.2.3", port: int = 80) -> Flow:
    return Flow(
        onramp="socks5",
        source=("192.0.2.10", 40000),
        destination=Destination(host, port),
        identity=Identity(user) if user is not None else None,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- loading ---------------------------------------------------------------------------------


def test_a_file_hook_loads_with_its_options(tmp_path: Path) -> None:
    path = hook_file(
        tmp_path,
        "opts",
        """
        seen = {}
        def setup(options):
            seen.update(options)
        def flow_start(flow):
            return None
        """,
    )
    [hook] = load_hooks([HookSpec(path, {"max": 3})])
    assert hook.name == "opts"
    assert set(hook.functions) == {"flow_start"}
    assert hook.functions["flow_start"].__globals__["seen"] == {"max": 3}


def test_a_module_hook_runs_its_top_level_once_per_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs.txt"
    (tmp_path / "ramp_test_counting_hook.py").write_text(
        textwrap.dedent(
            f"""
            with open({str(runs)!r}, "a") as f:
                f.write("ran\\n")
            def flow_start(flow):
                return None
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ramp_test_counting_hook", raising=False)
    [hook] = load_hooks([HookSpec("ramp_test_counting_hook")])
    assert hook.name == "ramp_test_counting_hook"
    assert runs.read_text().splitlines() == ["ran"]
    load_hooks([HookSpec("ramp_test_counting_hook")])  # a reload (SIGHUP) runs it again
    assert runs.read_text().splitlines() == ["ran", "ran"]
    sys.modules.pop("ramp_test_counting_hook", None)


def test_reloading_a_file_gives_fresh_state(tmp_path: Path) -> None:
    path = hook_file(tmp_path, "state", "count = [0]\ndef flow_start(flow):\n    count[0] += 1\n")
    [first] = load_hooks([HookSpec(path)])
    first.functions["flow_start"](a_flow())
    [second] = load_hooks([HookSpec(path)])
    assert first.functions["flow_start"].__globals__["count"] == [1]
    assert second.functions["flow_start"].__globals__["count"] == [0]


def test_a_hook_file_may_define_dataclasses(tmp_path: Path) -> None:
    # dataclasses look their module up in sys.modules while the class is made
    body = """
        from __future__ import annotations
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Limit:
            flows: int

        LIMIT = Limit(3)

        def flow_start(flow):
            flow.annotations["limit"] = str(LIMIT.flows)
        """
    path = hook_file(tmp_path, "typed", body)
    load_hooks([HookSpec(path)])
    [hook] = load_hooks([HookSpec(path)])  # and again, as a reload does
    f = a_flow()
    assert run(Hooks([ALLOW_ALL, hook], 0.05).flow_start(f)).allowed
    assert f.annotations == {"limit": "3"}
    names = [
        n
        for n, m in sys.modules.items()
        if n.startswith("ramp_user_hook_") and getattr(m, "__file__", None) == path
    ]
    assert len(names) == 1  # reloads do not pile up modules


def test_addons_objects_are_hooks_of_their_own(tmp_path: Path) -> None:
    path = hook_file(
        tmp_path,
        "two",
        """
        class Tag:
            def __init__(self, key):
                self.key = key
            def setup(self, options):
                self.value = options["value"]
            def flow_start(self, flow):
                flow.annotations[self.key] = self.value

        addons = [Tag("a"), Tag("b")]
        """,
    )
    loaded = load_hooks([HookSpec(path, {"value": "v"})])
    assert [h.name for h in loaded] == ["two[0]", "two[1]"]
    flow = a_flow()
    decision = run(Hooks([ALLOW_ALL, *loaded], 0.05).flow_start(flow))
    assert decision.allowed
    assert flow.annotations == {"a": "v", "b": "v"}


@pytest.mark.parametrize(
    ("body", "options", "message"),
    [
        ("def flow_start(flow):\n    return (\n", {}, "SyntaxError"),
        ("import no_such_module_here\n", {}, "ModuleNotFoundError"),
        (
            "def setup(options):\n    raise ValueError('max_flows must be > 0')\n"
            "def flow_start(flow):\n    pass\n",
            {"max_flows": 0},
            "setup failed: ValueError: max_flows must be > 0",
        ),
        ("def flow_start(flow):\n    pass\n", {"x": 1}, "takes no options"),
        ("def setup(options):\n    pass\n", {}, "defines none of flow_start, route"),
        ("addons = object()\n", {}, "addons must be a list"),
        ("import sys\nsys.exit('bye')\n", {}, "SystemExit: bye"),
    ],
    ids=[
        "syntax",
        "import",
        "setup-raises",
        "options-without-setup",
        "no-hooks",
        "bad-addons",
        "exit",
    ],
)
def test_a_broken_hook_fails_to_load_with_a_clear_message(
    tmp_path: Path, body: str, options: dict[str, Any], message: str
) -> None:
    path = hook_file(tmp_path, "broken", body)
    with pytest.raises(HookLoadError, match=message) as info:
        load_hooks([HookSpec(path, options)])
    assert "broken" in str(info.value)


def test_a_missing_hook_file_or_module_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(HookLoadError, match=r"hook file .*nope\.py does not exist"):
        load_hooks([HookSpec(str(tmp_path / "nope.py"))])
    with pytest.raises(HookLoadError, match="hook module no_such_hook_module"):
        load_hooks([HookSpec("no_such_hook_module")])


def test_loading_is_all_or_nothing(tmp_path: Path) -> None:
    good = hook_file(tmp_path, "good", "def flow_start(flow):\n    pass\n")
    with pytest.raises(HookLoadError):
        load_hooks([HookSpec(good), HookSpec(str(tmp_path / "missing.py"))])


# -- flow_start ------------------------------------------------------------------------------


def test_the_first_deny_wins_and_later_hooks_are_not_asked() -> None:
    calls: list[str] = []
    deny = _LoadedHook(
        "deny", {"flow_start": lambda f: calls.append("deny") or Deny("no")}, {"flow_start": False}
    )
    later = _LoadedHook(
        "later", {"flow_start": lambda f: calls.append("later")}, {"flow_start": False}
    )
    hooks = Hooks([ALLOW_ALL, deny, later], 0.05)
    assert run(hooks.flow_start(a_flow())) == Decision(False, "hook:deny", "no")
    assert calls == ["deny"]


def test_a_deny_may_name_its_own_rule(tmp_path: Path, rec: Recorder) -> None:
    hooks = runner(
        tmp_path,
        "r",
        "from ramp.policy.hooks import Deny\n"
        "def flow_start(flow):\n    return Deny('quota', 'quota-rule')\n",
        rec,
    )
    assert run(hooks.flow_start(a_flow())) == Decision(False, "quota-rule", "quota")


def test_hooks_with_nothing_to_say_keep_the_policy_verdict(tmp_path: Path, rec: Recorder) -> None:
    hooks = runner(tmp_path, "quiet", "async def flow_start(flow):\n    return None\n", rec)
    assert run(hooks.flow_start(a_flow())) == Decision(True, "allow-all", "test policy")
    assert rec.errors == [] and rec.slow == []


def test_the_policy_deny_comes_before_any_user_hook(tmp_path: Path, rec: Recorder) -> None:
    policy = _LoadedHook(
        "policy", {"flow_start": lambda f: Deny("no rule", "default")}, {"flow_start": False}
    )
    [user] = load_hooks(
        [HookSpec(hook_file(tmp_path, "u", "def flow_start(flow):\n    raise RuntimeError\n"))]
    )
    hooks = Hooks([policy, user], 0.05, on_error=rec.on_error)
    assert run(hooks.flow_start(a_flow())) == Decision(False, "default", "no rule")
    assert rec.errors == []


def test_a_hook_that_raises_fails_closed(
    tmp_path: Path, rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = runner(tmp_path, "boom", "def flow_start(flow):\n    raise KeyError('x')\n", rec)
    with caplog.at_level(logging.WARNING, "ramp.policy.hooks"):
        assert run(hooks.flow_start(a_flow())) == Decision(False, "hook:boom", "hook_error")
    assert rec.errors == [("boom", "flow_start", "raised")]
    assert "hook boom flow_start: raised: KeyError" in caplog.text


@pytest.mark.parametrize("kind", ["def", "async def"])
def test_a_hook_calling_sys_exit_fails_closed_and_the_edge_goes_on(
    tmp_path: Path, rec: Recorder, kind: str
) -> None:
    body = f"import sys\n{kind} flow_start(flow):\n    sys.exit(3)\n"
    hooks = runner(tmp_path, "quitter", body, rec)

    async def twice() -> list[Decision]:
        return [await hooks.flow_start(a_flow()), await hooks.flow_start(a_flow())]

    failed = Decision(False, "hook:quitter", "hook_error")
    assert run(twice()) == [failed, failed]
    assert rec.errors == [("quitter", "flow_start", "raised")] * 2


def test_failures_are_all_counted_but_logged_rate_limited(
    tmp_path: Path, rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = runner(tmp_path, "boom", "def flow_start(flow):\n    raise KeyError('x')\n", rec)

    async def many() -> None:
        for _ in range(50):
            await hooks.flow_start(a_flow())

    with caplog.at_level(logging.WARNING, "ramp.policy.hooks"):
        run(many())
    assert len(rec.errors) == 50
    assert 1 <= len(caplog.records) <= 10


def test_an_async_hook_past_the_timeout_fails_closed(tmp_path: Path, rec: Recorder) -> None:
    body = """
        import asyncio
        async def flow_start(flow):
            await asyncio.Event().wait()  # an answer that never comes
        """
    hooks = runner(tmp_path, "stuck", body, rec, timeout=0.01)
    assert run(hooks.flow_start(a_flow())) == Decision(False, "hook:stuck", "hook_error")
    assert rec.errors == [("stuck", "flow_start", "timeout")]


def test_a_sync_hook_returning_a_coroutine_is_held_to_the_timeout(
    tmp_path: Path, rec: Recorder
) -> None:
    body = """
        import asyncio
        def flow_start(flow):
            return asyncio.Event().wait()
        """
    hooks = runner(tmp_path, "sneaky", body, rec, timeout=0.01)
    assert run(hooks.flow_start(a_flow())) == Decision(False, "hook:sneaky", "hook_error")
    assert rec.errors == [("sneaky", "flow_start", "timeout")]


class FakeClock:
    """A perf_counter that moves one second per reading: every sync call looks slow."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def slow_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(hooks_module, "time", FakeClock())
    yield


def test_a_slow_sync_hook_is_allowed_but_counted(
    tmp_path: Path, rec: Recorder, slow_clock: None, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = runner(tmp_path, "sluggish", "def flow_start(flow):\n    return None\n", rec)
    with caplog.at_level(logging.WARNING, "ramp.policy.hooks"):
        decision = run(hooks.flow_start(a_flow()))
    assert decision.allowed
    # the built-in policy is a sync hook too, and under this clock it is just as slow
    assert ("sluggish", "flow_start") in rec.slow
    assert rec.errors == []
    assert "sync hooks must not block" in caplog.text


def test_a_fast_sync_hook_is_not_counted_slow(tmp_path: Path, rec: Recorder) -> None:
    hooks = runner(tmp_path, "quick", "def flow_start(flow):\n    return None\n", rec, timeout=5)
    assert run(hooks.flow_start(a_flow())).allowed
    assert rec.slow == []


@pytest.mark.parametrize("value", ["True", "'deny'", "Decision(False, None)", "Reply(200)"])
def test_a_verdict_that_is_not_allow_or_deny_fails_closed(
    tmp_path: Path, rec: Recorder, value: str
) -> None:
    body = f"""
        from ramp.flows.flow import Decision
        from ramp.policy.hooks import Reply
        def flow_start(flow):
            return {value}
        """
    hooks = runner(tmp_path, "odd", body, rec)
    assert run(hooks.flow_start(a_flow())) == Decision(False, "hook:odd", "hook_error")
    assert rec.errors == [("odd", "flow_start", "raised")]


# -- route -----------------------------------------------------------------------------------

ANY = Route("tunnel", "default", "t1", "corp", "10.0.0.0/8")
R1 = Route("tunnel", "default", "t1", "corp", "10.0.0.0/8", "conn-1")
R2 = Route("tunnel", "default", "t1", "corp", "10.0.0.0/8", "conn-2")


def test_a_route_hook_picks_a_candidate(tmp_path: Path, rec: Recorder) -> None:
    body = """
        def route(flow, candidates):
            return candidates[-1]
        """
    hooks = runner(tmp_path, "last", body, rec)
    assert hooks.has("route")
    assert run(hooks.route(a_flow(), [ANY, R1, R2])) == R2


def test_without_an_answer_the_first_candidate_is_used(tmp_path: Path, rec: Recorder) -> None:
    hooks = runner(tmp_path, "none", "def route(flow, candidates):\n    return None\n", rec)
    assert run(hooks.route(a_flow(), [ANY, R1])) == ANY


def test_a_route_hook_may_deny(tmp_path: Path, rec: Recorder) -> None:
    body = """
        from ramp.policy.hooks import Deny
        def route(flow, candidates):
            return Deny("replica down")
        """
    hooks = runner(tmp_path, "strict", body, rec)
    assert run(hooks.route(a_flow(), [ANY, R1])) == Deny("replica down", "hook:strict")


def test_a_route_that_is_not_a_candidate_fails_closed(tmp_path: Path, rec: Recorder) -> None:
    body = """
        from ramp.flows.flow import Route
        def route(flow, candidates):
            return Route("direct")
        """
    hooks = runner(tmp_path, "rogue", body, rec)
    assert run(hooks.route(a_flow(), [ANY, R1])) == Deny("hook_error", "hook:rogue")
    assert rec.errors == [("rogue", "route", "raised")]


def test_a_route_hook_cannot_change_the_candidates(tmp_path: Path, rec: Recorder) -> None:
    body = """
        def route(flow, candidates):
            candidates.clear()
        """
    hooks = runner(tmp_path, "vandal", body, rec)
    candidates = [ANY, R1]
    assert run(hooks.route(a_flow(), candidates)) == ANY
    assert candidates == [ANY, R1]


def test_a_route_hook_that_raises_fails_closed(tmp_path: Path, rec: Recorder) -> None:
    hooks = runner(tmp_path, "bad", "def route(flow, candidates):\n    1 / 0\n", rec)
    assert run(hooks.route(a_flow(), [ANY, R1])) == Deny("hook_error", "hook:bad")
    assert rec.errors == [("bad", "route", "raised")]


# -- connect_request -------------------------------------------------------------------------

REQUEST = ProxyRequest("CONNECT", "mail.example:25", (("Host", "mail.example:25"),))


def test_a_connect_request_hook_may_answer_or_deny(tmp_path: Path, rec: Recorder) -> None:
    body = """
        from ramp.policy.hooks import Deny, Reply
        def connect_request(flow, request):
            if request.target.endswith(":25"):
                return Deny("no SMTP")
            return Reply(200, "ok", (("X-Edge", "yes"),))
        """
    hooks = runner(tmp_path, "guard", body, rec)
    assert run(hooks.connect_request(a_flow(), REQUEST)) == Deny("no SMTP", "hook:guard")
    other = ProxyRequest("GET", "http://edge.internal/health", ())
    assert run(hooks.connect_request(a_flow(), other)) == Reply(200, "ok", (("X-Edge", "yes"),))


def test_connect_request_without_an_answer_lets_the_flow_go_on(
    tmp_path: Path, rec: Recorder
) -> None:
    body = """
        from ramp.policy.hooks import Allow
        def connect_request(flow, request):
            return Allow() if request.header("host") else None
        """
    hooks = runner(tmp_path, "pass", body, rec)
    assert run(hooks.connect_request(a_flow(), REQUEST)) is None
    assert rec.errors == []


@pytest.mark.parametrize("body", ["return 'HTTP/1.1 200 OK'", "raise OSError('disk')"])
def test_a_connect_request_hook_that_fails_denies(tmp_path: Path, rec: Recorder, body: str) -> None:
    hooks = runner(tmp_path, "cr", f"def connect_request(flow, request):\n    {body}\n", rec)
    assert run(hooks.connect_request(a_flow(), REQUEST)) == Deny("hook_error", "hook:cr")
    assert rec.errors == [("cr", "connect_request", "raised")]


# -- flow_end --------------------------------------------------------------------------------

RECORD = {"flow": 7, "identity": "alice", "result": "ok"}


def test_flow_end_errors_are_counted_and_do_not_stop_other_hooks(
    tmp_path: Path, rec: Recorder
) -> None:
    seen: list[dict[str, Any]] = []
    failing = load_hooks(
        [HookSpec(hook_file(tmp_path, "fe", "def flow_end(record):\n    raise ValueError\n"))]
    )
    collector = _LoadedHook("collect", {"flow_end": seen.append}, {"flow_end": False})
    hooks = Hooks([ALLOW_ALL, *failing, collector], 0.05, on_error=rec.on_error)
    hooks.flow_end(dict(RECORD))  # does not raise
    assert rec.errors == [("fe", "flow_end", "raised")]
    assert seen == [RECORD]


def test_each_flow_end_hook_gets_its_own_record(tmp_path: Path, rec: Recorder) -> None:
    body = """
        def flow_end(record):
            record["annotations"]["seen"] = "yes"
            record["result"] = "changed"
        """
    [meddler] = load_hooks([HookSpec(hook_file(tmp_path, "meddler", body))])
    seen: list[dict[str, Any]] = []
    collector = _LoadedHook("collect", {"flow_end": seen.append}, {"flow_end": False})
    hooks = Hooks([ALLOW_ALL, meddler, collector], 0.05, on_error=rec.on_error)
    record = {**RECORD, "annotations": {"team": "db"}}
    hooks.flow_end(record)
    assert seen == [{**RECORD, "annotations": {"team": "db"}}]
    assert record == {**RECORD, "annotations": {"team": "db"}}
    assert rec.errors == []


def test_async_flow_end_runs_and_its_errors_are_counted(tmp_path: Path, rec: Recorder) -> None:
    body = """
        import asyncio
        got = []
        async def flow_end(record):
            await asyncio.sleep(0)
            got.append(record["flow"])
            record["flow"] = None  # a hook's copy: the audit record is not changed
            raise RuntimeError("after the fact")
        """
    hooks = runner(tmp_path, "later", body, rec)
    record = dict(RECORD)

    async def end() -> None:
        hooks.flow_end(record)
        for _ in range(5):
            await asyncio.sleep(0)

    run(end())
    got = hooks._by_point["flow_end"][0].functions["flow_end"].__globals__["got"]
    assert got == [7]
    assert record == RECORD
    assert rec.errors == [("later", "flow_end", "raised")]


def test_async_flow_end_past_the_timeout_is_counted(tmp_path: Path, rec: Recorder) -> None:
    body = """
        import asyncio
        async def flow_end(record):
            await asyncio.Event().wait()
        """
    hooks = runner(tmp_path, "hang", body, rec, timeout=0.01)

    async def end() -> None:
        hooks.flow_end(dict(RECORD))
        while not rec.errors:
            await asyncio.sleep(0.005)

    asyncio.run(asyncio.wait_for(end(), 5))
    assert rec.errors == [("hang", "flow_end", "timeout")]


def test_async_flow_end_outside_an_event_loop_is_counted_not_raised(
    tmp_path: Path, rec: Recorder
) -> None:
    hooks = runner(tmp_path, "noloop", "async def flow_end(record):\n    pass\n", rec)
    hooks.flow_end(dict(RECORD))
    assert rec.errors == [("noloop", "flow_end", "raised")]


def test_a_slow_sync_flow_end_is_counted(tmp_path: Path, rec: Recorder, slow_clock: None) -> None:
    hooks = runner(tmp_path, "slowend", "def flow_end(record):\n    pass\n", rec)
    hooks.flow_end(dict(RECORD))
    assert rec.slow == [("slowend", "flow_end")]
