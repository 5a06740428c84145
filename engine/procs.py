"""Process groups on this machine: is a run's group still there, and ending it. No heavy imports: the
console calls these on every poll."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import IO, Sequence


def process_start(pid: int) -> int | None:
    """When a process started (clock ticks since boot, from /proc), or None if it is gone or not Linux.

    Recorded with a run's process group, so that a pid the kernel has since given to another program
    is never taken for the run's."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def same_group(pgid: int | None, started: int | None) -> bool:
    """The run's group is still there and still the run's.

    While any member of a group lives, Linux hands its number to no new process; so a live group whose
    leader has exited is still the run's, and a live leader is the run's if it started when recorded."""
    if not group_alive(pgid):
        return False
    now = process_start(pgid)
    return started is None or now is None or now == started


def group_alive(pgid: int | None) -> bool:
    """Whether any process of the group is still there (on this machine), zombies not counted."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, not ours to signal
    return _live_member(pgid)


def _live_member(pgid: int) -> bool:
    """A member of the group that is not a zombie. The kernel's signal check counts zombies: a run whose
    parent never collects its exit (the console that started it, an init that does not reap) would look
    alive for ever."""
    def member(pid: str) -> bool | None:  # None: not of the group, or gone meanwhile
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return fields[0] != b"Z" if int(fields[2]) == pgid else None

    if member(str(pgid)):  # the leader itself, alive: the usual case, one file read
        return True
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:  # no /proc (not Linux): the kernel's word stands
        return True
    return any(member(pid) for pid in pids)


def not_ours(pid: int, group: bool) -> str | None:
    """Who owns a live process (or group) this one may not signal, as a user name; None if it may (its
    own, or any as root) or the process is gone."""
    try:
        os.killpg(pid, 0) if group else os.kill(pid, 0)
        return None
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        return user_name(os.stat(f"/proc/{pid}").st_uid)
    except OSError:
        return "another user"


def user_name(uid: int) -> str:
    """A user's login name, or `uid N` where the system has none for it."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def may_access(path: str | os.PathLike, mode: int) -> bool:
    """`os.access` as this process's effective user (a set-uid or seteuid process), where the OS can tell."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def kill_group(pgid: int) -> bool:
    """SIGKILL a run's group after its grace period; False if it had already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def process_alive(pid: int | None, started: int | None) -> bool:
    """The process is still there and is the one recorded (not a later program that got its pid)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _zombie(pid):  # dead, its exit not yet collected by its parent (a console that started it, say)
        return False
    now = process_start(pid)
    return started is None or now is None or now == started


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def run_processes_gone(run: dict) -> bool:
    """A pending or running row whose processes (on this machine) are certainly gone: its launcher's
    process group for a launched run, its own process for one started in-process (`rlhf train`,
    `rlhf eval`). False where nothing was recorded yet: the run may still be starting."""
    if run.get("pgid"):
        return not same_group(run["pgid"], run.get("pgid_started"))
    # No group: an in-process run that is not a group leader, or a launch whose supervisor has not
    # recorded the group yet: the recorded process (the run's own, or its supervisor) tells.
    return bool(run.get("pid")) and not process_alive(run["pid"], run.get("pgid_started"))


def spawn_detached(argv: Sequence[str], log: IO[bytes]) -> tuple[int, int | None]:
    """Start `argv` in a session of its own (it outlives its caller and the caller's terminal), stdin closed,
    its output into `log`; returns its pid and start time (read before it can be reaped: a pid alone may be
    another process's by the time anyone checks). A thread waits for its end: a caller that lives on (the
    console) keeps no zombie of every run it started."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)
    started = process_start(proc.pid)
    threading.Thread(target=proc.wait, name=f"reap {proc.pid}", daemon=True).start()
    return proc.pid, started


_PR_SET_PDEATHSIG = 1


def end_with_parent(parent: int) -> None:
    """SIGTERM to this process when its parent ends (Linux: strictly, when the parent's thread that started
    it ends); ended at once if `parent` has gone already (before the request could be made)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


# torchrun starts each rank in a session of its own: its launcher's process group does not hold it. A
# launcher killed alone (kill -9 of `accelerate launch`, the OOM killer) left its ranks training under
# nobody, the run recorded failed, and a resume trained a second copy into the same folder. Each rank
# ends with its launcher (SIGTERM: its stop, with a checkpoint) and leaves its group's id in the folder
# this variable names, where its supervisor waits for it before it records the run's end.
RANKS_ENV = "RLHF_RANKS_DIR"
RANKS_FOLDER = ".ranks"  # in the run's folder
SUPERVISOR_ENV = "RLHF_SUPERVISOR_PID"  # the launcher's parent: a rank whose parent is not its child is orphaned


def register_rank() -> None:
    """Called first thing in a launched trainer: a no-op unless torchrun gave it a session of its own."""
    folder = os.environ.get(RANKS_ENV)
    if not folder or os.getsid(0) != os.getpid():
        return
    launcher = os.getppid()
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor and not _descends_from(launcher, int(supervisor)):
        # Its launcher died while it started (its parent now the reaper): nothing would signal it, nor wait
        os.kill(os.getpid(), signal.SIGTERM)
        return
    end_with_parent(launcher)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{launcher}.{os.getpid()}"), "w") as fh:
            fh.write(f"{os.getpid()} {process_start(os.getpid()) or ''}")
    except OSError:  # a full disk: the rank still ends with its launcher, unseen by the supervisor
        pass


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descends_from(pid: int, ancestor: int, depth: int = 8) -> bool:
    """Whether `ancestor` is `pid` or above it (a launcher may start its ranks through a launcher of its own)."""
    for _ in range(depth):
        if pid == ancestor:
            return True
        parent = _parent_of(pid)
        if not parent or parent == pid:
            return False
        pid = parent
    return False


def rank_groups(folder: str | os.PathLike, launcher: int) -> list[int]:
    """The live process groups of the ranks `launcher` started (as register_rank left them)."""
    groups = []
    try:
        names = [name for name in os.listdir(folder) if name.startswith(f"{launcher}.")]
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(folder, name)) as fh:
                pgid, _, started = fh.read().partition(" ")
            if same_group(int(pgid), int(started) if started.strip() else None):
                groups.append(int(pgid))
        except (OSError, ValueError):
            continue
    return groups


def kill_run_groups(pgid: int, output_dir: str | os.PathLike | None) -> bool:
    """SIGKILL a launched run: its launcher's group and its ranks' (each in a session of its own: killed with
    the launcher alone, they would take its death for a stop and save, a grace period more). False if all
    had gone."""
    ranks = rank_groups(os.path.join(output_dir, RANKS_FOLDER), pgid) if output_dir else []
    killed = kill_group(pgid)
    for group in ranks:
        killed = kill_group(group) or killed
    return killed


def forget_ranks(folder: str | os.PathLike, launcher: int) -> None:
    try:
        for name in os.listdir(folder):
            if name.startswith(f"{launcher}."):
                os.unlink(os.path.join(folder, name))
    except OSError:
        pass
