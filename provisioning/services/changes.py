"""Changes after create: what PATCH on an instance does.

A change is a JSON merge patch: a field left out stays, null puts its default back. The merged
options are validated as a whole; then each changed option goes the way its definition says
(`Option.apply`): a live one is set on the running server and read back, now, within the
request; a restart one waits in `pending_options` until the next start or restart moves it into
`options`; a create-only one is refused. A change of an option the engine's memory size follows
changes the server's kernel or container limit and its reservation with it, within the
owner's quota and the host's budget. Nothing changes unless all of it can.
"""

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from ..backends.base import BackendError, get_backend
from ..engines import Engine, OptionErrors, get_engine
from ..models import BUSY_STATUSES, RESERVING_STATUSES, Instance, Status
from ..options import CREATE_ONLY, LIVE, RESTART, Option, format_size
from . import capacity, expiry, lifetime
from .claims import claim, release
from .requests import NAME_PATTERN, NAME_RULE, WrongStatus
from .state import record_event

logger = logging.getLogger(__name__)

OPTIONS_CHANGED = "instance.options_changed"
# Where options may change: a running server takes live ones now; a stopped one takes every change
# at its next start, which renders its config again.
CHANGEABLE = (Status.RUNNING, Status.STOPPED)


class NotApplied(Exception):
    """The running server (or its memory limit) refused a live change; nothing was changed."""


def change_instance(
    *,
    instance: Instance,
    options: dict[str, Any],
    by: object,
    name: str | None = None,
    lifetime_fields: dict[str, Any] | None = None,
) -> Instance:
    """Apply a merge patch: `options` (option name -> value, None for its default), a new `name`,
    and `lifetime_fields` (expires_in or expires_at, protected, stop_when_idle: services/lifetime.py).
    Returns the instance as it now is.

    Raises ValidationError (a bad value, a create-only option, a taken name: 400), WrongStatus (busy,
    or an option change while neither running nor stopped: 409), QuotaExceeded (403) or NoCapacity
    (503) for more memory than fits, NotApplied (the server refused: 409, nothing changed).
    """
    lifetime.clean(lifetime_fields or {}, now=timezone.now())  # a bad one is a 400 before anything changes
    # The whole change is made under the instance's claim, from its row as it is then: no worker
    # acts on it meanwhile, and no other change either (each takes the claim too).
    keeper = claim(instance, seconds=settings.STOCKROOM_CLAIM_SECONDS)
    if keeper is None:
        raise WrongStatus(instance, "change (another change or a job holds it)")
    try:
        instance.refresh_from_db()
        _change(instance, options, name, by=by)
    finally:
        release(instance, keeper)
    if lifetime_fields:
        expiry.update(instance=instance, data=lifetime_fields, by=by)
    return instance


