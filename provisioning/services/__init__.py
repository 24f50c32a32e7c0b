"""Every change to an instance goes through here; the API, pages, admin, tasks and the reconciler
call these and nothing below them writes.

- requests: the request side (validate, quota, reserve, queue);
- changes: changes after create (PATCH): live options now, the others at the next restart;
- capacity: the quotas and the host's memory budget, which requests check;
- ports: which port an instance holds, at create and when a stranger took it;
- work: the worker side (claim, do, record) and recovery of work a dead worker left;
- healing: the healing policy, the only writer of restart counting and backoff;
- state: the transition table and the one function that changes a status;
- snapshots: taking, restoring and cloning snapshots of an instance's data;
- exports: a snapshot's portable file, and verifying that a snapshot restores;
- logs: point-in-time recovery: archived log files, the recovery window, replays;
- imports: loading a file the owner uploaded into an instance, or into a new one;
- pool, refill: the warm pool: servers started ahead, which a create takes within its request,
  and keeping it full;
- versions: each instance's server version, the upgrade flag, and upgrading data after a start;
- webhooks: registering receivers and sending them each status change;
- lifetime, expiry: expiry, protection and stop-when-idle, as owners set them and the reconciler
  acts on them.
"""

from . import pool
from .actions import ACTIONS, DELETABLE, Action
from .capacity import NoCapacity, QuotaExceeded, Usage, usage
from .changes import NotApplied, change_instance, describe_changes
from .claims import Busy
from .expiry import CHANGEABLE as LIFETIME_CHANGEABLE
from .expiry import extend as extend_expiry
from .expiry import set_protected
from .exports import ExportFailed, request_verify
from .exports import export as export_snapshot
from .exports import verify as verify_snapshot
from .healing import heal
from .imports import TooLarge as ImportTooLarge
from .imports import create_from_file, request_import
from .imports import run as import_instance
from .lifetime import FIELDS as LIFETIME_FIELDS
from .logs import OutsideWindow, recovery_window, with_first_base
from .logs import archive as archive_logs
from .moves import CannotMove, evacuation_source, request_evacuation, request_move
from .moves import evacuate as evacuate_instance
from .moves import move as move_instance
from .ports import NoFreePort
from .refill import fill as fill_pool
from .requests import Protected, WrongStatus, create_instance, delete_instance, request_action, wait_until_started
from .snapshots import SnapshotBusy, delete_snapshot, request_restore, request_snapshot
from .snapshots import busy as snapshot_busy
from .snapshots import restore as restore_instance
from .snapshots import take as take_snapshot
from .versions import host_version, needing_upgrade, upgrade_available
from .webhooks import TooManyWebhooks, create_webhook
from .work import deprovision, perform_action, provision, recover

__all__ = [
    "CannotMove",
    "evacuation_source",
    "evacuate_instance",
    "move_instance",
    "request_evacuation",
    "request_move",
    "NotApplied",
    "fill_pool",
    "pool",
    "wait_until_started",
    "change_instance",
    "describe_changes",
    "ACTIONS",
    "DELETABLE",
    "Action",
    "Busy",
    "ImportTooLarge",
    "import_instance",
    "request_import",
    "create_from_file",
    "OutsideWindow",
    "archive_logs",
    "recovery_window",
    "with_first_base",
    "SnapshotBusy",
    "NoCapacity",
    "NoFreePort",
    "QuotaExceeded",
    "TooManyWebhooks",
    "Usage",
    "WrongStatus",
    "Protected",
    "extend_expiry",
    "LIFETIME_CHANGEABLE",
    "LIFETIME_FIELDS",
    "set_protected",
    "create_instance",
    "create_webhook",
    "delete_instance",
    "delete_snapshot",
    "deprovision",
    "heal",
    "perform_action",
    "provision",
    "take_snapshot",
    "export_snapshot",
    "ExportFailed",
    "request_verify",
    "verify_snapshot",
    "recover",
    "request_action",
    "request_restore",
    "request_snapshot",
    "restore_instance",
    "snapshot_busy",
    "usage",
    "host_version",
    "needing_upgrade",
    "upgrade_available",
]
