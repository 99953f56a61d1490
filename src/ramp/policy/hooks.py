"""Python hooks: the API users program the edge with.

A hook file (or module) defines any of these functions, sync or async, at module level or on
the objects of a module-level `addons` list (the mitmproxy shape):

    flow_start(flow)                  -> Allow | Deny | None   (may annotate flow.annotations)
    route(flow, candidates)           -> Route | Deny | None   (pick one of the candidates)
    connect_request(flow, request)    -> Reply | Deny | None   (answer an HTTP proxy request)
    flow_end(record)                  -> None                  (the final audit record, a dict)

and optionally `setup(options)`, called once at load with the `options` of its config entry.
Async hooks run under a timeout; a sync hook cannot be interrupted, so one slower than the
timeout is logged and counted, and must not block. A hook that raises or times out fails
closed: the flow is denied with reason `hook_error`. Nothing a hook does takes the process down.
See docs/hooks.md.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ramp.flows.answers import Allow, Deny, ProxyRequest, Reply
from ramp.flows.flow import Decision, Flow, Route
from ramp.observe.loglimit import LogLimiter

log = logging.getLogger(__name__)

__all__ = [
    "Allow",
    "Deny",
    "HookLoadError",
    "HookSpec",
    "Hooks",
    "ProxyRequest",
    "Reply",
    "load_hooks",
]

HOOK_POINTS = ("flow_start", "route", "connect_request", "flow_end")
HOOK_ERROR = "hook_error"
# What a hook may raise without taking the edge down: a stray sys.exit() in a hook is a bug in
# the hook, not a request to stop the process. KeyboardInterrupt stays the operator's.
_HOOK_FAILURES = (Exception, SystemExit)


class HookLoadError(Exception):
    """A hook file or module cannot be loaded; the message says which and why."""


@dataclass(slots=True)
class HookSpec:
    """A config entry: a file path or a module name, and options for its `setup`."""

    source: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class LoadedHook:
    name: str
    functions: dict[str, Callable[..., Any]]
    is_async: dict[str, bool]
    # The built-in policy's own decision function: called directly, without the timing and
    # answer checks user code gets (it is ours, synchronous and quick).
    builtin: Callable[[Flow], Decision] | None = None


_file_modules: dict[Path, str] = {}  # hook file -> the sys.modules name of its newest load


def _load_module(source: str, counter: int) -> ModuleType:
    path = Path(source)
    if source.endswith(".py") or path.is_file():
        if not path.is_file():
            raise HookLoadError(f"hook file {source} does not exist")
        # a unique module name per load, so a reload really re-executes the file
        name = f"ramp_user_hook_{counter}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise HookLoadError(f"hook file {source} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        # Registered while it runs, as an import would be: dataclasses, typing and pickle look
        # a class's module up in sys.modules, and fail without it.
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except _HOOK_FAILURES as e:
            del sys.modules[name]
            raise HookLoadError(f"hook file {source}: {type(e).__name__}: {e}") from e
        # Only the newest load of a file stays registered; older ones live on while hooks
        # loaded from them are still in use, then go.
        previous = _file_modules.get(path.resolve())
        if previous is not None:
            sys.modules.pop(previous, None)
        _file_modules[path.resolve()] = name
        return module
    # Only a module imported before (an earlier load) is reloaded: reloading a fresh import
    # would run its top level, and so any state it sets up, twice.
    loaded_before = source in sys.modules
    try:
        module = importlib.import_module(source)
        return importlib.reload(module) if loaded_before else module
    except _HOOK_FAILURES as e:
        raise HookLoadError(f"hook module {source}: {type(e).__name__}: {e}") from e


_loads = 0


def load_hooks(specs: Sequence[HookSpec]) -> list[LoadedHook]:
    """Import every hook and call its `setup(options)`; all or nothing (HookLoadError)."""
    global _loads
    loaded: list[LoadedHook] = []
    for spec in specs:
        _loads += 1
        module = _load_module(spec.source, _loads)
        addons = getattr(module, "addons", None)
        if addons is not None and not isinstance(addons, list | tuple):
            raise HookLoadError(
                f"hook {spec.source}: addons must be a list of objects, not {type(addons).__name__}"
            )
        targets: list[Any] = list(addons or [module])
        for i, target in enumerate(targets):
            name = Path(spec.source).stem if spec.source.endswith(".py") else spec.source
            if len(targets) > 1:
                name = f"{name}[{i}]"
            setup = getattr(target, "setup", None)
            if callable(setup):
                try:
                    setup(dict(spec.options))
                except _HOOK_FAILURES as e:
                    raise HookLoadError(
                        f"hook {name}: setup failed: {type(e).__name__}: {e}"
                    ) from e
            elif spec.options:
                raise HookLoadError(f"hook {name} takes no options (it has no setup function)")
            functions = {
                p: getattr(target, p) for p in HOOK_POINTS if callable(getattr(target, p, None))
            }
            if not functions:
                raise HookLoadError(f"hook {name} defines none of {', '.join(HOOK_POINTS)}")
            loaded.append(
                LoadedHook(
                    name,
                    functions,
                    {p: inspect.iscoroutinefunction(f) for p, f in functions.items()},
                )
            )
    return loaded


_NESTED = ("annotations",)  # the record's only nested mapping (observe.audit.flow_record)


def _copy(record: dict[str, Any]) -> dict[str, Any]:
    # Each flow_end hook gets its own record, nested annotations included, so one hook's
    # changes never show in what the next one sees.
    copy = dict(record)
    for k in _NESTED:
        if isinstance(copy.get(k), dict):
            copy[k] = dict(copy[k])
    return copy


async def _contained(awaitable: Any) -> Any:
    # wait_for runs the hook in a task of its own, and a task re-raises SystemExit into the
    # event loop, which would stop the edge: turn it into an ordinary failure inside the task.
    try:
        return await awaitable
    except SystemExit as e:
        raise RuntimeError(f"hook called sys.exit({e.code!r})") from e


_ANSWERS = (Allow, Deny, Reply, Route)


class HookError(Exception):
    def __init__(self, hook: str, point: str, kind: str, detail: str) -> None:
        super().__init__(f"hook {hook} {point}: {kind}: {detail}")
        self.hook = hook
        self.point = point
        self.kind = kind


class Hooks:
    """Runs the hooks of each point in order; the built-in policy is the first hook."""

    def __init__(
        self,
        hooks: Sequence[LoadedHook],
        timeout: float,
        on_error: Callable[[str, str, str], None] | None = None,
        on_slow: Callable[[str, str], None] | None = None,
    ) -> None:
        self.hooks = list(hooks)
        self.timeout = timeout
        self._on_error = on_error
        self._on_slow = on_slow
        self._log = LogLimiter()
        self._pending: set[asyncio.Task[Any]] = set()
        self._by_point: dict[str, list[LoadedHook]] = {
            p: [h for h in self.hooks if p in h.functions] for p in HOOK_POINTS
        }

    def has(self, point: str) -> bool:
        return bool(self._by_point[point])

    async def _call(self, hook: LoadedHook, point: str, *args: Any) -> Any:
        fn = hook.functions[point]
        try:
            if hook.is_async[point]:
                try:
                    return await asyncio.wait_for(_contained(fn(*args)), self.timeout)
                except TimeoutError:
                    raise HookError(
                        hook.name, point, "timeout", f"no answer within {self.timeout * 1000:g} ms"
                    ) from None
            value = self._call_sync(hook, point, fn, *args)
            # a sync function that returned a coroutine (the usual answers skip the ABC check)
            if value is not None and type(value) not in _ANSWERS and inspect.isawaitable(value):
                try:
                    value = await asyncio.wait_for(_contained(value), self.timeout)
                except TimeoutError:
                    raise HookError(
                        hook.name, point, "timeout", f"no answer within {self.timeout * 1000:g} ms"
                    ) from None
            return value
        except HookError:
            raise
        except asyncio.CancelledError:
            raise
        except _HOOK_FAILURES as e:
            raise HookError(hook.name, point, "raised", f"{type(e).__name__}: {e}") from e

    def _call_sync(self, hook: LoadedHook, point: str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        value = fn(*args)
        elapsed = time.perf_counter() - started
        if elapsed > self.timeout:
            if self._on_slow is not None:
                self._on_slow(hook.name, point)
            if self._log.allow((hook.name, point, "slow")):
                log.warning(
                    "hook %s %s took %.0f ms, over its %.0f ms budget: sync hooks must "
                    "not block (make it async)",
                    hook.name,
                    point,
                    elapsed * 1000,
                    self.timeout * 1000,
                )
        return value

    def _failed(self, e: HookError) -> None:
        if self._on_error is not None:
            self._on_error(e.hook, e.point, e.kind)
        if self._log.allow((e.hook, e.point, e.kind)):
            log.warning("%s (failing closed)", e)

    async def flow_start(self, flow: Flow) -> Decision:
        """Every hook's verdict; the first Deny wins, else the last rule that allowed."""
        hooks = self._by_point["flow_start"]
        if len(hooks) == 1 and hooks[0].builtin is not None:
            return hooks[0].builtin(flow)  # the default set-up: just the policy
        allowed: Allow | None = None
        for hook in hooks:
            try:
                verdict = await self._call(hook, "flow_start", flow)
            except HookError as e:
                self._failed(e)
                return Decision(False, f"hook:{e.hook}", HOOK_ERROR)
            if isinstance(verdict, Deny):
                return Decision(False, verdict.rule or f"hook:{hook.name}", verdict.reason)
            if isinstance(verdict, Allow) and (allowed is None or verdict.rule is not None):
                allowed = verdict
            elif verdict is not None and not isinstance(verdict, Allow):
                self._failed(HookError(hook.name, "flow_start", "raised", f"returned {verdict!r}"))
                return Decision(False, f"hook:{hook.name}", HOOK_ERROR)
        if allowed is None:
            return Decision(False, None, "no hook allowed the flow")
        return Decision(True, allowed.rule, allowed.reason)

    async def route(self, flow: Flow, candidates: list[Route]) -> Route | Deny:
        choice = candidates[0]
        for hook in self._by_point["route"]:
            try:
                picked = await self._call(hook, "route", flow, list(candidates))
            except HookError as e:
                self._failed(e)
                return Deny(HOOK_ERROR, f"hook:{e.hook}")
            if picked is None:
                continue
            if isinstance(picked, Deny):
                return Deny(picked.reason, picked.rule or f"hook:{hook.name}")
            if picked not in candidates:
                self._failed(
                    HookError(hook.name, "route", "raised", f"returned a non-candidate {picked!r}")
                )
                return Deny(HOOK_ERROR, f"hook:{hook.name}")
            choice = picked
        return choice

    async def connect_request(self, flow: Flow, request: ProxyRequest) -> Reply | Deny | None:
        for hook in self._by_point["connect_request"]:
            try:
                answer = await self._call(hook, "connect_request", flow, request)
            except HookError as e:
                self._failed(e)
                return Deny(HOOK_ERROR, f"hook:{e.hook}")
            if isinstance(answer, Deny):
                return Deny(answer.reason, answer.rule or f"hook:{hook.name}")
            if isinstance(answer, Reply):
                return answer
            if answer is not None and not isinstance(answer, Allow):
                # An answer the edge cannot send must not let the request through unchecked.
                self._failed(
                    HookError(hook.name, "connect_request", "raised", f"returned {answer!r}")
                )
                return Deny(HOOK_ERROR, f"hook:{hook.name}")
        return None

    def flow_end(self, record: dict[str, Any]) -> None:
        hooks = self._by_point["flow_end"]
        if not hooks:
            return
        for hook in hooks:
            fn = hook.functions["flow_end"]
            try:
                if hook.is_async["flow_end"]:
                    task = asyncio.get_running_loop().create_task(
                        self._call(hook, "flow_end", _copy(record))
                    )
                    # The loop keeps only weak references to tasks: without this one an
                    # unfinished flow_end could be collected before it runs to its end.
                    self._pending.add(task)
                    task.add_done_callback(self._flow_end_done)
                else:
                    self._call_sync(hook, "flow_end", fn, _copy(record))
            except _HOOK_FAILURES as e:
                self._failed(HookError(hook.name, "flow_end", "raised", f"{type(e).__name__}: {e}"))

    def _flow_end_done(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        e = task.exception()
        if isinstance(e, HookError):
            self._failed(e)
