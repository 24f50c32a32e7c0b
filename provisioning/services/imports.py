"""Imports: a file the owner uploads (a SQL dump, an RDB file) loaded into a running instance, or
into a new one (a clone from a file).

The request side checks the name and size, keeps the file in the `snapshots` storage (under
`imports/`) and moves the instance to `importing`. The worker reads the whole file first
(`BaseBackend.check_import`): a file that is cut short, not of the engine's format, or asks for
what the tenant may not do, is refused and nothing changes. Then it takes a `before-import`
snapshot, and loads the file (`import_data`). If the load fails part-way, or its worker dies, the
snapshot is put back. The uploaded file is removed once the import is over.
"""

import logging
import secrets
from typing import IO, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files import File
from django.db import transaction
from django.db.models import F

from ..backends.base import BackendError, BaseBackend
from ..engines import get_engine
from ..models import Instance, Snapshot, SnapshotStatus, SnapshotTrigger, Status
from ..options import describe_size
from . import certificates, healing, snapshots, store
from .claims import work_on
from .outcomes import describe
from .requests import WrongStatus, create_instance, enqueue
from .state import Side, transition

logger = logging.getLogger(__name__)


class TooLarge(Exception):
    """The uploaded file is larger than STOCKROOM_IMPORT_MAX_BYTES (413)."""


# The request side ---------------------------------------------------------------------


def check_upload(kind: str, name: str, size: int) -> str:
    """The suffix of an upload named `name` of `size` bytes that an instance of `kind` takes;
    ValidationError (naming the `file` field) or TooLarge if it takes none."""
    engine = get_engine(kind)
    if not engine.import_suffixes:
        raise ValidationError({"file": f"{engine.label} instances take no imports."})
    suffix = next((s for s in sorted(engine.import_suffixes, key=len, reverse=True) if name.lower().endswith(s)), "")
    if not suffix:
        allowed = " or ".join(engine.import_suffixes)
        raise ValidationError({"file": f"{name!r} is not a file a {engine.label} import takes: a {allowed} file."})
    most = settings.STOCKROOM_IMPORT_MAX_BYTES
    if size > most:
        raise TooLarge(
            f"The file takes {describe_size(size)}; an import may take at most {describe_size(most)} "
            "(STOCKROOM_IMPORT_MAX_BYTES)."
        )
    return suffix


def keep_upload(kind: str, name: str, upload: IO[bytes], size: int) -> str:
    """Keep the uploaded file for a worker (streamed, never whole in memory); its name in the store."""
    suffix = check_upload(kind, name, size)
    path = f"imports/{kind}/{secrets.token_hex(12)}{suffix}"
    return store.storage().save(path, File(upload))


def forget_upload(name: str) -> None:
    if name:
        store.storage().delete(name)


def request_import(*, instance: Instance, name: str, upload: IO[bytes], size: int, by: object) -> Instance:
    """Keep the file and move the running instance to `importing`; a worker loads it after commit.

    Raises ValidationError (a file the kind does not take), TooLarge, WrongStatus unless it runs.
    """
    if instance.status != Status.RUNNING:
        raise WrongStatus(instance, "import into")
    kept = keep_upload(instance.kind, name, upload, size)
    try:
        moved = transition(
            instance,
            Status.IMPORTING,
            f"Import of {name} ({describe_size(size)}) requested by {by}.",
            side=Side.REQUEST,
            allowed_from=(Status.RUNNING,),
            also={"import_file": kept},
        )
    except BaseException:
        forget_upload(kept)
        raise
    if not moved:
        forget_upload(kept)
        instance.refresh_from_db()
        raise WrongStatus(instance, "import into")
    transaction.on_commit(lambda: _send(instance, kept))
    return instance


def _send(instance: Instance, kept: str) -> None:
    enqueue("import_instance", instance, revert_to=Status.RUNNING)
    if instance.status == Status.RUNNING:  # it could not be queued, and is back: the file is of no use
        Instance.objects.filter(pk=instance.pk, import_file=kept).update(import_file="")
        forget_upload(kept)


def create_from_file(*, file_name: str, upload: IO[bytes], size: int, **create: Any) -> Instance:
    """create_instance(**create) of a new instance seeded with the uploaded file: the worker loads
    it once the server runs; a file it refuses fails the create."""
    kept = keep_upload(create["kind"], file_name, upload, size)
    try:
        return create_instance(**create, import_file=kept)
    except BaseException:
        forget_upload(kept)
        raise


# The worker side ----------------------------------------------------------------------


def run(instance_id: int) -> None:
    """Load the file the instance is `importing`."""
    work_on(instance_id, (Status.IMPORTING,), import_now)


