"""Server-rendered pages. Every change goes through services, exactly as in the API."""

import math
from datetime import UTC, datetime

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.dateparse import parse_datetime
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from . import services
from .api.pagination import IdsFirstPaginator
from .api.throttles import TokenCreateThrottle
from .durations import describe_duration
from .engines import UnknownKind, ca_of, engines, get_engine
from .forms import LIFETIME_FIELDS, TokenForm, change_form_class, change_form_initial, create_form_class
from .models import BUSY_STATUSES, DeliveryStatus, Instance, Snapshot, SnapshotStatus, SnapshotTrigger, Status, Webhook
from .options import CREATE_ONLY, describe_size
from .services import snapshots, tokens, webhooks


def _my_instance(request, pk: int) -> Instance:
    return get_object_or_404(Instance.objects.visible(), pk=pk, owner=request.user)


@login_required
def dashboard(request):
    instances = Instance.objects.visible().filter(owner=request.user).defer("password", "admin_password")
    page = IdsFirstPaginator(instances, 20).get_page(request.GET.get("page"))
    kinds = [(kind, engine.label) for kind, engine in engines().items()]
    recently_deleted = Snapshot.objects.filter(
        owner=request.user, trigger=SnapshotTrigger.BEFORE_DELETE, status=SnapshotStatus.READY
    ).filter(Q(instance__isnull=True) | Q(instance__status=Status.DELETED))[:10]
    context = {
        "page": page,
        "kinds": kinds,
        "usage": services.usage(request.user),
        "recently_deleted": recently_deleted,
    }
    return render(request, "provisioning/dashboard.html", context)


# Seconds the create page waits for the new instance to run before it shows the instance page.
CREATE_PAGE_WAIT = 10.0