def _change(instance: Instance, options: dict[str, Any], name: str | None, *, by: object) -> None:
    if instance.status in BUSY_STATUSES:
        raise WrongStatus(instance, "change")
    fields = {} if name is None or name == instance.name else {"name": name}
    engine = get_engine(instance.kind)
    running = engine.with_defaults(instance.options)  # what the server runs with now
    wanted = _merged(engine, running, instance.pending_options, options)
    changed = {option: value for option, value in wanted.items() if value != running.get(option)}
    by_mode: dict[str, dict[str, Any]] = {LIVE: {}, RESTART: {}, CREATE_ONLY: {}}
    for option, value in changed.items():
        by_mode[engine.option(option).apply][option] = value
    if refused := {option: _create_only(engine.option(option)) for option in by_mode[CREATE_ONLY]}:
        raise ValidationError(refused)
    if changed and instance.pool:  # services/pool.py: it would be neither handed out nor replaced
        raise ValidationError(
            {
                NON_FIELD_ERRORS: "A warm-pool server runs its kind's default options until a create takes it, "
                "and no change: delete it, and the pool starts a fresh one."
            }
        )
    if "name" in fields:
        _check_name(instance, fields["name"])
    if changed and instance.status not in CHANGEABLE:
        raise WrongStatus(instance, "change the options of")

    backend = get_backend(instance.backend)
    live = by_mode[LIVE]
    if not backend.changes_memory_live:
        # Its server's memory limit cannot change while it runs (the swarm's): the options that
        # would grow or shrink the server wait for its restart, as a restart option does.
        sizing = {name: value for name, value in live.items() if _sizes(engine, running, {name: value}, instance)}
        if _sizes(engine, running, {key: value for key, value in live.items() if key not in sizing}, instance):
            sizing = live
        by_mode[RESTART] = {**by_mode[RESTART], **sizing}
        live = {name: value for name, value in live.items() if name not in sizing}
    if instance.status == Status.STOPPED:  # its next start renders every option: nothing waits
        after, pending = {**running, **live, **by_mode[RESTART]}, {}
    else:
        after, pending = {**running, **live}, by_mode[RESTART]
    if after == running and pending == instance.pending_options and not fields:
        return  # nothing changes: no event, no write
    reservation, limit = engine.memory_reservation(after), engine.memory_limit(after)
    to_server = {option: value for option, value in live.items() if option in engine.live_settings}
    new_limit = limit if limit != instance.memory_limit else None
    on_server = instance.status == Status.RUNNING and bool(to_server or new_limit)
    undo = {option: running[option] for option in to_server}

    if reservation > instance.memory_reservation and instance.status in RESERVING_STATUSES:
        _reserve(instance, reservation)  # held from now: a create meanwhile sees it
    future = engine.memory_reservation({**after, **pending})
    if future > max(reservation, instance.memory_reservation) and instance.status in RESERVING_STATUSES:
        # Growth that waits for the restart: refused now if the quota or the budget cannot take it
        # (it is held once the restart brings it).
        with transaction.atomic():
            capacity.hold(instance.owner)
            capacity.check_memory(instance.owner, future, what=instance.name, excluding=instance)
    try:
        if on_server:
            backend.reconfigure(instance, to_server, undo=undo, memory_limit=new_limit)
    except Exception as exc:  # noqa: BLE001 - whatever stopped it, the answer says so and nothing changed
        Instance.objects.filter(pk=instance.pk).update(memory_reservation=instance.memory_reservation)
        why = str(exc) if isinstance(exc, BackendError) else f"the server could not be reached ({type(exc).__name__})"
        logger.warning("Instance %s: a change was not applied: %s", instance.pk, exc)
        raise NotApplied(f"Not applied: {why.rstrip('.')}. Nothing was changed.") from None
    try:
        _save(instance, engine, after, pending, reservation, limit, fields, by=by, running=running)
    except Exception:  # a name taken meanwhile, a status moved by a request: the server goes back too
        Instance.objects.filter(pk=instance.pk).update(memory_reservation=instance.memory_reservation)
        if on_server:
            old_limit = instance.memory_limit if new_limit is not None else None
            backend.reconfigure(instance, undo, undo=to_server, memory_limit=old_limit)
        raise
    if on_server:
        backend.keep_config(instance)  # what the server would read should it restart by itself


def _sizes(engine: Engine, running: dict[str, Any], options: dict[str, Any], instance: Instance) -> bool:
    """Whether `options` on top of `running` change the instance's memory limit."""
    return bool(options) and engine.memory_limit({**running, **options}) != instance.memory_limit


def apply_pending(instance: Instance) -> None:
    """Move the pending options into `options` before a start or restart renders them (the
    worker's side); the memory it reserves follows."""
    if not instance.pending_options:
        return
    engine = get_engine(instance.kind)
    options = {**instance.options, **instance.pending_options}
    instance.options, instance.pending_options = options, {}
    instance.memory_reservation = engine.memory_reservation(options)
    instance.memory_limit = engine.memory_limit(options)
    Instance.objects.filter(pk=instance.pk).update(
        options=options,
        pending_options={},
        memory_reservation=instance.memory_reservation,
        memory_limit=instance.memory_limit,
    )