def import_now(instance: Instance, backend: BaseBackend) -> None:
    """The worker's import: the server ends running, with the file's data loaded, or with its data
    as it was (refused, or put back from the before-import snapshot); unhealthy only if putting
    the data back failed too."""
    name = instance.import_file
    try:
        with _opened(name) as upload:
            try:
                backend.check_import(instance, upload)
            except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
                _end(instance, describe("Import refused", instance, exc) + " The data is as it was.")
                return
            undo = _before_import(instance, backend)
            if undo.status != SnapshotStatus.READY:
                why = f"the snapshot that would undo it failed ({undo.status_message})"
                _end(instance, f"Import not started: {why}. The data is as it was.")
                return
            Instance.objects.filter(pk=instance.pk).update(restore_from=undo)
            try:
                upload.seek(0)
                certificates.ensure(instance)  # a file that replaces the data starts the server again
                backend.import_data(instance, upload)
            except Exception as exc:  # noqa: BLE001
                put_back(instance, backend, undo, describe("Import failed", instance, exc))
                return
    except BackendError as exc:  # the kept file is gone or unreadable: nothing was loaded
        _end(instance, f"Import failed: {exc} The data is as it was.")
        return
    healing.forget_restarts(instance)
    message = f"Imported the file; a login succeeded. Snapshot {undo.pk} ({undo.trigger}) undoes it."
    if get_engine(instance.kind).import_replaces_data:  # its log does not hold the new data
        message += _new_timeline(instance, backend)
    _end(instance, message)


def put_back(instance: Instance, backend: BaseBackend, undo: Snapshot, why: str) -> None:
    """Put the before-import snapshot back in place of a load cut short, then `running`; if that
    fails too, `unhealthy` for the reconciler, saying which snapshot holds the data."""
    name = instance.import_file
    try:
        with snapshots.verified(undo) as file:
            backend.restore(instance, file)
    except Exception as exc:  # noqa: BLE001
        failed = describe(f"Putting back snapshot {undo.pk} failed too", instance, exc)
        transition(
            instance,
            Status.UNHEALTHY,
            f"{why} {failed}; restore snapshot {undo.pk} to get the data as it was.",
            side=Side.WORKER,
            allowed_from=(Status.IMPORTING,),
            also=_done(),
        )
        _forget(name)
        return
    healing.forget_restarts(instance)
    message = f"{why} Snapshot {undo.pk}, taken before it, was put back: the data is as it was."
    _end(instance, message + _new_timeline(instance, backend))


def recover(instance: Instance, backend: BaseBackend) -> None:
    """An import whose worker died: what it may have loaded is undone (the before-import snapshot
    put back, if it was taken); the owner may try again."""
    note = "The worker importing the file stopped"
    undo, name = instance.restore_from, instance.import_file
    if undo is not None:
        put_back(instance, backend, undo, f"{note}; the import was given up.")
        return
    if backend.login_error(instance, timeout=settings.STOCKROOM_PROBE_TIMEOUT) is not None:
        transition(
            instance,
            Status.UNHEALTHY,
            f"{note} before it loaded anything, and the server does not answer.",
            side=Side.WORKER,
            allowed_from=(Status.IMPORTING,),
            also=_done(),
        )
        _forget(name)
        return
    _end(instance, f"{note} before it loaded anything; the data is as it was. Try again.")


def load_into_new(instance: Instance, backend: BaseBackend) -> None:
    """A clone from a file: load it into the instance just created (raise if it cannot be)."""
    with _opened(instance.import_file) as upload:
        backend.check_import(instance, upload)
        upload.seek(0)
        backend.import_data(instance, upload)


def _before_import(instance: Instance, backend: BaseBackend) -> Snapshot:
    snapshot = snapshots.new(instance, SnapshotTrigger.BEFORE_IMPORT, status_message="Taken before an import.")
    snapshots.take_now(instance, backend, snapshot)
    return snapshot


def _new_timeline(instance: Instance, backend: BaseBackend) -> str:
    """Begin a new timeline (its data no longer follows from the old one's log) and take its base."""
    Instance.objects.filter(pk=instance.pk).update(timeline=F("timeline") + 1, archived_until=None)
    instance.refresh_from_db(fields=["timeline", "archived_until"])
    return snapshots.new_timeline_base(instance, backend)


def _end(instance: Instance, message: str) -> None:
    name = instance.import_file
    transition(instance, Status.RUNNING, message, side=Side.WORKER, allowed_from=(Status.IMPORTING,), also=_done())
    _forget(name)


def _forget(name: str) -> None:
    """Remove the uploaded file, once the import is over (whatever its outcome)."""
    try:
        forget_upload(name)
    except OSError:
        logger.exception("Could not remove the uploaded file %s", name)


def _done() -> dict[str, object]:
    return {"restore_from": None, "import_file": ""}


class _opened:
    """The kept upload, open for reading; BackendError if it is gone."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> IO[bytes]:
        try:
            self.file: IO[bytes] = store.storage().open(self.name, "rb")
        except (FileNotFoundError, ValueError):
            raise BackendError("The uploaded file is no longer kept.") from None
        return self.file

    def __exit__(self, *exc: object) -> None:
        self.file.close()
