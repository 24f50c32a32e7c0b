"""GET /healthz: is the portal itself able to do its job? For operators and load balancers.

The checks run at once, and the answer comes within DEADLINE seconds whatever hangs: a check
that has not finished by then counts as failed. Any failing check makes the answer a 503. For
staff (signed in, or with a staff user's API token), the body says which check failed and why, so
the first look at an outage is also the diagnosis; anyone else gets the status alone, since the
details name paths, versions and the portal's inner workings.
"""

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import timedelta

from django.conf import settings
from django.db import connection, connections
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.views import APIView

from . import services
from .backends.base import BackendError, get_backend
from .models import Heartbeat, Instance
from .reconciler import HEARTBEAT

RUNNER_STATE = "runner.json"  # in DATA_DIR: what `make run`'s runner (portal/runner.py) says
TIMEOUT = 1.0  # per network call
DEADLINE = 3.0  # for the whole answer
_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="healthz")
_inflight: dict[str, Future] = {}
_inflight_lock = threading.Lock()


class CheckFailed(Exception):
    pass


def database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return f"{connection.vendor} answers."


def broker() -> str:
    from portal.celery import app

    # One try, and a broker that accepts connections but never answers must not hold us either.
    options = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
    with app.connection_for_write(transport_options=options) as conn:
        conn.ensure_connection(max_retries=0, timeout=TIMEOUT)
    return "Reachable."


def workers() -> str:
    """A worker must serve the default queue; one that serves the webhooks queue is checked too,
    but its absence only degrades: deliveries wait (and are sent once it is back)."""
    from portal.celery import app

    try:
        broker()
    except Exception:  # noqa: BLE001 - the broker check reports why
        raise CheckFailed("Not checked: workers are reached through the broker.") from None
    # A connection of its own: a pooled one may be left from before the broker restarted, and fail
    # once ("Connection closed by server") though the broker and the workers are fine.
    with app.connection_for_write() as connection:
        answers = app.control.inspect(timeout=TIMEOUT, connection=connection).active_queues() or {}
    if not answers:
        raise CheckFailed(f"No worker answered a ping within {TIMEOUT:g} s.")
    served = {queue["name"] for queues in answers.values() for queue in queues or ()}
    default, hooks = settings.CELERY_TASK_DEFAULT_QUEUE, settings.STOCKROOM_WEBHOOK_QUEUE
    if default not in served:
        raise CheckFailed(f"No worker consumes the {default} queue: creates, actions and healing wait.")
    if hooks not in served:
        return f"Degraded: no worker consumes the {hooks} queue, so webhook deliveries wait; {default} is served."
    return f"Workers answered for the {default} and {hooks} queues."


def reconciler() -> str:
    """Beat schedules a pass every interval; three missed passes mean beat or the workers are stuck."""
    beat = Heartbeat.objects.filter(name=HEARTBEAT).first()
    if beat is None or beat.beat_at is None:
        raise CheckFailed("No reconcile pass has finished yet; is celery beat running?")
    age = timezone.now() - beat.beat_at
    if age > timedelta(seconds=3 * settings.STOCKROOM_RECONCILE_INTERVAL):
        raise CheckFailed(
            f"The last complete reconcile pass finished {age.total_seconds():.0f} s ago. Last: {beat.detail}"
        )
    return f"Last pass {age.total_seconds():.1f} s ago."


def backends() -> str:
    """The default backend, and any other that holds live instances."""
    in_use = Instance.objects.live().order_by().values_list("backend", flat=True).distinct()
    aliases = {settings.STOCKROOM_DEFAULT_BACKEND, *in_use}
    usable, problems = [], []
    for alias in sorted(aliases):
        try:
            usable.append(f"{alias}: {get_backend(alias).check()}")
        except BackendError as exc:
            problems.append(f"{alias}: {exc}")
    if problems:
        raise CheckFailed(" ".join(problems))
    return " ".join(usable)


def runner() -> str:
    """The components `make run`'s runner keeps up: which are down, and how often each was restarted."""
    try:
        state = json.loads((settings.DATA_DIR / RUNNER_STATE).read_text())
    except FileNotFoundError:
        return "Not started by make run's runner: nothing to report."
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        raise CheckFailed(f"The runner (pid {state['pid']}) is gone; its components are not looked after.") from None
    except PermissionError:
        pass
    parts, down = [], []
    for name, component in state["components"].items():
        part = f"{name} {'up' if component['up'] else 'down, starting again soon'}"
        if component["restarts"] or component["last_exit"]:
            part += f", restarted {component['restarts']}x (last exit: {component['last_exit']}"
            part += f" at {component['last_exit_at']})"
        parts.append(part)
        if not component["up"]:
            down.append(name)
    if down:
        raise CheckFailed("; ".join(parts) + ".")
    return "; ".join(parts) + "."


def pool() -> str:
    """The warm pool on the default backend: how many servers are ready. A short pool only slows
    creates down (they take the cold path), so it degrades, never fails."""
    summary = services.pool.summary()
    if not any(counts["wanted"] for counts in summary.values()):
        return "Off: every kind's pool size (STOCKROOM_POOL_<KIND>) is 0."
    parts, short = [], False
    for kind, counts in summary.items():
        if not any(counts.values()):
            continue
        part = f"{kind} {counts['ready']} of {counts['wanted']} ready"
        part += f", {counts['starting']} starting" if counts["starting"] else ""
        parts.append(part)
        short = short or counts["ready"] < counts["wanted"]
    text = "; ".join(parts) + "."
    return f"Degraded: creates take the cold path until it is full: {text}" if short else text


CHECKS: dict[str, Callable[[], str]] = {
    "database": database,
    "broker": broker,
    "workers": workers,
    "reconciler": reconciler,
    "backends": backends,
    "runner": runner,
    "pool": pool,
}


def _timed(check: Callable[[], str]) -> dict:
    started = time.perf_counter()
    try:
        result = {"ok": True, "detail": check()}
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure
        result = {"ok": False, "detail": str(exc) or type(exc).__name__}
    finally:
        connections.close_all()  # this thread's connections only
    return result | {"ms": round((time.perf_counter() - started) * 1000, 1)}


def _start(name: str, check: Callable[[], str]) -> Future:
    """A check still running for an earlier request is joined, not started again, so a check
    that hangs holds one thread at most, however often /healthz is asked."""
    with _inflight_lock:
        future = _inflight.get(name)
        if future is None or future.done():
            future = _inflight[name] = _pool.submit(_timed, check)
        return future


def run_checks() -> dict[str, dict]:
    futures = {name: _start(name, check) for name, check in CHECKS.items()}
    wait(futures.values(), timeout=DEADLINE)
    late = {"ok": False, "detail": f"No answer within {DEADLINE:g} s.", "ms": DEADLINE * 1000}
    return {name: future.result() if future.done() else late for name, future in futures.items()}


def is_staff(request: HttpRequest) -> bool:
    """A staff user signed in to the pages, or one the API would take (a token), but never an error:
    a bad token is no staff."""
    if request.user.is_authenticated:
        return request.user.is_staff
    try:
        user = Request(request, authenticators=APIView().get_authenticators()).user  # the API's defaults
    except APIException:
        return False
    return bool(user and user.is_authenticated and user.is_staff)


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    results = run_checks()
    healthy = all(result["ok"] for result in results.values())
    body: dict[str, object] = {"status": "ok" if healthy else "down"}
    if is_staff(request):
        body["checks"] = results
    return JsonResponse(body, status=200 if healthy else 503)
