"""GET /healthz: is the portal itself able to do its job? For operators and load balancers.

Each check answers within about a second. Any failing check makes the answer a 503, and the
body says which one and why, so the first look at an outage is also the diagnosis.
"""

import time
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from .backends.base import BackendError, get_backend
from .models import Heartbeat, Instance

TIMEOUT = 1.0


class CheckFailed(Exception):
    pass


def database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return f"{connection.vendor} answers."


def broker() -> str:
    from portal.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=0, timeout=TIMEOUT)  # one try: a health check must not wait
    return "Reachable."


def workers() -> str:
    from portal.celery import app

    if not app.control.ping(timeout=TIMEOUT, limit=1):  # the first answer is enough
        raise CheckFailed(f"No worker answered a ping within {TIMEOUT:g} s.")
    return "A worker answered."


def reconciler() -> str:
    """Beat schedules a pass every interval; three missed passes mean beat or the workers are stuck."""
    beat = Heartbeat.objects.filter(name="reconciler").first()
    if beat is None:
        raise CheckFailed("No reconcile pass has finished yet; is celery beat running?")
    age = timezone.now() - beat.beat_at
    if age > timedelta(seconds=3 * settings.STOCKROOM_RECONCILE_INTERVAL):
        raise CheckFailed(f"The last reconcile pass finished {age.total_seconds():.0f} s ago.")
    return f"Last pass {age.total_seconds():.1f} s ago."


def backends() -> str:
    """The default backend, and any other that holds live instances."""
    aliases = {settings.STOCKROOM_DEFAULT_BACKEND, *Instance.objects.live().values_list("backend", flat=True)}
    usable, problems = [], []
    for alias in sorted(aliases):
        try:
            usable.append(f"{alias}: {get_backend(alias).check()}")
        except BackendError as exc:
            problems.append(f"{alias}: {exc}")
    if problems:
        raise CheckFailed(" ".join(problems))
    return " ".join(usable)


CHECKS: dict[str, Callable[[], str]] = {
    "database": database,
    "broker": broker,
    "workers": workers,
    "reconciler": reconciler,
    "backends": backends,
}


def run_checks() -> dict[str, dict]:
    results = {}
    for name, check in CHECKS.items():
        if name == "workers" and not results["broker"]["ok"]:
            results[name] = {"ok": False, "detail": "Not checked: workers are reached through the broker.", "ms": 0}
            continue
        started = time.perf_counter()
        try:
            results[name] = {"ok": True, "detail": check()}
        except Exception as exc:  # noqa: BLE001 - a health check reports every failure
            results[name] = {"ok": False, "detail": str(exc) or type(exc).__name__}
        results[name]["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return results


@never_cache
@require_GET
def healthz(request):
    results = run_checks()
    healthy = all(result["ok"] for result in results.values())
    return JsonResponse({"status": "ok" if healthy else "down", "checks": results}, status=200 if healthy else 503)