def describe_changes(engine: Engine, before: dict[str, Any], after: dict[str, Any]) -> str:
    """ "maxmemory 64mb → 128mb, databases 16 → 32": what a change does, for events and pages."""
    parts = []
    for name, value in after.items():
        option = engine.option(name)

        def show(value: Any, option: Option = option) -> str:
            return format_size(value) if option.kind == "size" and isinstance(value, int) else repr(value)

        parts.append(f"{name} {show(before.get(name))} → {show(value)}")
    return ", ".join(parts)


def _merged(engine: Engine, running: dict[str, Any], pending: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Every option as the patch leaves it, validated as a whole (400 naming each bad field)."""
    known = {option.name for option in engine.options}
    if unknown := [name for name in patch if name not in known]:
        raise ValidationError(
            {name: f"Unknown option; allowed options: {', '.join(sorted(known))}." for name in unknown}
        )
    target = {**running, **pending}
    for name, value in patch.items():
        target[name] = engine.option(name).default if value is None else value
    if "charset" in patch and "collation" not in patch:
        target["collation"] = None  # the new charset's own default, which then reads as a change
    try:
        return engine.clean_options(target)
    except OptionErrors as exc:
        raise ValidationError(exc.errors) from None


def _create_only(option: Option) -> str:
    return f"{option.label} ({option.name}) is set when the instance is made and cannot be changed (create-only)."


def _check_name(instance: Instance, name: Any) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValidationError({"name": f"{name!r} is not a valid name; use {NAME_RULE}"})
    taken = Instance.objects.visible().filter(owner_id=instance.owner_id, kind=instance.kind, name=name)
    if taken.exclude(pk=instance.pk).exists():
        raise ValidationError({"name": f"You already have a {instance.kind} instance named {name!r}."})


def _reserve(instance: Instance, reservation: int) -> None:
    """Hold `reservation` bytes for the instance, within its owner's quota and the host's budget."""
    with transaction.atomic():
        capacity.hold(instance.owner)
        capacity.check_memory(instance.owner, reservation, what=instance.name, excluding=instance)
        Instance.objects.filter(pk=instance.pk).update(memory_reservation=max(reservation, instance.memory_reservation))


def _save(
    instance: Instance,
    engine: Engine,
    after: dict[str, Any],
    pending: dict[str, Any],
    reservation: int,
    limit: int,
    fields: dict[str, Any],
    *,
    by: object,
    running: dict[str, Any],
) -> None:
    applied = {name: value for name, value in after.items() if value != running.get(name)}
    was_pending = dict(instance.pending_options)
    values = {
        "options": after,
        "pending_options": pending,
        "memory_reservation": reservation,
        "memory_limit": limit,
        **fields,
    }
    with transaction.atomic():
        # Not updated_at: it says when the status last changed (healing and recovery go by it).
        try:
            saved = Instance.objects.filter(pk=instance.pk, status=instance.status).update(**values)
        except IntegrityError:
            raise ValidationError(
                {"name": f"You already have a {instance.kind} instance named {fields.get('name')!r}."}
            ) from None
        if not saved:
            instance.refresh_from_db()
            raise WrongStatus(instance, "change")
        for name, value in values.items():
            setattr(instance, name, value)
        said = []
        if applied:
            how = "applied" if instance.status == Status.RUNNING else "applied at its next start"
            said.append(f"{describe_changes(engine, running, applied)} ({how})")
        if pending != was_pending and pending:
            said.append(f"{describe_changes(engine, running, pending)} (pending until a restart)")
        elif was_pending and not pending:
            said.append("no option waits for a restart any more")
        said += [f"renamed {value!r}" for value in fields.values()]
        if said:
            record_event(
                instance, instance.status, instance.status, f"Changed by {by}: {'; '.join(said)}.", type=OPTIONS_CHANGED
            )
    logger.info("Instance %s changed by %s: %s", instance.pk, by, sorted([*applied, *pending, *fields]))