@login_required
def create(request, kind: str):
    try:
        engine = get_engine(kind)
    except UnknownKind:
        raise Http404 from None
    form = create_form_class(engine)(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        options = {name: value for name, value in form.cleaned_data.items() if value not in (None, "")}
        name = options.pop("name", None)
        life = {key: options.pop(key) for key in LIFETIME_FIELDS if key in options}
        try:
            instance = services.create_instance(
                owner=request.user, kind=kind, name=name, options=options, lifetime=life
            )
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                form.add_error(field if field in form.fields else None, errors)
        except (services.QuotaExceeded, services.NoCapacity) as exc:
            form.add_error(None, str(exc))
        else:
            # One round trip, as the API's ?wait=: the instance page then shows it running (from the
            # warm pool it already is), or, after the wait, still starting, and follows it from there.
            instance = services.wait_until_started(instance, CREATE_PAGE_WAIT)
            if "pool" in instance.timings:
                messages.success(
                    request, f"Running: taken from the warm pool in {instance.timings['pool'] * 1000:.0f} ms."
                )
            return redirect("instance", pk=instance.pk)
    return render(request, "provisioning/create.html", {"form": form, "kind": kind, "label": engine.label})


# Pages that show a password or a token are never_cache ("Cache-Control: no-store"): no copy is kept
# by the browser (its history, its disk cache) or by a proxy on the way.
@never_cache
@login_required
def detail(request, pk: int):
    if Instance.objects.filter(pk=pk, owner=request.user, status=Status.DELETED).exists():
        messages.info(request, "That instance has been deleted.")
        return redirect("dashboard")
    instance = _my_instance(request, pk)
    return render(request, "provisioning/detail.html", _detail_context(instance))


@never_cache
@login_required
def panel(request, pk: int):
    """The part of the instance page that changes with its status; polled while it is busy."""
    instance = _my_instance(request, pk)
    return render(request, "provisioning/_panel.html", _detail_context(instance))


@login_required
@require_GET
def ca_certificate(request, pk: int):
    """The certificate of the CA that signed the instance's TLS certificate (PEM), for its clients to
    verify the server with; 404 while it has none (TLS off)."""
    instance = _my_instance(request, pk)
    pem = ca_of(instance)
    if not pem:
        raise Http404("This instance has no TLS certificate.")
    response = HttpResponse(pem, content_type="application/x-pem-file")
    response["Content-Disposition"] = 'attachment; filename="stockroom-ca.pem"'
    return response


def _detail_context(instance: Instance) -> dict:
    engine = get_engine(instance.kind)
    connection = engine.connection(instance) if instance.status == "running" else None
    return {
        "instance": instance,
        "connection": connection,
        "snippets": _snippets(instance.kind, connection) if connection else [],
        "events": instance.events.all(),
        "actions": [
            (name, spec.label) for name, spec in services.ACTIONS.items() if instance.status in spec.allowed_from
        ],
        "busy": instance.status in (*BUSY_STATUSES, Status.UNHEALTHY, Status.UNREACHABLE)
        or instance.snapshots.filter(Q(status="creating") | Q(verify_status="verifying")).exists(),
        "snapshots": instance.snapshots.all()[:20],
        "can_snapshot": instance.status == Status.RUNNING,
        "can_restore": instance.status in (Status.RUNNING, Status.UNHEALTHY),
        "backup_hours": instance.options.get(snapshots.INTERVAL.name, snapshots.INTERVAL.default),
        "backup_keep": instance.options.get(snapshots.RETENTION.name, snapshots.RETENTION.default),
        "window": services.recovery_window(instance),
        "upgrade_available": services.upgrade_available(instance),
        "host_version": services.host_version(instance.backend, instance.kind),
        "pending": services.describe_changes(
            get_engine(instance.kind),
            get_engine(instance.kind).with_defaults(instance.options),
            instance.pending_options,
        ),
        "import_suffixes": get_engine(instance.kind).import_suffixes,
        "import_most": settings.STOCKROOM_IMPORT_MAX_BYTES,
        "can_change_lifetime": instance.status in services.LIFETIME_CHANGEABLE,
        **_evacuation(instance),
    }


def _evacuation(instance: Instance) -> dict:
    """What the page says of evacuating an unreachable instance: the snapshot it would be rebuilt
    from (`evacuate_from`), or why it cannot be (`cannot_evacuate`); nothing in any other status."""
    if instance.status != Status.UNREACHABLE:
        return {}
    try:
        return {"evacuate_from": services.evacuation_source(instance)}
    except services.CannotMove as exc:
        return {"cannot_evacuate": str(exc)}


@never_cache
@login_required
def settings_page(request, pk: int):
    """Change options and name, through the same service as PATCH in the API."""
    instance = _my_instance(request, pk)
    form, changed = settings_form(request, instance)
    if changed is not None:
        if changed.pending_options:
            messages.info(request, "Saved. Some changes wait for a restart: see the banner to restart now.")
        else:
            messages.success(request, "Saved; live changes are applied.")
        return redirect("instance", pk=instance.pk)
    return render(request, "provisioning/settings.html", {"form": form, "instance": instance})


def settings_form(request, instance: Instance) -> tuple[forms.Form, Instance | None]:
    """The settings form of `instance` (the options as they will be after a restart) and, for a
    valid POST that the service took, the changed instance; errors go back next to their fields.
    The owner's page and the admin's both use it."""
    engine = get_engine(instance.kind)
    shown = {**engine.with_defaults(instance.options), **instance.pending_options}
    form = change_form_class(engine)(request.POST or None, initial=change_form_initial(engine, shown, instance.name))
    if request.method != "POST" or not form.is_valid():
        return form, None
    data = dict(form.cleaned_data)
    name = data.pop("name")
    options = {  # a blank field is the default; a blank text (sql_mode, say) is itself
        option: None if value in (None, "") and engine.option(option).kind not in ("set", "text") else value
        for option, value in data.items()
        if engine.option(option).apply != CREATE_ONLY
    }
    try:
        return form, services.change_instance(instance=instance, options=options, name=name, by=request.user)
    except ValidationError as exc:
        for field, errors in exc.message_dict.items():
            form.add_error(field if field in form.fields else None, errors)
    except (services.WrongStatus, services.NotApplied, services.QuotaExceeded, services.NoCapacity) as exc:
        form.add_error(None, str(exc))
    return form, None


@login_required
@require_POST
def act(request, pk: int, action: str):
    """Stop, start, restart or rotate the password, through the same service as the API."""
    if action not in services.ACTIONS:
        raise Http404
    instance = _my_instance(request, pk)
    try:
        services.request_action(instance=instance, action=action, by=request.user)
    except (services.WrongStatus, services.QuotaExceeded, services.NoCapacity) as exc:
        messages.error(request, str(exc))
    return redirect("instance", pk=instance.pk)


@login_required
@require_POST
def evacuate(request, pk: int):
    """Rebuild an unreachable instance on another node from its last snapshot, through the same
    service as the API; what cannot be done is said in a message."""
    instance = _my_instance(request, pk)
    try:
        services.request_evacuation(instance=instance, by=request.user)
    except (services.WrongStatus, services.CannotMove) as exc:
        messages.error(request, f"Not evacuated: {exc}")
    else:
        messages.success(request, f"{instance.name} is being rebuilt on another node; the history says how it went.")
    return redirect("instance", pk=instance.pk)


@login_required
@require_POST
def import_file(request, pk: int):
    """An import from the page, through the same service as the API; the page's script sends it with
    XMLHttpRequest to show the upload's progress, and follows the redirect."""
    instance = _my_instance(request, pk)
    most = settings.STOCKROOM_IMPORT_MAX_BYTES
    try:
        if int(request.META.get("CONTENT_LENGTH") or 0) > most + 64 * 1024:  # refused before it is read
            raise services.ImportTooLarge(f"The file is larger than an import may be ({describe_size(most)}).")
        upload = request.FILES.get("file")
        if upload is None:
            raise ValidationError("Choose a file to import.")
        services.request_import(instance=instance, name=upload.name, upload=upload, size=upload.size, by=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    except (services.WrongStatus, services.ImportTooLarge, ValueError) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{upload.name} is being imported; the history says how it went.")
    return redirect("instance", pk=instance.pk)


# Lifetime: the same services as the API -----------------------------------------------------------


@login_required
@require_POST
def extend(request, pk: int):
    """Move the expiry: `expires_in` from now (or "never")."""
    instance = _my_instance(request, pk)
    try:
        instance = services.extend_expiry(
            instance=instance, data={"expires_in": request.POST.get("expires_in", "").strip()}, by=request.user
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    except services.WrongStatus as exc:
        messages.error(request, str(exc))
    else:
        when = f"{instance.expires_at:%Y-%m-%d %H:%M} UTC" if instance.expires_at else "never"
        messages.success(request, f"{instance.name} now expires: {when}.")
    return redirect("instance", pk=instance.pk)


@login_required
@require_POST
def protect(request, pk: int):
    """The Protected toggle: `protected` is "true" or "false"."""
    instance = _my_instance(request, pk)
    protected = request.POST.get("protected") == "true"
    try:
        services.set_protected(instance=instance, protected=protected, by=request.user)
    except services.WrongStatus as exc:
        messages.error(request, str(exc))
    else:
        said = "protected: neither expiry nor a delete removes it" if protected else "no longer protected"
        messages.success(request, f"{instance.name} is {said}.")
    return redirect("instance", pk=instance.pk)


# Backups: the same services as the API ------------------------------------------------------------


def _my_snapshot(request, sid: int) -> Snapshot:
    return get_object_or_404(Snapshot, pk=sid, owner=request.user)


@login_required
@require_POST
def snapshot_now(request, pk: int):
    instance = _my_instance(request, pk)
    try:
        snapshot = services.request_snapshot(instance=instance, by=request.user)
    except (services.WrongStatus, services.QuotaExceeded) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Snapshot {snapshot.pk} is being taken; the instance serves on meanwhile.")
    return redirect("instance", pk=instance.pk)


@login_required
@require_POST
def restore(request, pk: int, sid: int):
    instance = _my_instance(request, pk)
    snapshot = get_object_or_404(Snapshot, pk=sid, owner=request.user, kind=instance.kind)
    try:
        services.request_restore(instance=instance, snapshot=snapshot, by=request.user)
    except (services.WrongStatus, services.SnapshotBusy) as exc:
        messages.error(request, str(exc))
    return redirect("instance", pk=instance.pk)


def _time_asked(request) -> datetime | None:
    """The form's time (its picker sends local-looking text, which the page says is UTC), cut to
    its whole second; None, with a message, if it is not a time."""
    try:
        moment = parse_datetime(request.POST.get("time", "").strip())
        if moment is not None:
            moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):  # well formed, but no such day (02-30), or out of range
        moment = None
    if moment is None:
        messages.error(request, "Give a time as YYYY-MM-DD HH:MM:SS (UTC).")
        return None
    return moment.replace(microsecond=0)


@login_required
@require_POST
def restore_to_time(request, pk: int):
    instance = _my_instance(request, pk)
    until = _time_asked(request)
    if until is not None:
        try:
            services.request_restore(instance=instance, until=until, by=request.user)
        except (services.WrongStatus, services.SnapshotBusy, services.OutsideWindow) as exc:
            messages.error(request, str(exc))
    return redirect("instance", pk=instance.pk)


@login_required
@require_POST
def clone_at_time(request, pk: int):
    source = _my_instance(request, pk)
    until = _time_asked(request)
    if until is None:
        return redirect("instance", pk=source.pk)
    name = request.POST.get("name", "").strip() or None
    try:
        instance = services.create_instance(
            owner=request.user, kind=source.kind, name=name, options={}, from_instance=source, until=until
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    except (services.QuotaExceeded, services.NoCapacity) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request, f"{instance.name} is being made from {source.name} as of {until:%Y-%m-%d %H:%M:%S} UTC."
        )
        return redirect("instance", pk=instance.pk)
    return redirect("instance", pk=source.pk)


@login_required
@require_POST
def clone(request, sid: int):
    snapshot = _my_snapshot(request, sid)
    name = request.POST.get("name", "").strip() or None
    try:
        instance = services.create_instance(
            owner=request.user, kind=snapshot.kind, name=name, options={}, from_snapshot=snapshot
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    except (services.QuotaExceeded, services.NoCapacity) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{instance.name} is being made from snapshot {snapshot.pk}.")
        return redirect("instance", pk=instance.pk)
    return redirect("instance", pk=snapshot.instance_id) if snapshot.instance_id else redirect("dashboard")


@login_required
@require_GET
def snapshot_download(request, sid: int):
    snapshot = _my_snapshot(request, sid)
    try:
        made = services.export_snapshot(snapshot=snapshot)
    except (services.SnapshotBusy, services.ExportFailed) as exc:
        messages.error(request, str(exc))
        return _back_from(snapshot)
    return FileResponse(made.file, as_attachment=True, filename=made.filename, content_type=made.media_type)


@login_required
@require_POST
def snapshot_verify(request, sid: int):
    snapshot = _my_snapshot(request, sid)
    try:
        services.request_verify(snapshot=snapshot, by=request.user)
    except services.SnapshotBusy as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Snapshot {sid} is being verified in a throwaway server.")
    return _back_from(snapshot)


def _back_from(snapshot: Snapshot):
    """The page of the snapshot's instance, or the dashboard once it is deleted."""
    if snapshot.instance_id and Instance.objects.visible().filter(pk=snapshot.instance_id).exists():
        return redirect("instance", pk=snapshot.instance_id)
    return redirect("dashboard")


@login_required
@require_POST
def snapshot_delete(request, sid: int):
    snapshot = _my_snapshot(request, sid)
    try:
        services.delete_snapshot(snapshot=snapshot)
    except services.SnapshotBusy as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Snapshot {sid} deleted.")
    return _back_from(snapshot)


@login_required
def delete(request, pk: int):
    instance = _my_instance(request, pk)
    if request.method == "POST":
        try:
            services.delete_instance(instance=instance, by=request.user)
        except services.WrongStatus as exc:
            messages.error(request, str(exc))
        return redirect("instance", pk=instance.pk)
    return render(request, "provisioning/delete.html", {"instance": instance})


@never_cache
@login_required
@never_cache  # the answer to a create shows the new token's secret
def token(request):
    """The user's API tokens; a POST creates one and shows its secret, this once."""
    form = _token_form(request.POST if request.method == "POST" else None)
    new = None
    throttle = TokenCreateThrottle()  # the same count as POST /api/auth/tokens
    if request.method == "POST" and not throttle.allow_request(request, None):
        form.add_error(None, f"Too many new tokens: try again in {math.ceil(throttle.wait() or 1)} s.")
        context = {"form": form, "new": None, "tokens": tokens.tokens_of(request.user)}
        return render(request, "provisioning/token.html", context, status=429)
    if request.method == "POST" and form.is_valid():
        try:
            new, secret = tokens.create_token(owner=request.user, **form.cleaned_data)
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                form.add_error(field if field in form.fields else None, errors)
        else:
            new.secret = secret
            form = _token_form(None)
    context = {"form": form, "new": new, "tokens": tokens.tokens_of(request.user)}
    return render(request, "provisioning/token.html", context)


def _token_form(data) -> TokenForm:
    default = describe_duration(settings.STOCKROOM_TOKEN_TTL)
    form = TokenForm(data, initial={"expires_in": default})
    form.fields["expires_in"].help_text = f"{tokens.expiry_rule().capitalize()}. Default: {default}."
    return form


@login_required
@require_POST
def revoke_token(request, pk: int):
    token = get_object_or_404(tokens.tokens_of(request.user), pk=pk)
    tokens.revoke_token(token=token, by=request.user)
    messages.success(request, f"Token {token.name!r} was revoked; it no longer works.")
    return redirect("token")


MASK = "••••••••"


def _snippets(kind: str, c: dict) -> list[dict]:
    """Ready-to-paste ways to connect; shown with the password masked until revealed."""
    return [
        {"id": label.lower(), "label": label, "text": text, "masked": text.replace(c["password"], MASK)}
        for label, text in get_engine(kind).snippets(c)
    ]


# Webhooks ---------------------------------------------------------------------------------------


@never_cache  # the answer to a registration holds the secret
@login_required
def webhook_list(request):
    secret, error = None, None
    url = request.POST.get("url", "").strip() if request.method == "POST" else ""
    if request.method == "POST":
        try:
            webhook, secret = webhooks.create_webhook(owner=request.user, url=url)
        except ValidationError as exc:
            error = " ".join(exc.message_dict.get("url", exc.messages))
        except webhooks.TooManyWebhooks as exc:
            error = str(exc)
        else:
            messages.success(request, f"Webhook registered for {webhook.url}.")
            url = ""
    hooks = Webhook.objects.filter(owner=request.user).annotate(
        failed=Count("deliveries", filter=Q(deliveries__status=DeliveryStatus.FAILED))
    )
    context = {"webhooks": hooks, "secret": secret, "error": error, "url": url}
    return render(request, "provisioning/webhooks.html", context, status=400 if error else 200)


@login_required
def webhook_detail(request, pk: int):
    webhook = get_object_or_404(Webhook, pk=pk, owner=request.user)
    deliveries = webhook.deliveries.select_related("event__instance")
    page = Paginator(deliveries, 20).get_page(request.GET.get("page"))
    context = {"webhook": webhook, "page": page, "deadline": f"{settings.STOCKROOM_WEBHOOK_DEADLINE:g}"}
    return render(request, "provisioning/webhook.html", context)


@login_required
@require_POST
def webhook_delete(request, pk: int):
    webhook = get_object_or_404(Webhook, pk=pk, owner=request.user)
    webhook.delete()
    messages.success(request, f"Webhook for {webhook.url} deleted; its deliveries went with it.")
    return redirect("webhooks")
