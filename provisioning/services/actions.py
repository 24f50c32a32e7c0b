"""The lifecycle actions a user may ask for, and the statuses each one moves through."""

from dataclasses import dataclass

from ..models import Status


@dataclass(frozen=True)
class Action:
    """A user action on a running (or stopped) instance, carried out by the worker."""

    title: str
    allowed_from: tuple[Status, ...]
    busy: Status
    done: Status
    done_message: str
    button: str = ""  # the label on pages, if not the title
    # Whether it takes an instance from reserving no memory to reserving it, so it must fit the
    # budget and the owner's quota first (services/capacity.py).
    reserves_memory: bool = False

    @property
    def label(self) -> str:
        return self.button or self.title


ACTIONS = {
    "stop": Action("Stop", (Status.RUNNING, Status.UNHEALTHY), Status.STOPPING, Status.STOPPED, "Stopped; data kept."),
    "start": Action(
        "Start", (Status.STOPPED,), Status.STARTING, Status.RUNNING, "Started; a login succeeded.", reserves_memory=True
    ),
    "restart": Action(
        "Restart",
        (Status.RUNNING, Status.UNHEALTHY),
        Status.RESTARTING,
        Status.RUNNING,
        "Restarted; a login succeeded.",
    ),
    "rotate-password": Action(
        "Password rotation",
        (Status.RUNNING,),
        Status.ROTATING,
        Status.RUNNING,
        "Password rotated; the old one no longer works.",
        button="Rotate password",
    ),
}

ACTION_OF = {spec.busy: name for name, spec in ACTIONS.items()}  # what a busy status is busy with
DELETABLE = (Status.RUNNING, Status.UNHEALTHY, Status.STOPPED, Status.FAILED, Status.UNREACHABLE)
