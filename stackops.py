"""stackops: run a Python function, a script or any command detached, here or over SSH or Slurm.

Quick start (the first half runs as it is; the second needs a host in ~/.ssh/config):

    from stackops import RemoteMachine, RemoteStackOpsConfig, demo_job

    # here: a detached job on this machine
    config = RemoteStackOpsConfig(job_id="hello")  # job folders under ~/tmp_results/...
    job = RemoteMachine(demo_job, config, func_kwargs={"seconds": 0.5})
    job.run()                           # returns at once; the job would outlive this Python
    folder = job.wait(timeout=60)       # its results folder (JobFailedError if it failed)
    print(job.get_status().status, (folder / "message.txt").read_text())

    # on a host: an ~/.ssh/config alias or user@host[:port]; the function's repo goes along
    from mylab.train import fit         # any importable function, or a script's path
    config = RemoteStackOpsConfig(job_id="fit-1", ssh_host="gpu-box", copy_repo=True)
    job = RemoteMachine(fit, config, func_kwargs={"epochs": 10}).run()
    print(job.get_status())             # queued, waiting, running, completed or failed
    folder = job.wait()                 # later, or elsewhere: RemoteMachine.load("fit-1").wait()

A job is a folder: what to run, its arguments, a small Python wrapper and a copy of this very file,
so the executing machine needs nothing but python3 (3.8 or newer). The job runs detached, waits for
one of the machine's slots (at most ``max_simultaneous_jobs`` at once, first come first served),
and keeps one record, ``logs/state.json``: one function decides its state (_judge), one writes its
end (_record_end), and on a host every question goes to one entry of this file (serve).

Three ways to use it:

    import stackops                               # vendored module
    python stackops.py run train.py --wait        # command line (also the `stackops` script)
    python3 stackops.py --help                    # copied onto a server: standard library only

Sections (bottom-up; each uses only the sections above it; 0-9 are standard library only):

     0  header          this docstring, version, __all__
     1  imports         standard library; lazy accessor for psutil (paramiko's is in 10)
     2  constants       defaults, file names inside a job folder, status literals
     3  errors          StackopsError and its subclasses
     4  utilities       atomic writes, home-relative paths, quoting, times, process liveness
     5  models          RemoteStackOpsConfig, WorkloadParams, JobStatus, ExecutionTimings, JobParams
     6  templates       the Python wrapper and the #SBATCH header, one strict renderer
     7  job folder      FileManager, the state record, liveness (a lock), slots and queue, _judge
     8  job execution   the wrapper's lifecycle, the dispatcher, fire, cancel, the host's actions
     9  network         local addresses, the LAN address, the public IP and its rotation (warp-cli)
    10  SSH             paramiko (lazily): OpenSSH-style targets, host keys, commands
    11  transfer        copies as sftp and tar streams (whole or not at all), rclone transfers
    12  job hand-over   arguments, code snapshots, transfer_sftp, CloudQueue
    13  places and      where a job runs (here, over SSH, through the cloud) and how it starts
        launchers       there (a slot, tmux, the cloud queue, sbatch): one small class each
    14  remote machine  RemoteMachine: one job, with one place and one launcher; list_jobs
    15  cluster         load calculators, Cluster: one workload split over several hosts
    16  cloud worker    claims and runs the work units of a cloud queue
    17  CLI             argument parser, one small handler per command, main(argv) -> int
    18  serve           the executing side's one entry: JSON requests in, JSON answers out

Environment variables (read on the machine where they matter):

    STACKOPS_SSH_CONFIG  the OpenSSH client config to read (default ~/.ssh/config)
    STACKOPS_STATE_DIR   slots, queue and job views of this machine and user
                         (default ~/tmp_results/remote_machines/file_manager/<machine>; it must be
                         yours alone, and a relative one is made absolute when a job is submitted)
    STACKOPS_CONFIG      the user config file: defaults per host (`stackops config` shows them;
                         default $XDG_CONFIG_HOME/stackops/config.json, else ~/.config/...)
    STACKOPS_EMAIL_CONFIG  SMTP settings on the executing machine, 0600
                           (default ~/.config/stackops/email.json)
    STACKOPS_PUBLIC_IP_URL the JSON endpoint of the public-IP lookup
                           (default https://ipinfo.io/json)
"""

from __future__ import annotations

# ============================================================================================
# 1. imports
# ============================================================================================

import _thread
import enum
import errno
import fcntl
import marshal
import os
import posixpath
import re
import stat
import sys
import time
import types

TYPE_CHECKING = False  # typing costs 2 ms at every start; the annotations are strings (PEP 563)
if TYPE_CHECKING:  # pragma: no cover
    import copy
    import dataclasses
    import datetime as _dt
    import json
    import logging
    import random
    import shlex
    import shutil
    import signal
    import string
    import subprocess
    import traceback
    from pathlib import Path
    from typing import Any, Callable, Sequence

    _Gate = Callable[[Callable[[bytes], None]], bool]  # see _Together.arrive


class _LazyModule(types.ModuleType):
    """A standard module imported where it is first used, not at start-up: ``--help`` and the
    job's wrapper pay only for what they use (``python -X importtime`` shows what that is).
    ``spared``: a module it imports but seldom uses, left lazy too (see _import_sparing)."""

    def __init__(self, name: str, spared: str = "", bound: str = "") -> None:
        super().__init__(name)
        self.__spared = spared
        self.__bound = bound or name  # the name this module gives it
        self.__real: types.ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import system asking what it is (``__path__``: a package?)
            raise AttributeError(name)
        return getattr(self._real_module(), name)

    def _real_module(self) -> types.ModuleType:
        """The module itself, imported the first time; this module's name for the stand-in is
        the module's from then on (a lookup through the stand-in costs microseconds each)."""
        if self.__real is None:
            if sys.modules.get(self.__name__) is self:  # it stood in while another was imported
                del sys.modules[self.__name__]
            if self.__spared:
                self.__real = _import_sparing(self.__name__, self.__spared)
            else:
                __import__(self.__name__)
                self.__real = sys.modules[self.__name__]
            if globals().get(self.__bound) is self:
                globals()[self.__bound] = self.__real
        return self.__real


def _import_sparing(name: str, spared: str, functions: tuple[str, ...] = ()) -> Any:
    """Import ``name`` with ``spared`` (space-separated), modules it imports but seldom uses,
    standing in lazily; ``functions``: the ones it takes from them by name, each importing its
    module when called."""
    stand_ins = {}
    for each in spared.split() if name not in sys.modules else ():
        if each not in sys.modules:
            stand_ins[each] = sys.modules[each] = _LazyModule(each)
            for function in functions:
                setattr(stand_ins[each], function, _later(stand_ins[each], function))
    try:
        __import__(name)
        return sys.modules[name]
    finally:
        for each, stand_in in stand_ins.items():
            if sys.modules.get(each) is stand_in:
                del sys.modules[each]


def _later(module: _LazyModule, name: str) -> Callable[..., Any]:
    """Function ``name`` of ``module``, which is imported when it is first called."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(module._real_module(), name)(*args, **kwargs)

    return call


class _LazyPattern:
    """A regular expression compiled where it is first used, not at start-up; each of its
    methods is kept here once asked for (re's cache is a lookup at every call)."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern, self.flags = pattern, flags

    def __getattr__(self, name: str) -> Any:
        value = getattr(re.compile(self.pattern, self.flags), name)
        setattr(self, name, value)
        return value


class _LazyPath:
    """pathlib.Path, imported where a path is first made (pathlib, fnmatch and ntpath are 2 ms of
    ``--help``, which makes none); this stand-in then gives its name in this module to it."""

    def __call__(self, *args: Any) -> Any:
        return _pathlib_path()(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(_pathlib_path(), name)


def _pathlib_path() -> type[Path]:
    """pathlib.Path, which the module's ``Path`` is from now on. urllib.parse (and the ipaddress
    it imports: 3 ms of every start) gives pathlib only quote_from_bytes, for Path.as_uri, which
    stackops does not call: it is imported when that is."""
    real = _import_sparing("pathlib", "urllib.parse", ("quote_from_bytes",)).Path
    globals()["Path"] = real
    return real


def _argparse() -> Any:
    """argparse, imported without gettext and locale (7 ms at every start): its messages have no
    translations installed, so gettext would return them unchanged anyway."""
    if "argparse" not in sys.modules and "gettext" not in sys.modules:
        stand_in = types.ModuleType("gettext")
        stand_in.gettext = lambda message: message  # type: ignore[attr-defined]
        plural = lambda one, many, n: one if n == 1 else many  # noqa: E731
        stand_in.ngettext = plural  # type: ignore[attr-defined]
        sys.modules["gettext"] = stand_in
        try:
            import argparse
        finally:
            if sys.modules.get("gettext") is stand_in:
                del sys.modules["gettext"]
    import argparse

    return argparse


if not TYPE_CHECKING:
    Path = _LazyPath()
    dataclasses = _LazyModule("dataclasses", "inspect")  # inspect: classes with no docstring
    logging = _LazyModule("logging", "traceback")  # traceback: to format an exception
    _dt, json = _LazyModule("datetime", bound="_dt"), _LazyModule("json")
    random = _LazyModule("random")
    copy = _LazyModule("copy")
    # shutil's bz2 and lzma (2 ms: their libraries loaded) say only which archive formats it
    # makes and unpacks, which stackops does not ask it for
    shutil, signal = _LazyModule("shutil", "bz2 lzma"), _LazyModule("signal")
    subprocess, traceback = _LazyModule("subprocess"), _LazyModule("traceback")
    string = _LazyModule("string")
    shlex = _LazyModule("shlex")


__version__ = "0.1.0"

__all__ = [
    "StackopsError", "ConfigError", "DependencyError", "SlotError", "CommandError",
    "JobFailedError",
    "StackopsConnectionError", "HostKeyError", "TransferError",
    "RemoteStackOpsConfig", "WorkloadParams", "JobStatus", "ExecutionTimings", "JobParams",
    "FileManager", "Slots", "render_execution_script", "run_job", "serve", "read_state",
    "judge_jobs", "job_reports", "fire_jobs", "cancel_job", "delete_job",
    "call_job_part",
    "delete_own_results", "demo_job", "fill_placeholders",
    "notify_job_end", "is_job_process", "process_start_ticks",
    "SSH", "SSHTarget", "Response", "resolve_ssh_target", "parse_ssh_target", "simple_sftp_get",
    "transfer_sftp", "transfer_cloud", "cloud_base", "RemoteMachine", "list_jobs", "list_job_rows",
    "LoadCriterion", "MachineSpecs", "ThreadLoadCalculator", "MachineLoadCalculator", "Cluster",
    "CloudQueue", "run_worker", "InterfaceAddress", "interface_table", "get_all_ipv4_addresses",
    "lan_score",
    "choose_lan_ipv4", "select_lan_ipv4", "get_public_ip_address", "switch_public_ip_address",
    "switch_public_ip_address_with_log", "main",
    "Sweep", "run_sweep", "load_sweep_grid", "sweep_job_ids",
]


class _Logger:
    """The "stackops" logger, logging imported when a line is first logged or a handler set (4 ms
    of every start that logs nothing: ``--help``, most of the command line, a job's wrapper).
    ``_LATE_HANDLER``: pairs (lowest level it shows, function that sets the logger's handler
    then): main()'s, the wrapper's. Until logging is imported, a debug or info line below that
    level is dropped unimported: no handler or level that would show it can have been set."""

    def __getattr__(self, name: str) -> Any:
        if name in _QUIET_LEVELS and "logging" not in sys.modules \
                and _QUIET_LEVELS[name] < (_LATE_HANDLER[-1][0] if _LATE_HANDLER else 30):
            return _dropped
        return getattr(_stackops_logger(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(logging.getLogger("stackops"), name, value)


def _stackops_logger() -> logging.Logger:
    """The "stackops" logger, with the handler _LATE_HANDLER holds set now."""
    logger = logging.getLogger("stackops")
    if _LATE_HANDLER:
        _LATE_HANDLER.pop()[1](logger)
    return logger


def _dropped(*args: Any, **kwargs: Any) -> None:
    """A debug or info line that nothing would show (see _Logger)."""


_QUIET_LEVELS = {"debug": 10, "info": 20}  # logging.DEBUG, logging.INFO
_LATE_HANDLER: list[tuple[int, Callable[[logging.Logger], None]]] = []
log: logging.Logger = _Logger()  # type: ignore[assignment]


def _psutil() -> Any:
    """psutil when installed, else None: every caller has a standard-library fallback."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


# ============================================================================================
# 2. constants
# ============================================================================================

DEFAULT_BASE_DIR = "~/tmp_results/remote_machines/jobs"
DEFAULT_STATE_DIR = "~/tmp_results/remote_machines/file_manager"
# code snapshots: blobs and manifests
DEFAULT_SNAPSHOT_DIR = "~/tmp_results/remote_machines/snapshots"
SNAPSHOT_KEEP_SECONDS = 7 * 86400  # a snapshot no job refers to is removed once this old
FOLDER_BLOB_MIN = 16384  # a job folder's file under python/ this big travels as a blob (stackops)
CODE_DIR = "code"  # inside a job folder: the job's own copy of its code snapshot
DEFAULT_RESULTS_DIR = "~/tmp_results/tmp_dirs"
DEFAULT_USER_CONFIG = "~/.config/stackops/config.json"
DEFAULT_EMAIL_CONFIG = "~/.config/stackops/email.json"
MAIL_DEADLINE = 30.0  # seconds for a whole SMTP exchange at a job's end (the config's "timeout")
# what stackops sets in a job's environment (its id, attempt, slot, place in a sweep or a
# workload, folders): a job's own env (--env) cannot set them
JOB_ENV_NAMES = ("STACKOPS_JOB_ID", "STACKOPS_ATTEMPT", "STACKOPS_SLOT", "STACKOPS_SWEEP_INDEX",
                 "STACKOPS_PART", "STACKOPS_PARTS", "STACKOPS_IDX_START", "STACKOPS_IDX_END",
                 "STACKOPS_IDX_MIN", "STACKOPS_IDX_MAX", "STACKOPS_JOB_ROOT", "STACKOPS_RESULTS")

STATUSES = ("prepared", "queued", "waiting", "running", "completed", "failed", "cancelled")
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
TRANSFER_METHODS = ("sftp", "cloud")
LAUNCH_METHODS = ("remotely", "cloud_manager", "slurm")
MACHINE_TYPES = ("Linux",)

# inside a job folder {base_dir}/queued/{job_id}/
JOB_PARAMS_JSON = "data/job_params.json"
KWARGS_JSON = "data/func_kwargs.json"
FILE_MANAGER_JSON = "data/file_manager.json"
REMOTE_MACHINE_JSON = "data/remote_machine.json"
CONFIG_JSON = "data/remote_machine_config.json"
INSTANCE_PICKLE = "data/instance.pickle"
# with copy_repo: the manifest of the job's snapshot, as its id hashes it (the first 32 hex digits
# of this file's sha256 are the id), so that the job's copy can be checked and made again
CODE_MANIFEST_JSON = "data/code_manifest.json"
WRAPPER_PY = "python/cluster_wrap.py"
STACKOPS_COPY = "python/stackops.py"
SBATCH_SH = "shell/sbatch.sh"
LOGS = "logs"
OUTPUT_LOG = "logs/output.log"
STATE_JSON = "logs/state.json"  # the job's one state record (see _update), schema STATE_SCHEMA
STATE_LOCK = "logs/state.lock"  # flocked while the record is changed
ALIVE_LOCK = "logs/alive.lock"  # flocked by the job's processes for their whole life
FIRE_ENV = "logs/fire_env"  # the environment the job was fired with (env -0): it starts with it
STATE_SCHEMA = 1
STARTING_GRACE = 30.0  # seconds a job being started (in tmux) may take to hold its lock

# inside the state directory of a machine and user
QUEUED_VIEW = "queued_jobs.json"
RUNNING_VIEW = "running_jobs.json"
HISTORY_VIEW = "history_jobs.json"
HISTORY_KEEP = 500

DISPATCHER_PID = "dispatcher.pid"    # the pid of the queue's live dispatcher
DISPATCHER_LOCK = "dispatcher.lock"  # flocked by the one live dispatcher of a state folder
DISPATCHER_LOG = "dispatcher.log"
AFTER_DIR = "after"  # entries of jobs waiting for their parents (--after), not yet in the queue
STARTING = ".starting-"  # an entry the dispatcher took out of the line to start its job
DISPATCH_POLL = 0.02  # how often the dispatcher looks for a free slot (seconds)
VIEWS_EVERY = 1.0     # the dispatcher rewrites the queue view at most this often (seconds)
AFTER_POLL = 0.5      # how often the dispatcher looks at the parents of jobs that wait for them

# the first two waiters look this often (seconds): for a free slot, for being first
SLOT_POLL_HEAD = 0.05
SLOT_POLL_OTHERS = 0.25  # the others look whether they have become second

# Slurm's job states, as stackops reads them (any other is an end: failed, or cancelled)
SLURM_WAITING = frozenset(["PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SUSPENDED",
                           "RESV_DEL_HOLD", "SPECIAL_EXIT", "CONFIGURING", "RESIZING"])
SLURM_RUNNING = frozenset(["RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"])
SLURM_TIMEOUT = 20.0  # seconds scontrol, scancel may take before Slurm counts as not answering
# an interactive job runs in tmux with the tmux server's environment: these come from the fire
TMUX_PASSED_ENV = ("STACKOPS_STATE_DIR", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "PATH", "HOME",
                   "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH")

_SAFE_NAME = _LazyPattern(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_ADJECTIVES = ("amber", "brisk", "calm", "deft", "eager", "fair", "glad", "keen", "lucid",
               "mellow", "nimble", "proud", "quiet", "rapid", "sunny", "tidy", "vivid", "witty")
_NOUNS = ("badger", "cedar", "comet", "falcon", "fjord", "heron", "lynx", "maple", "otter",
          "pebble", "quartz", "raven", "river", "spruce", "tundra", "walrus", "willow", "zephyr")


# ============================================================================================
# 3. errors
# ============================================================================================

class StackopsError(Exception):
    """Root of every error stackops raises; ``hint`` says what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(StackopsError, ValueError):
    """Bad input: refused before anything is written or sent."""


class DependencyError(StackopsError, ImportError):
    """A program or package this operation needs is missing."""


class SlotError(StackopsError):
    """Trouble with the slots or the queue of a machine."""


class CommandError(StackopsError):
    """A command failed: carries where, what, its exit status and the tail of its stderr."""

    def __init__(self, host: str, command: str, exit_status: int | None, stderr: str,
                 hint: str | None = None) -> None:
        self.host, self.command, self.exit_status = host, command, exit_status
        self.stderr_tail = _tail(stderr, 20)
        lines = command.strip().splitlines() or [""]
        shown = _shorten(lines[0], 120) + (" ..." if len(lines) > 1 else "")  # never a whole script
        if exit_status is None:  # it never ended: a timeout, or the connection went away
            reason = _last_line(stderr) or "the command did not end"
            message = f"no answer from {host}: {reason} ({shown})"
            hint = hint or f"is {host} reachable and not overloaded? A longer timeout may help"
        else:
            message = f"command failed on {host} (exit status {exit_status}): {shown}"
            if self.stderr_tail:
                message += "\n" + self.stderr_tail
        super().__init__(message, hint)


class StackopsConnectionError(StackopsError, ConnectionError):
    """Could not reach, trust or log in to a host."""


class HostKeyError(StackopsConnectionError):
    """The host's key is unknown (``unknown_key``: refused until accepted) or changed."""

    def __init__(self, message: str, hint: str | None = None, unknown_key: bool = False) -> None:
        super().__init__(message, hint)
        self.unknown_key = unknown_key


class TransferError(StackopsError):
    """A copy failed; nothing was left under the target's name."""


class JobFailedError(StackopsError):
    """A job ended in ``failed``; ``error_message`` holds its traceback or reason."""

    def __init__(self, job_id: str, error_message: str) -> None:
        self.job_id, self.error_message = job_id, error_message
        super().__init__(f"job {job_id} failed: "
                         f"{_last_line(error_message) or 'no reason recorded'}",
                         hint=f"full error: {_prog()} status {job_id}")


class _SnapshotMismatchError(StackopsError):
    """A copy lacked the bytes its manifest names for ``path``: the snapshot is taken again."""

    def __init__(self, path: str, digest: str) -> None:
        self.path, self.digest = path, digest
        super().__init__(f"the repo changed while it was being sent: {path} no longer holds "
                         f"the bytes its snapshot names (sha256 {digest[:12]}...)",
                         hint="submit again once its files are written")


class _RecordMissingError(ConfigError):
    """A job folder without its record; caught by _load_job_or_cluster to try the other kinds."""


_CLI: list[bool] = []  # not empty while main() runs a command: errors name its options


def _option(api: str, cli: str) -> str:
    """An option as the reader of an error types it: ``cli`` under main(), else ``api``."""
    return cli if _CLI else api


# -- errors as data: the executing side answers an error, the client raises it again -------------


def _error_record(exc: BaseException, evidence: str = "") -> dict[str, Any]:
    """``exc`` as plain data (class, message, hint, plain attributes, ``evidence``)."""
    fields = {key: value for key, value in vars(exc).items()
              if key != "hint" and isinstance(value, (str, int, float, bool, type(None)))}
    record = {"class": type(exc).__name__, "message": str(exc),
              "hint": getattr(exc, "hint", None), "fields": fields}
    if evidence:
        record["evidence"] = evidence
    return record


def _error_from_record(record: dict[str, Any], prefix: str = "") -> StackopsError | None:
    """The StackopsError a record describes, ``prefix`` before its message, with the attributes
    it carried; None for a class that is not one of ours."""
    classes, todo = {}, [StackopsError]
    while todo:
        cls = todo.pop()
        classes[cls.__name__] = cls
        todo += cls.__subclasses__()
    known = classes.get(str(record.get("class")))
    if known is None:
        return None
    exc = known.__new__(known)
    StackopsError.__init__(exc, prefix + record["message"], record.get("hint"))
    fields = record.get("fields")
    for key, value in (fields.items() if isinstance(fields, dict) else ()):
        if isinstance(key, str) and key.isidentifier() and key[:1] != "_" and key != "hint":
            setattr(exc, key, value)
    return exc


# ============================================================================================
# 4. utilities
# ============================================================================================

def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if text and lines > 0 else ""


def _last_line(text: str) -> str:
    return _tail(text, 1).strip()


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# what a terminal acts on rather than shows: C0 and C1 controls (ESC starts escape sequences,
# 0x9b is a one-byte CSI), DEL, and the invisible and bidirectional marks that reorder a line
_UNSHOWN = _LazyPattern("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def _terminal_safe(value: Any, lines: bool = False) -> str:
    """``value`` (text from elsewhere) with each character of _UNSHOWN as its Python escape,
    line breaks kept with ``lines``; anything but a string as its JSON."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _UNSHOWN.sub(lambda m: m[0] if lines and m[0] == "\n" else repr(m[0])[1:-1], text)


_PROGRAM: list[str] = []  # how main() was run, once it has been: [program] or [python, script]


def _prog() -> str:
    """The program as the user runs it, for hints (``stackops`` or ``python3 stackops.py``)."""
    if len(_PROGRAM) == 2:
        return f"{_PROGRAM[0]} {shlex.quote(_PROGRAM[1])}"
    if _PROGRAM:
        return _PROGRAM[0]
    return "stackops" if shutil.which("stackops") else "python3 stackops.py"


def _note_program(argv0: str) -> None:
    name = os.path.basename(argv0)
    if name.endswith(".py"):
        python = os.path.basename(sys.executable or "") or "python3"
        _PROGRAM[:] = [python, argv0]  # (quoted when a hint names it: see _prog)
    elif name == "stackops":
        _PROGRAM[:] = ["stackops"]


def _own_file() -> Path:
    """This module's file (every job ships it), from these globals (under cProfile, __main__
    is cProfile)."""
    own = globals().get("__file__") or getattr(sys.modules.get("stackops"), "__file__", None) or ""
    return Path(os.path.abspath(own))


def _serve_argv(python: str, *args: str, site: bool = False) -> list[str]:
    """The command that runs ``serve(args)`` of this file with ``python``, imported (its bytecode
    cached) rather than run as a script; ``site``: with site packages (for jobs' wrappers)."""
    boot = ("import sys; sys.path.insert(0, sys.argv[1]); import stackops; "
            "sys.exit(stackops.serve(sys.argv[2:]))")
    return [python, *([] if site else ["-S"]), "-c", boot, str(_own_file().parent), *args]


def _this_module() -> Any:
    """The module this code runs as; under cProfile or trace, one made from these globals, so
    ``except stackops.StackopsError`` still catches what this code raises."""
    module = sys.modules.get(__name__)
    if module is not None and vars(module) is globals():
        return module
    import types

    module = types.ModuleType("stackops", __doc__)
    module.__dict__.update(globals())
    return module


def _mkdir_private(path: Path) -> Path:
    """Create ``path`` and its missing parents, each 0700; existing folders stay as they are."""
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with _suppress(FileExistsError):
            folder.mkdir(mode=0o700)
    return missing[0] if missing else path


def _untrusted_reason(path: Path) -> str | None:
    """Why someone else could change folder ``path``, or None (OpenSSH's StrictModes up to /, or
    to a root-owned sticky folder such as /tmp, where nobody may rename yours)."""
    me = os.getuid()
    current = os.path.realpath(path)
    while True:
        info = os.stat(current)
        owner, mode = info.st_uid, info.st_mode
        if owner not in (me, 0):
            return f"{current} belongs to another user (uid {owner})"
        if mode & 0o022 and not (owner == 0 and mode & 0o1000):
            return f"{current} is writable by group or others (mode {mode & 0o7777:o})"
        parent = os.path.dirname(current)
        if (owner == 0 and mode & 0o1000) or parent == current:
            return None
        current = parent


def _trusted_dir(path: Path, what: str) -> Path:
    """``path``, made 0700 when missing; refused if anyone but you or root could change it."""
    existing = path
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    try:  # nothing is created inside a folder that is not yours alone
        reason = _untrusted_reason(existing)
        if reason is None:
            _mkdir_private(path)
            reason = _untrusted_reason(path)
    except OSError as exc:
        raise ConfigError(f"cannot use {what} {path}: {exc.strerror or exc}",
                          hint="check that the folder and its parents are yours") from exc
    if reason is not None:
        raise ConfigError(f"refusing {what} {path}: {reason}",
                          hint="use a folder of your own (chmod go-w; or remove one another user "
                               "made)")
    return path


def _atomic_write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a whole file or nothing: temp file, fsync, rename over the target."""
    _mkdir_private(path.parent)
    _write_plain(path, text, mode, sync=True)


def _write_new(path: str | Path, text: str, mode: int = 0o600) -> None:
    """Write a new file in a folder nobody sees yet (a staging folder renamed into place after):
    no temp file and no fsync per file, which cost 10 ms each on a busy disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _write_new_json(path: Path, data: Any) -> None:
    _write_new(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _private_append(path: str | Path) -> Any:
    """``path`` opened to append to (binary), created private (0600) when it is new."""
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def _write_plain(path: str | Path, text: str | bytes, mode: int = 0o600,
                 sync: bool = False) -> None:
    """A file that appears whole (temp file, rename); fsync only with ``sync``: records and
    queue entries are written thousands of times."""
    folder, name = os.path.split(path)
    # (os.urandom: random costs an import; join: a bare file name has no folder)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(3).hex()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with open(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            if sync:
                handle.flush()
                os.fsync(fd)
        os.replace(temp, path)
    except BaseException:
        with _suppress(OSError):
            os.unlink(temp)
        raise


def _atomic_write_json(path: Path, data: Any) -> None:
    _atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _json_lines(items: list[Any]) -> str:
    """A JSON list with one item per line: as readable as indented JSON, and written by json's C
    encoder (an indent makes json encode in Python, ten times slower: a view of 10,000 jobs)."""
    return "[\n" + ",\n".join(map(json.dumps, items)) + "\n]\n"


def _read_json(path: Path) -> Any:
    """Parse a JSON file; a corrupted or missing one is a StackopsError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StackopsError(f"missing file: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StackopsError(f"corrupted JSON in {path}: {exc}",
                            hint="the job folder was damaged; submit the job again") from exc


def _read_text(path: Path, default: str = "") -> str:
    """The text of ``path`` as written: a carriage return in a folder's name stays one."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return default


class _suppress:
    """contextlib.suppress without importing contextlib on the hot path."""

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self.exceptions = exceptions

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, self.exceptions)


def collapse_home(path: str | os.PathLike[str]) -> str:
    """``~/rel`` for a path inside this machine's home (either spelling of a linked home), else
    the absolute path."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    for base in _homes():
        if full == base:
            return "~"
        if full.startswith(base.rstrip("/") + "/"):
            return "~/" + full[len(base.rstrip("/")) + 1:]
    return full


_HOMES: dict[Any, tuple[str, str]] = {}  # (home, its inode): (home, its real path)


def _homes() -> tuple[str, str]:
    """This machine's home, as is and resolved, resolved again only when the home changes (a
    list of 10,000 jobs collapses 30,000 paths: resolving was most of it)."""
    home = os.path.abspath(os.path.expanduser("~"))
    try:
        info = os.lstat(home)
        key: Any = (home, info.st_ino, info.st_mode)
    except OSError:
        key = (home,)
    if key not in _HOMES:
        _HOMES[key] = (home, os.path.realpath(home))
    return _HOMES[key]


def expand_home(path: str | os.PathLike[str]) -> Path:
    """The home-relative or absolute ``path`` as an absolute path on this machine."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _sh_path(path: str) -> str:
    """A path for generated shell: ``~/x y`` becomes ``"$HOME"/'x y'``; the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


_PLACEHOLDER = _LazyPattern(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_placeholders(template: str, values: dict[str, str], quote: bool = False) -> str:
    """``template`` with each ``{name}`` replaced by its value (``quote``: shell-quoted, one literal
    word); ``{{`` and ``}}`` stand for braces. A name with no value is a ConfigError."""
    def one(match: Any) -> str:
        if match[0] in ("{{", "}}"):
            return match[0][0]
        if match[1] not in values:
            raise ConfigError(f"nothing fills the placeholder {{{match[1]}}}",
                              hint=f"give {match[1]} a value, or write {{{{ }}}} for a brace")
        value = str(values[match[1]])
        return shlex.quote(value) if quote else value

    return _PLACEHOLDER.sub(one, template)


def check_safe_name(name: Any, what: str = "job_id") -> str:
    """A name fit for a folder and commands: letters, digits, ``._-``, not first ``.``/``-``."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ConfigError(f"{what} {name!r} is not a safe name",
                          hint="use letters, digits, '.', '_' and '-', not starting with '.' or "
                               "'-', at most 128 characters")
    return name


# sbatch long options a job may set (``slurm_options``); stackops sets the rest itself (the name,
# output, working folder, array, dependency). An empty value renders the bare flag.
_SLURM_OPTION_WORDS = """
    account acctg-freq batch bb begin clusters comment constraint contiguous core-spec
    cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot distribution exclude
    exclusive extra-node-info gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task
    gres gres-flags hint licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu
    mem-per-gpu mincpus network nice no-requeue nodefile nodelist nodes ntasks ntasks-per-core
    ntasks-per-gpu ntasks-per-node ntasks-per-socket overcommit oversubscribe partition power
    prefer priority profile propagate qos reboot requeue reservation signal sockets-per-node
    spread-job switches thread-spec threads-per-core time time-min tmp use-min-nodes wckey"""
SLURM_OPTIONS = frozenset(_SLURM_OPTION_WORDS.split())
_SLURM_VALUE = _LazyPattern(r"[A-Za-z0-9_.:,=/@%+*&|!\[\]()-]{0,200}\Z")


def check_slurm_options(options: Any) -> dict[str, str]:
    """``options`` as sbatch long options, refused (one line) unless every key is a known option
    and every value a plain token: nothing a user types reaches the batch script unchecked."""
    if not isinstance(options, dict):
        raise ConfigError("slurm_options must be a dict of sbatch options, got "
                          f"{type(options).__name__}")
    for key, value in options.items():
        if not isinstance(key, str) or key not in SLURM_OPTIONS:
            raise ConfigError(f"unknown sbatch option {key!r}",
                              hint="use sbatch's long option names without '--', e.g. "
                                   "partition=gpu time=02:00:00")
        if not isinstance(value, str) or not _SLURM_VALUE.match(value):
            raise ConfigError(f"sbatch option {key}: value {_shorten(repr(value), 60)} is not a "
                              "plain token "
                              "(letters, digits and _.:,=/@%+*&|![]()- only, no spaces)")
    return options


def parse_slurm_option(text: str) -> tuple[str, str]:
    """``key=value`` (or a bare ``key`` for a flag) from the command line, checked."""
    key, _, value = text.partition("=")
    key = key.strip().lstrip("-")
    check_slurm_options({key: value})
    return key, value


_ENV_NAME = _LazyPattern(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_job_env(env: Any, what: str = "env") -> dict[str, str]:
    """``env`` as a job's variables, refused (one line) unless each name is a variable's name that
    stackops does not set itself (JOB_ENV_NAMES) and each value a string without NUL."""
    if not isinstance(env, dict):
        raise ConfigError(f"{what} must be a dict of names and values, got {type(env).__name__}")
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ConfigError(f"{what}: {_shorten(repr(name), 60)} is not a variable's name",
                              hint="letters, digits and _, not starting with a digit, e.g. "
                                   "OMP_NUM_THREADS")
        if name in JOB_ENV_NAMES:
            raise ConfigError(f"{what}: stackops sets {name} itself, for every job",
                              hint="it gives every job STACKOPS_JOB_ID, _ATTEMPT, _SLOT and, "
                                   "where they apply, _SWEEP_INDEX, _PART(S), _IDX_*, _JOB_ROOT "
                                   "and _RESULTS")
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"{what}: {name}'s value must be a string without NUL, got "
                              f"{_shorten(repr(value), 60)}")
    return env


def parse_env_option(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` from the command line (--env), checked."""
    name, equals, value = text.partition("=")
    if not equals:
        raise ConfigError(f"--env {_shorten(repr(text), 60)} is not KEY=VALUE",
                          hint="e.g. --env OMP_NUM_THREADS=4 (KEY= for an empty value)")
    check_job_env({name: value}, "--env")
    return name, value


def check_email_address(address: Any, what: str = "to_email") -> str:
    """``address`` as one e-mail address, or a ConfigError saying why not (_email_problem)."""
    shown = _shorten(repr(address), 60)
    if not isinstance(address, str):
        raise ConfigError(f"{what} must be an e-mail address (a string), got {shown}")
    why = _email_problem(address)
    if why:
        raise ConfigError(f"{what} {shown} is not an e-mail address: {why}",
                          hint="e.g. me@example.org")
    return address


def _email_problem(address: str) -> str:
    """What makes ``address`` no e-mail address ("" when nothing does)."""
    if any(ord(char) < 32 or ord(char) == 127 for char in address):
        return "it holds a line break or another control character"
    local, at, domain = address.partition("@")
    if not at or "@" in domain:
        return "it needs exactly one @"
    if not local or any(char.isspace() for char in local):
        return "what comes before its @ is empty or holds a space"
    labels = domain.split(".")
    plain = all(0 < len(label) <= 63 and label.replace("-", "").isalnum()
                and label[0] != "-" and label[-1] != "-" for label in labels)
    if len(labels) < 2 or not plain or labels[-1].isdigit():
        return f"{domain!r} is not a domain name (dotted names of letters, digits and hyphens)"
    return ""


def _random_job_id() -> str:
    """adjective-noun-4 hex digits, from os.urandom (importing random is 1 ms of a start)."""
    adjective, noun, high, low = os.urandom(4)
    return (f"{_ADJECTIVES[adjective % len(_ADJECTIVES)]}-{_NOUNS[noun % len(_NOUNS)]}"
            f"-{high:02x}{low:02x}")


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(moment: _dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _parse_iso(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        return _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _process_state(pid: int) -> tuple[bool, str]:
    """(alive, command line) of ``pid`` on this machine; a zombie counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        state = stat.rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X"), cmdline.decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        if Path("/proc/self/stat").exists():
            return False, ""
    except PermissionError:
        return True, ""
    psutil = _psutil()  # no /proc (macOS): psutil when present, else a bare signal 0
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False, ""
            return True, " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False, ""
        except psutil.AccessDenied:
            return True, ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, ""
    except PermissionError:
        pass
    return True, ""


def pid_is_alive(pid: int, marker: str | None = None) -> bool:
    """True when ``pid`` runs (not a zombie); with ``marker``, its command line must name it."""
    alive, cmdline = _process_state(pid)
    return alive and (marker is None or not cmdline or marker in cmdline)


def process_start_ticks(pid: int | str = "self") -> int | None:
    """When ``pid`` started: /proc/<pid>/stat field 22, clock ticks since boot (or None)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _zombie_exit(pid: Any, start: Any) -> str:
    """How the process ``pid`` that started at ``start`` (clock ticks) ended, while it is a zombie
    its parent has not reaped yet (/proc/<pid>/stat field 52, its wait status); else ""."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] != "Z" or int(fields[19]) != int(start):
            return ""
        status = int(fields[49])
    except (OSError, IndexError, ValueError, TypeError):
        return ""
    return f"killed by signal {status & 0x7F}" if status & 0x7F else f"exit status {status >> 8}"


def is_job_process(pid: int, path: str, start: int | None) -> bool:
    """True only when ``pid`` is provably a job's own process: alive, not a zombie, and started at
    the recorded ``start`` (clock ticks), or with none recorded, ``path`` one of its arguments (a
    wrapper its dispatcher forked shows the dispatcher's). A reused pid is dead."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        if Path("/proc/self/stat").exists():
            return False
        return pid_is_alive(pid, path)  # no /proc (macOS): psutil or a bare signal 0
    if fields[0] in ("Z", "X"):
        return False
    return fields[19] == str(start) if start is not None else os.fsencode(path) in args


def _run_bounded(argv: list[str], timeout: float, error: type[StackopsError] = StackopsError,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a program here in a process group of its own and stop the whole group once ``timeout``
    seconds pass (a plain timeout would wait for grandchildren that hold its output open): the
    ``error`` raised then says which command did not answer in time."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                cwd=str(cwd) if cwd is not None else None)
    except OSError as exc:
        raise DependencyError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        with _suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with _suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1.0)  # reaps it (a child out of its group may hold the pipes)
        if isinstance(exc, subprocess.TimeoutExpired):
            command = " ".join(argv)
            raise error(f"{command} did not answer within {timeout:g}s and was stopped") from None
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# -- content-addressed copies: every byte checked against the hash its manifest names -----------
# A snapshot's manifest lists [path, kind, value]: kind "f" (a file) or "x" (an executable file)
# with the sha256 of its bytes, or "l" with the target of a link inside the tree. Whatever a
# job's copy is made from (the work tree here, a store's blobs there, an older job's copy), each
# file is hashed while it is copied, on every path; a copy that does not match is not kept.

SNAPSHOT_TRIES = 3  # takes of a snapshot before a submit is refused: the repo keeps changing
# A time stamp less than RACY_NS older than the moment it is relied on may still not change with
# the next write (file system clocks tick coarsely: FAT's 2 s, the kernel's few ms; and two
# machines' clocks drift a little): such a file is hashed, never trusted (git's "racy" rule).
RACY_NS = 2_000_000_000


def _sha256_file(path: str | os.PathLike[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_verified(source: str, target: str, digest: str, mode: int, relative: str = "") -> None:
    """A new file ``target`` with the bytes of ``source``, hashed as they are copied: unless they
    are sha256 ``digest``, it is removed and _SnapshotMismatchError raised for ``relative``."""
    import hashlib

    hasher = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as copy:
            reading = os.open(source, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there: no wait
            with open(reading, "rb") as handle:
                if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        hasher.update(chunk)
                        copy.write(chunk)
        if hasher.hexdigest() != digest:
            raise _SnapshotMismatchError(relative or source, digest)
    except BaseException as exc:
        with _suppress(OSError):
            os.unlink(target)
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise _SnapshotMismatchError(relative or source, digest) from None
        raise


def _safe_relative(relative: str) -> str:
    """A path inside a tree: relative, with no ``..`` and no empty part."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or ".." in parts or "" in parts:
        raise StackopsError(f"refusing the path {relative!r}: not inside the tree")
    return relative


def _link_inside(relative: str, target: str) -> bool:
    """Whether link ``relative`` -> ``target`` stays inside its tree (relative, never above it)."""
    if os.path.isabs(target):
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
    return resolved != ".." and not resolved.startswith("../")


class _Staged:
    """The one way a folder (or file) is put in place: built at ``path`` in a hidden box beside
    ``target``, then renamed to it, or removed on any failure (Ctrl-C too). What is at ``target``
    is removed first with ``replace``, else refused with ``exists()``'s error. ``folder``: make
    ``path`` an empty folder (else the caller makes it)."""

    def __init__(self, target: str | os.PathLike[str], replace: bool = False,
                 exists: Callable[[], Exception] | None = None, folder: bool = True) -> None:
        self.target = os.fspath(target)
        self.replace, self.exists, self.folder = replace, exists, folder
        parent = os.path.dirname(self.target) or "."
        self.box = f"{parent}/.stackops-partial.{os.urandom(4).hex()}"  # see below
        self.path = f"{self.box}/payload"

    def __enter__(self) -> str:
        os.mkdir(self.box, 0o700)
        if self.folder:
            os.mkdir(self.path, 0o700)
        return self.path

    def __exit__(self, kind: Any, value: Any, trace: Any) -> None:
        try:
            if kind is None:
                self._place()
        finally:
            try:
                os.rmdir(self.box)  # empty once placed
            except OSError:
                shutil.rmtree(self.box, ignore_errors=True)

    def _place(self) -> None:
        if self.replace:
            _remove(Path(self.target))
        elif os.path.lexists(self.target):
            raise self._taken()
        try:
            os.rename(self.path, self.target)
        except OSError:
            if os.path.lexists(self.target):  # made by another process at the same moment
                raise self._taken() from None
            raise

    def _taken(self) -> Exception:
        return self.exists() if self.exists is not None else \
            FileExistsError(f"{self.target} exists already")


def _materialize(entries: list[list[Any]], source_of: dict[str, Any],
                 folder: str | os.PathLike[str]) -> None:
    """Make ``folder`` (whole, or not at all) the job's own copy of a snapshot (``entries``, its
    manifest): each file copied, never hard-linked (what the job writes reaches no store and no
    other job), from the first source that holds its bytes (``source_of``: sha256 to a path or a
    list of paths); links last, each inside the tree."""
    made: set[str] = set()
    with _Staged(folder) as staging:
        for relative, kind, value in sorted(entries, key=lambda entry: entry[1] == "l"):
            path = f"{staging}/{_safe_relative(relative)}"
            parent = os.path.dirname(path)
            if parent not in made:
                _mkdir_private(Path(parent))
                made.add(parent)
            if kind == "l":
                if not _link_inside(relative, value):
                    raise StackopsError(f"refusing the link {relative} -> {value}: out of the tree")
                os.symlink(value, path)
                continue
            sources = source_of.get(value) or []
            mode = 0o700 if kind == "x" else 0o600
            for source in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
                with _suppress(_SnapshotMismatchError):
                    _copy_verified(os.fspath(source), path, value, mode, relative)
                    break
            else:
                raise _SnapshotMismatchError(relative, value)


def _data_plan(item: dict[str, Any]) -> dict[str, Any]:
    """Which files of one data item (as _data_items makes it) this machine must be sent,
    ``{"need": [relative, ...]}``, or why it cannot take them, ``{"conflict": why}``. A file is
    needed when missing or different in kind, size or mtime_ns (copies sent keep the sender's),
    or, when its stamps match, in hash (_data_differs: git's racy rule)."""
    target = os.path.abspath(os.path.expanduser(item["target"]))
    if os.path.lexists(target) and os.path.isdir(target) != item["dir"]:
        kind = "file" if item["dir"] else "folder"
        return {"conflict": f"{item['target']} is a {kind} there"}
    need = []
    for relative, size, mtime_ns, digest in item["stamps"]:
        path = os.path.join(target, _safe_relative(relative)) if item["dir"] else target
        name = relative or item["target"]
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            need.append(relative)
            continue
        except NotADirectoryError:
            return {"conflict": f"a file stands where the folder of {relative} goes"}
        except PermissionError:
            return {"conflict": f"{name} cannot be read there"}
        if stat.S_ISDIR(info.st_mode):
            return {"conflict": f"{name} is a folder there"}
        if _data_differs(path, info, size, mtime_ns, digest):
            if not item["target"].startswith("~"):  # outside the home stackops only adds files
                return {"conflict": f"{name} exists there with other content (outside the home, "
                                    "data never replaces a file)"}
            need.append(relative)
    return {"need": need}


def _data_differs(path: str, info: os.stat_result, size: int, mtime_ns: int, digest: str) -> bool:
    """Whether the file at ``path`` (``info``, its lstat) is not the sender's: a recent one
    (``digest`` given) by hash; else unless written here more than RACY_NS after its mtime."""
    if not stat.S_ISREG(info.st_mode) or info.st_size != size or info.st_mtime_ns != mtime_ns:
        return True
    if digest:  # the sender's file is recent: its stamps may not have changed with its bytes
        try:
            return _sha256_file(path) != digest
        except OSError:
            return True
    # written here soon after its stamp: the sender may have written it again within that tick
    return info.st_mtime_ns + RACY_NS >= info.st_ctime_ns


# ============================================================================================
# 5. models
# ============================================================================================

class _Unmade:
    """A model's ``__dataclass_fields__`` until the class is first used (see _model)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def __get__(self, instance: Any, owner: type) -> Any:
        return _made(owner).__dataclass_fields__  # type: ignore[attr-defined]


_MADE_LOCK = _thread.RLock()  # (making one asks inspect for its signature: _ModelSignature)


def _made(cls: type) -> type:
    """``cls`` made a dataclass now, unless it was already (see _model)."""
    with _MADE_LOCK:
        unmade = cls.__dict__.get("__dataclass_fields__")
        if isinstance(unmade, _Unmade):
            for name, value in list(vars(cls).items()):
                if isinstance(value, _Field):
                    setattr(cls, name, dataclasses.field(**value.options))
            dataclasses.dataclass(cls, **unmade.options)  # its fields replace the stand-in
            # (a __new__ once set cannot be deleted: object's would then refuse arguments)
            cls.__new__ = staticmethod(_plain_new)  # type: ignore[assignment]
    return cls


def _plain_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    return object.__new__(cls)


class _ModelSignature:
    """A model's ``__signature__``: its dataclass __init__'s, as inspect and help() show a
    dataclass (its __new__ would otherwise stand in for it)."""

    def __get__(self, instance: Any, owner: type) -> Any:
        import inspect

        init = inspect.signature(_made(owner).__init__)  # type: ignore[misc]
        return init.replace(parameters=list(init.parameters.values())[1:])


def _first_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    for klass in cls.__mro__:  # each one's state asked under the lock: while another thread makes
        if "__dataclass_fields__" in klass.__dict__:  # it, its fields are set before its __init__
            _made(klass)
    return object.__new__(cls)


class _Field:
    """A model's ``dataclasses.field(...)`` until its class is made (see _model): dataclasses
    is imported then, not by every start."""

    def __init__(self, **options: Any) -> None:
        self.options = options


if TYPE_CHECKING:
    from dataclasses import dataclass as _model
    from dataclasses import field as _field
else:
    _field = _Field

    def _model(cls=None, /, **options):
        """``dataclasses.dataclass``, done where the class is first used (an instance made,
        ``fields()`` or ``is_dataclass()`` asked), not at import: writing a dataclass's methods
        compiles them, and a job's wrapper, which uses two of the models, would pay for all."""
        def unmade(cls):
            cls.__dataclass_fields__ = _Unmade(options)
            cls.__new__ = staticmethod(_first_new)
            cls.__signature__ = _ModelSignature()
            return cls

        return unmade if cls is None else unmade(cls)


_SIMPLE_TYPES: dict[str, Any] = {"str": str, "int": int, "float": (int, float), "bool": bool,
                                 "dict": dict, "None": type(None), "Any": object}


def _matches(value: Any, annotation: str) -> bool:
    if annotation.startswith("list[") and annotation.endswith("]"):
        inner = annotation[5:-1]
        return isinstance(value, list) and all(_matches(item, inner) for item in value)
    if annotation.startswith("dict["):
        return isinstance(value, dict)
    if annotation in ("int", "float") and isinstance(value, bool):
        return False  # True is an int to Python, not to a config file
    kind = _SIMPLE_TYPES.get(annotation) or globals().get(annotation)
    return kind is not None and isinstance(value, kind)


def _validate_fields(instance: Any) -> None:
    """Refuse a dataclass whose values do not match the annotations (strings, since PEP 563)."""
    for name, annotation, exact, options in _field_checks(type(instance)):
        value = getattr(instance, name)
        if type(value) in exact:  # a plain value of a plain type the annotation allows
            continue
        if not any(_matches(value, option) for option in options):
            raise ConfigError(f"{type(instance).__name__}.{name} must be {annotation}, "
                              f"got {type(value).__name__} {_shorten(repr(value), 60)}")


_FIELD_CHECKS: dict[type, list[tuple[str, str, frozenset[type], list[str]]]] = {}
_EXACT = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,),
          "None": (type(None),)}  # the exact types of a value each simple annotation accepts


def _field_checks(cls: type) -> list[tuple[str, str, frozenset[type], list[str]]]:
    """Per field of model ``cls``: (name, annotation, the exact types its plain values may have,
    its alternatives for _matches), worked out once: list makes thousands of models."""
    checks = _FIELD_CHECKS.get(cls)
    if checks is None:
        checks = []
        for spec in dataclasses.fields(cls):
            options = [part.strip() for part in str(spec.type).split("|")]
            if "Any" not in options:
                exact = frozenset(kind for option in options for kind in _EXACT.get(option, ()))
                checks.append((spec.name, str(spec.type), exact, options))
        _FIELD_CHECKS[cls] = checks
    return checks


def _from_plain(cls: Any, data: Any, required: tuple[str, ...] = (), blank: Any = None) -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown and missing required keys (into
    ``blank``, an instance made with ``cls.__new__``, if given)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {spec.name for spec in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing field(s) {', '.join(missing)}")
    if blank is None:
        return cls(**data)
    cls.__init__(blank, **data)
    return blank


@_model
class WorkloadParams:
    """A slice ``[idx_start, idx_end)`` of the index range ``[idx_min, idx_max)`` of a workload."""

    idx_min: int = 0
    idx_max: int = 1000
    idx_start: int = 0
    idx_end: int = 1000
    idx: int = 0
    jobs: int = 3
    job_id: str = ""

    def __post_init__(self) -> None:
        _validate_fields(self)
        if not self.idx_min <= self.idx_start <= self.idx_end <= self.idx_max:
            raise ConfigError("WorkloadParams needs idx_min <= idx_start <= idx_end <= idx_max, "
                              "got "
                              f"{self.idx_min}, {self.idx_start}, {self.idx_end}, {self.idx_max}")
        if self.jobs < 1:
            raise ConfigError(f"WorkloadParams.jobs must be at least 1, got {self.jobs}")

    @classmethod
    def default(cls) -> WorkloadParams:
        return cls()

    @property
    def save_suffix(self) -> str:
        return f"machine_{self.idx_start}_{self.idx_end}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> WorkloadParams:
        return _from_plain(cls, data)

    def split_to_jobs(self, jobs: int | None = None) -> list[WorkloadParams]:
        """Cut this slice into ``jobs`` contiguous parts that cover it exactly once, the larger
        parts last: [0, 7) in 3 gives [0, 2), [2, 4), [4, 7)."""
        jobs = self.jobs if jobs is None else jobs
        total = self.idx_end - self.idx_start
        count = min(jobs, total)
        if count <= 0:
            return []
        bounds = [self.idx_start + (i * total) // count for i in range(count + 1)]
        return [dataclasses.replace(self, idx_start=bounds[i], idx_end=bounds[i + 1], idx=i)
                for i in range(count)]

    def get_section_from_series(self, series: list[Any]) -> tuple[Any, Any]:
        """The items of ``series`` (e.g. dates) at this slice's start and end, mapped onto it by
        the slice's position in the whole range."""
        if not series:
            raise ConfigError("get_section_from_series needs a non-empty series")
        span = self.idx_max - self.idx_min
        if span <= 0:
            raise ConfigError("get_section_from_series needs idx_max > idx_min")
        last = len(series) - 1
        return (series[last * (self.idx_start - self.idx_min) // span],
                series[last * (self.idx_end - self.idx_min) // span])

    def summary(self) -> str:
        span = self.idx_max - self.idx_min
        share = (self.idx_end - self.idx_start) / span * 100 if span > 0 else 0.0
        return f"Workload: {share:.2f}% of total, split among {self.jobs} threads."


# -- the user config file: defaults for every job, and per host ----------------------------------
#
#   {"default_email_address": "me@example.org", "default_email_config": "lab",
#    "defaults": {"max_jobs": 2},
#    "hosts": {"gpu-box": {"max_jobs": 4, "python": "~/venv/bin/python", "copy_repo": true,
#                          "slurm": {"partition": "gpu"}, "env": {"OMP_NUM_THREADS": "4"}},
#              "localhost": {"python": "python3.11"}}}
#
# A job on host H (its ssh_host as given; "localhost" for this machine) takes each setting from
# hosts[H], else from defaults, else the built-in default; env and slurm key by key. An argument
# given always wins; env and slurm given are laid over the file's, key by key.

_HOST_SETTINGS = {  # a host entry's key -> the RemoteStackOpsConfig field it fills
    "max_jobs": "max_simultaneous_jobs", "python": "python", "copy_repo": "copy_repo",
    "slurm": "slurm_options", "env": "env"}
_SETTING_TYPES = {"max_jobs": "a whole number, at least 1", "python": "an interpreter (a string)",
                  "copy_repo": "true or false", "slurm": "an object of sbatch options (strings)",
                  "env": "an object of environment variables (strings)",
                  "default_email_address": "an e-mail address (a string)",
                  "default_email_config": "a string", "defaults": "an object (a host entry)",
                  "hosts": "an object: host alias -> host entry"}
_USER_CONFIG_READ: dict[str, Any] = {}  # the last file read: its (path, stat) key and content


class _UserDefault:
    """The default of a setting the user config file may give: a value left out, told apart
    from one given that equals the built-in default (``default``)."""

    def __init__(self, default: Any) -> None:
        self.default = default

    def __repr__(self) -> str:
        return f"<user config, else {self.default!r}>"


def _from_user_config(default: Any) -> Any:
    return _UserDefault(default)


def user_config_location() -> tuple[Path, str]:
    """The user config file and what chose it: STACKOPS_CONFIG, else $XDG_CONFIG_HOME (when
    absolute, as the XDG spec says), else ~/.config."""
    chosen = os.environ.get("STACKOPS_CONFIG")
    if chosen:
        return expand_home(chosen), "STACKOPS_CONFIG"
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "stackops" / "config.json", "XDG_CONFIG_HOME"
    return expand_home(DEFAULT_USER_CONFIG), "default"


def read_user_config() -> dict[str, Any]:
    """The user config file, checked whole ({} when there is none): a key it does not know or a
    value of the wrong type is refused, naming the file, the line and the key."""
    path = user_config_location()[0]
    try:
        info = path.stat()
        key = f"{path}\0{info.st_ino}\0{info.st_mtime_ns}\0{info.st_size}"
        if _USER_CONFIG_READ.get("key") != key:
            text = path.read_text(encoding="utf-8")
            _USER_CONFIG_READ.update(key=key, data=_check_user_config(path, text))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{collapse_home(path)} cannot be read: {exc}") from exc
    return dict(_USER_CONFIG_READ["data"])


def _check_user_config(path: Path, text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", 1)
        raise ConfigError(f"{collapse_home(path)}, line {line}: not JSON: "
                          f"{getattr(exc, 'msg', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{collapse_home(path)}: must hold a JSON object",
                          hint='e.g. {"hosts": {"gpu-box": {"max_jobs": 4}}}')
    for key, value in data.items():
        if key == "defaults":
            _check_host_entry(path, text, [key], value)
        elif key == "hosts":
            _user_config_type(path, text, [key], key, isinstance(value, dict), value)
            for host, entry in value.items():
                _check_host_entry(path, text, [key, host], entry)
        elif key in ("default_email_address", "default_email_config"):
            _user_config_type(path, text, [key], key, isinstance(value, str) and value != "", value)
            if key == "default_email_address":
                _located(path, text, [key], check_email_address, value, key)
        else:
            raise _user_config_error(path, text, [key], f"unknown key {key!r}",
                                     "known keys: default_email_address, default_email_config, "
                                     "defaults, hosts")
    return data


def _check_host_entry(path: Path, text: str, keys: list[str], entry: Any) -> None:
    where = ".".join(keys)
    _user_config_type(path, text, keys, "defaults", isinstance(entry, dict), entry)
    for key, value in entry.items():
        if key not in _HOST_SETTINGS:
            raise _user_config_error(path, text, [*keys, key], f"unknown key {key!r} in {where}",
                                     f"a host entry knows {', '.join(_HOST_SETTINGS)}")
        if key == "max_jobs":
            right = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif key == "copy_repo":
            right = isinstance(value, bool)
        elif key == "python":
            right = isinstance(value, str) and value.strip() != ""
        else:
            right = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        _user_config_type(path, text, [*keys, key], key, right, value)
        for item, setting in value.items() if key in ("slurm", "env") else ():
            if key == "slurm":
                _located(path, text, [*keys, key, item], check_slurm_options, {item: setting})
            else:
                _located(path, text, [*keys, key, item], check_job_env, {item: setting},
                         f"{where}.env")


def _user_config_type(path: Path, text: str, keys: list[str], kind: str, right: bool,
                      value: Any = None) -> None:
    """Refuse the value at ``keys`` unless it is ``right``: it must be _SETTING_TYPES[kind]."""
    if not right:
        got = "" if value is None else f", got {_shorten(json.dumps(value), 40)}"
        raise _user_config_error(path, text, keys,
                                 f"{'.'.join(keys)} must be {_SETTING_TYPES[kind]}{got}")


def _located(path: Path, text: str, keys: list[str], check: Callable[..., Any], *args: Any) -> None:
    """``check(*args)``, its refusal said with the file and the line of ``keys``."""
    try:
        check(*args)
    except ConfigError as exc:
        raise _user_config_error(path, text, keys, str(exc), exc.hint) from None


def _user_config_error(path: Path, text: str, keys: list[str], message: str,
                       hint: str | None = None) -> ConfigError:
    return ConfigError(f"{collapse_home(path)}, line {_json_key_line(text, keys)}: {message}",
                       hint=hint)


def _json_key_line(text: str, keys: list[str]) -> int:
    """The line of the JSON ``text`` where the path of object ``keys`` is (as far as it goes;
    a key given twice: its last, which is the one json keeps)."""
    decoder = json.JSONDecoder()

    def skip(at: int) -> int:  # past blanks
        while text[at:at + 1] in (" ", "\t", "\n", "\r"):
            at += 1
        return at

    at, line_at = skip(0), 0
    for key in keys:
        if text[at:at + 1] != "{":
            break
        at, found = skip(at + 1), None
        while text[at:at + 1] == '"':
            name, end = decoder.raw_decode(text, at)  # the key: a JSON string
            value_at = skip(skip(end) + 1)  # past the colon
            if name == key:
                found = (at, value_at)
            at = skip(decoder.raw_decode(text, value_at)[1])
            at = skip(at + 1) if text[at:at + 1] == "," else at
        if found is None:
            break
        line_at, at = found
    return text.count("\n", 0, line_at) + 1


def user_settings(ssh_host: str | None) -> dict[str, Any]:
    """What the user config file sets for a job on ``ssh_host`` ("localhost": this machine; None: no
    host's entry): its host entry over its defaults, env and slurm merged key by key."""
    merged: dict[str, Any] = {}
    for key, (value, _) in _user_settings_from(ssh_host).items():
        name, _, item = key.partition(".")
        if item:
            merged.setdefault(name, {})[item] = value
        else:
            merged[name] = value
    return merged


def _user_settings_from(ssh_host: str | None) -> dict[str, tuple[Any, list[str]]]:
    """Each setting for ``ssh_host`` ("env.NAME": env's or slurm's) with the keys that set it."""
    data = read_user_config()
    found: dict[str, tuple[Any, list[str]]] = {}
    entries = [(["defaults"], data.get("defaults") or {})]
    hosts = data.get("hosts") or {}
    if ssh_host is not None and ssh_host in hosts:
        entries.append((["hosts", ssh_host], hosts[ssh_host]))
    for keys, entry in entries:
        for key, value in entry.items():
            if isinstance(value, dict):
                found.update({f"{key}.{item}": (v, [*keys, key, item])
                              for item, v in value.items()})
            else:
                found[key] = (value, [*keys, key])
    return found


def read_user_config_value(key: str, purpose: str) -> str:
    """One string from the user config file, or a ConfigError naming the file and the key."""
    path = user_config_location()[0]
    hint = f'add {{"{key}": "..."}} to {collapse_home(path)}, or pass the value explicitly'
    if not path.exists():
        raise ConfigError(f"{purpose} needs '{key}', and {collapse_home(path)} does not exist",
                          hint=hint)
    value = read_user_config().get(key)
    if not value:
        raise ConfigError(f"{purpose} needs '{key}', which {collapse_home(path)} does not set",
                          hint=hint)
    return str(value)


@_model
class RemoteStackOpsConfig:
    """What to run where, and how: the typed job description a RemoteMachine consumes.
    ``copy_repo``, ``max_simultaneous_jobs``, ``python``, ``slurm_options`` and ``env`` left out
    come from the user config file for ``ssh_host`` (see user_settings), else their defaults."""

    job_id: str = _field(default_factory=_random_job_id)
    base_dir: str = DEFAULT_BASE_DIR
    description: str = ""
    ssh_host: str | None = None
    copy_repo: bool = _from_user_config(False)
    update_repo: bool = False
    install_repo: bool = False
    data: list[str] = _field(default_factory=list)
    transfer_method: str = "sftp"
    cloud_name: str | None = None
    allowed_remotes: list[str] | None = None
    notify_upon_completion: bool = False
    to_email: str | None = None
    email_config_name: str | None = None
    launch_method: str = "remotely"
    interactive: bool = False
    wrap_in_try_except: bool = False
    parallelize: bool = False
    lock_resources: bool = True
    max_simultaneous_jobs: int = _from_user_config(1)
    workload_params: WorkloadParams | None = None
    # interpreter on the executing machine; None: this one locally, python3 on a host
    python: str | None = _from_user_config(None)
    accept_new_host_key: bool = False  # trust and record an unknown host key (a changed one: never)
    ssh_timeout: float = 15.0  # seconds to connect, to open a command, or for a transfer to stall
    slurm_options: dict[str, str] = _field(default_factory=dict)  # sbatch long options
    retries: int = 0  # a failed run is repeated in place up to this many times
    retry_delay: float = 0.0  # seconds between a failed run and the next
    # start only once these jobs completed
    after: list[str] = _field(default_factory=list)
    # wait for this many of the machine's GPUs (their own pool of slots) and get exactly them
    gpus: int = 0
    group: str | None = None  # a named pool with its own max_simultaneous_jobs
    env: dict[str, str] = _field(default_factory=dict)  # the job's own variables
    # a bash command run once when the job ends, where it ran (see HOOK_PLACEHOLDERS)
    on_end: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.workload_params, dict):
            self.workload_params = WorkloadParams.from_dict(self.workload_params)
        self._take_user_settings()
        _validate_fields(self)
        check_job_env(self.env, _option("env", "--env"))
        if self.on_end is not None:
            check_hook(self.on_end, _option("on_end", "--on-end"))
        check_safe_name(self.job_id, _option("job_id", "--job-id"))
        if not self.base_dir.strip():
            raise ConfigError("base_dir must not be empty")
        if self.transfer_method not in TRANSFER_METHODS:
            raise ConfigError(f"transfer_method must be one of {', '.join(TRANSFER_METHODS)}, "
                              f"got {self.transfer_method!r}")
        self._check_launch()
        check_slurm_options(self.slurm_options)
        if not 0 <= self.retries <= 100 or not 0 <= self.retry_delay <= 86400:
            raise ConfigError(f"{_option('retries', '--retries')} must be 0 to 100 and "
                              f"{_option('retry_delay', '--retry-delay')} 0 to 86400 seconds, "
                              f"got {self.retries} and {self.retry_delay}")
        self._check_pool()
        for parent in self.after:
            check_safe_name(parent, _option("after", "--after"))
            if parent == self.job_id:
                raise ConfigError(f"job {self.job_id} cannot run after itself")
        if self.launch_method == "slurm":
            self._check_slurm_combination()
        elif self.slurm_options:
            slurm = _option("launch_method='slurm'", "--slurm")
            raise ConfigError(f"{_option('slurm_options', '--slurm-opt')} are for {slurm}",
                              hint=f"add {slurm}")
        if self.transfer_method == "cloud" and not self.cloud_name:
            raise ConfigError(f"{_option('transfer_method', '--transfer')} 'cloud' needs "
                              f"{_option('cloud_name', '--cloud')}",
                              hint=f"pass {_option('cloud_name=', '--cloud ')}<an rclone remote>")
        if self.max_simultaneous_jobs < 1:
            raise ConfigError(f"{_option('max_simultaneous_jobs', '--max-jobs')} must be at least "
                              f"1, got {self.max_simultaneous_jobs}")
        if self.copy_repo and self.update_repo:
            copy_repo = _option("copy_repo", "--copy-repo")
            raise ConfigError(f"{copy_repo} and {_option('update_repo', '--update-repo')} cannot "
                              "go together: the job runs its own snapshot of the code sent from "
                              "here, which has no .git to pull into",
                              hint=f"pull here and send the result with {copy_repo}, or drop "
                                   f"{copy_repo} to git pull the host's own clone")
        if self.python is not None and not self.python.strip():
            raise ConfigError(f"{_option('python', '--python')} must name an interpreter, e.g. "
                              "'python3'")
        if not self.ssh_timeout > 0:
            raise ConfigError(f"{_option('ssh_timeout', '--ssh-timeout')} must be positive "
                              f"seconds, got {self.ssh_timeout}")
        self._take_email_settings()

    def _take_user_settings(self) -> None:
        """Fill in the settings left out from the user config file for ssh_host (env and
        slurm_options key by key, under the ones given). A config read back from a job's record
        (from_dict) is complete: the file is not read, and what it lacks takes the default."""
        self._given = {field: copy.copy(getattr(self, field)) for field in _HOST_SETTINGS.values()
                       if not isinstance(getattr(self, field), _UserDefault)}
        complete = self.__dict__.pop("_complete", False)
        cloud = self.launch_method == "cloud_manager"  # no host of its own: the defaults only
        found = {} if complete else user_settings(None if cloud else self.ssh_host or "localhost")
        for key, field in _HOST_SETTINGS.items():
            value = getattr(self, field)
            unused = (key == "slurm" and self.launch_method != "slurm"
                      or key == "copy_repo" and self.update_repo)  # given ones win
            if key not in found or unused:
                setattr(self, field, value.default if isinstance(value, _UserDefault) else value)
            elif isinstance(value, dict):
                setattr(self, field, {**found[key], **value})
            elif isinstance(value, _UserDefault):
                setattr(self, field, found[key])

    def _check_launch(self) -> None:
        if self.launch_method not in LAUNCH_METHODS:
            raise ConfigError(f"launch_method must be one of {', '.join(LAUNCH_METHODS)}, "
                              f"got {self.launch_method!r}")
        if self.launch_method == "cloud_manager" and not self.cloud_name:
            raise ConfigError("launch_method 'cloud_manager' queues the job on a cloud remote: "
                              "it needs cloud_name", hint="pass cloud_name=<an rclone remote name>")
        if self.launch_method == "cloud_manager" and self.ssh_host is not None:
            raise ConfigError("launch_method 'cloud_manager' runs the job on whichever worker "
                              f"claims it, not on ssh_host {self.ssh_host!r}",
                              hint="leave out one of the two")

    def _take_email_settings(self) -> None:
        if self.to_email is not None:
            check_email_address(self.to_email, _option("to_email", "--email"))
        notify = _option("notify_upon_completion", "--notify")
        if self.notify_upon_completion and self.to_email is None:
            self.to_email = read_user_config_value("default_email_address", notify)
        if self.notify_upon_completion and self.email_config_name is None:
            self.email_config_name = read_user_config_value("default_email_config", notify)

    def _for_host(self, ssh_host: str, **changes: Any) -> RemoteStackOpsConfig:
        """This config for a job on ``ssh_host`` (a cluster's part): the settings given stay,
        the ones the user config file gave are taken again for that host."""
        data = dict(self.to_dict(), ssh_host=ssh_host, **changes)
        if self._given.keys() == set(_HOST_SETTINGS.values()):  # all given (or a record)
            return RemoteStackOpsConfig.from_dict(data)
        for field in _HOST_SETTINGS.values():
            data.pop(field)
        return RemoteStackOpsConfig(**data, **{f: copy.copy(v) for f, v in self._given.items()})

    def _check_pool(self) -> None:
        gpus, group = _option("gpus", "--gpus"), _option("group", "--group")
        if not 0 <= self.gpus <= 64:
            raise ConfigError(f"{gpus} must be 0 to 64, got {self.gpus}")
        if self.group is not None:
            check_safe_name(self.group, group)
        if self.gpus and (self.group is not None or not self.lock_resources):
            raise ConfigError(f"{gpus} is a pool of its own: it goes with neither {group} nor "
                              f"{_option('lock_resources=False', '--no-lock')}")
        if self.gpus and self.launch_method == "slurm":
            raise ConfigError("with Slurm, ask Slurm for GPUs",
                              hint=_option("slurm_options={'gres': 'gpu:N'}",
                                           "--slurm-opt gres=gpu:N"))

    @property
    def pool(self) -> str:
        """The slot pool the job waits in: "" (the machine's), "gpu" or "group-<name>"."""
        return "gpu" if self.gpus else (f"group-{self.group}" if self.group else "")

    def _check_slurm_combination(self) -> None:
        for flag, what in ((self.interactive, "an interactive job"),
                           (self.transfer_method == "cloud",
                            _option("transfer_method='cloud'", "--transfer cloud")),
                           (self.parallelize,
                            _option("parallelize", "--parallelize") + " (use the array)")):
            if flag:
                slurm = _option("launch_method='slurm'", "--slurm")
                raise ConfigError(f"{slurm} cannot run {what}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RemoteStackOpsConfig:
        """A config as to_dict wrote it (a job's record): taken as it is, the user config file
        is not read."""
        blank = cls.__new__(cls)
        blank.__dict__["_complete"] = True  # see _take_user_settings
        return _from_plain(cls, data, ("job_id",), blank)


@_model
class JobStatus:
    """Everything known about a job at one moment, as plain data."""

    job_id: str
    status: str
    pid: int | None = None
    submission_time: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    results_path: str | None = None
    error_message: str = ""
    place: int | None = None  # 1 = next to get a slot, while waiting
    host: str = "localhost"
    log_tail: str = ""
    slurm_job_id: str | None = None  # "123", or "123_4" for an array task
    reason: str = ""  # why it waits (the jobs it runs after) or, for Slurm, how Slurm sees it
    attempt: str = ""  # "2/4" while retries are allowed: the run it is on, of how many
    exit_code: int | None = None  # of the last run (a command's own, a Python job's 0 or 1)
    signal: int | None = None  # the signal that killed the last run
    max_rss_bytes: int | None = None  # peak memory of the last run, as the kernel counted it
    cpu_seconds: float | None = None  # CPU time (user and system) of the last run
    slot: str | None = None  # the slot(s) it held ("slot-0", "gpu-1,gpu-2")
    runs: list[dict[str, Any]] = _field(default_factory=list)  # earlier runs
    as_of: str | None = None  # read from a record on another machine: as of this moment
    schema: int = STATE_SCHEMA

    def __post_init__(self) -> None:
        _validate_fields(self)
        if self.status not in STATUSES:
            raise ConfigError(f"unsupported job status {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)  # plain values only: no deep copy needed (10,000 rows in list)

    @classmethod
    def from_dict(cls, data: Any) -> JobStatus:
        return _from_plain(cls, data, required=("job_id", "status"))

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


@_model
class ExecutionTimings:
    """When a job was submitted, started and ended (timezone-aware)."""

    submission_time: _dt.datetime | None = None
    start_utc: _dt.datetime | None = None
    end_utc: _dt.datetime | None = None
    start_local: _dt.datetime | None = None
    end_local: _dt.datetime | None = None

    @property
    def execution_duration(self) -> _dt.timedelta | None:
        return self.end_utc - self.start_utc if self.start_utc and self.end_utc else None

    @property
    def wait_duration(self) -> _dt.timedelta | None:
        if self.start_utc and self.submission_time:
            return self.start_utc - self.submission_time
        return None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {spec.name: _iso(getattr(self, spec.name))
                                for spec in dataclasses.fields(self)}
        for name in ("execution_duration", "wait_duration"):
            delta = getattr(self, name)
            data[name + "_seconds"] = delta.total_seconds() if delta is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ExecutionTimings:
        if not isinstance(data, dict):
            raise ConfigError("ExecutionTimings: expected a JSON object")
        names = [spec.name for spec in dataclasses.fields(cls)]
        return cls(**{name: _parse_iso(data.get(name)) for name in names})


def find_repo_root(path: Path, fallback: Path | None = None) -> Path:
    """The git work tree holding ``path`` (a folder with ``.git``), else ``fallback`` or the
    file's folder."""
    start = path if path.is_dir() else path.parent
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return fallback or start


def _import_root(file: Path, module: str) -> Path:
    """The folder that must be on sys.path for ``import module`` to load ``file``."""
    parts = module.split(".")
    ups = len(parts) if file.name == "__init__.py" else len(parts) - 1
    root = file.parent
    for _ in range(ups):
        root = root.parent
    expected = (Path(*parts) / "__init__.py" if file.name == "__init__.py"
                else Path(*parts).with_suffix(".py"))
    if root / expected != file:
        raise ConfigError(f"module {module} does not match its file {file}",
                          hint="pass a function imported normally from a module of your repo")
    return root


def _module_name_for(file: Path) -> str:
    """Dotted module name of ``file``, climbing while the folders are packages."""
    parts = [file.stem] if file.name != "__init__.py" else []
    folder = file.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


def _closest(word: str, words: list[str]) -> str:
    """The one of ``words`` a typo of ``word`` most likely meant ("" when none is close)."""
    import difflib

    found = difflib.get_close_matches(word, words, n=1)
    return found[0] if found else ""


def _entry_point_hint(text: str) -> str | None:
    """For ``pkg.mod:func`` (an entry point's spelling) the FILE.py:FUNC form stackops takes,
    with the module's file when it is here."""
    match = re.match(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_][\w.]*)\Z", text)
    if match is None:
        return None
    base = match[1].replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py", f"src/{base}.py"):
        if Path(candidate).is_file():
            return f"a function is FILE.py:FUNC here: {candidate}:{match[2]}"
    return f"a function is FILE.py:FUNC, e.g. {base}.py:{match[2]}"


def _top_level_names(file: Path, text: str | None = None) -> set[str]:
    """Names a module defines at its top level, read without importing it (from ``text``, the
    file's bytes as a snapshot holds them, when given)."""
    import _ast as ast  # ast's own node classes, without ast.py (1.5 ms of a submit)

    try:
        source = file.read_text(encoding="utf-8") if text is None else text
        tree: Any = compile(source, str(file), "exec", ast.PyCF_ONLY_AST)  # (ast.parse's way)
    except (SyntaxError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from exc
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


@_model
class JobParams:
    """What the wrapper runs, located relative to home and to the repo so that it travels:
    ``*_rh`` paths are home-relative (``~/...``), ``*_r`` paths are relative to the repo root.
    A command job (``kind="command"``) runs ``command``, an argv list run without a shell, in
    the folder ``file_path_r`` of its repo (``file_path_rh`` where it was submitted)."""

    description: str = ""
    ssh_repr: str = ""
    ssh_repr_remote: str = ""
    error_message: str = ""
    session_name: str = ""
    tab_name: str = ""
    file_manager_path: str = FILE_MANAGER_JSON
    repo_path_rh: str = ""
    file_path_rh: str = ""
    file_path_r: str = ""
    func_module: str = ""
    func_class: str | None = None
    func_name: str | None = None
    kind: str = "script"  # script | function | method | run_path | command
    import_root_r: str = "."
    # with copy_repo: the snapshot whose copy the job runs in (job folder's code/)
    code_snapshot: str = ""
    # with install_repo: the version git describe gives here (the copy has no .git)
    scm_version: str = ""
    # with copy_repo: the data paths inside the repo (relative to it), linked into the job's copy
    data_r: list[str] = _field(default_factory=list)
    command: list[str] = _field(default_factory=list)  # kind "command": its argv

    def __post_init__(self) -> None:
        _validate_fields(self)
        if self.kind not in ("script", "function", "method", "run_path", "command"):
            raise ConfigError(f"JobParams.kind {self.kind!r} is not script, function, method, "
                              "run_path or command")
        if self.kind == "command":
            _check_command(self.command)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> JobParams:
        return _from_plain(cls, data)

    @classmethod
    def _located(cls, file: Path, repo: Path | None = None, **fields: Any) -> JobParams:
        repo = repo or find_repo_root(file)
        rel = file.relative_to(repo).as_posix()
        return cls(repo_path_rh=collapse_home(repo), file_path_rh=collapse_home(file),
                   file_path_r=rel, **fields)

    @classmethod
    def from_script(cls, path: str | os.PathLike[str]) -> JobParams:
        file = expand_home(path)
        if not file.exists():
            raise ConfigError(f"script not found: {path}",
                              hint=_entry_point_hint(str(path)) or "a command? put it after --: "
                                   f"{_prog()} run [options] -- COMMAND [ARGS...]")
        if not file.is_file():
            raise ConfigError(f"not a script file: {path} is a "
                              f"{'directory' if file.is_dir() else 'special file'}")
        return cls._located(file.resolve(), func_module=file.stem, kind="script")

    @classmethod
    def from_command(cls, argv: list[str] | tuple[str, ...],
                     cwd: str | os.PathLike[str] | None = None) -> JobParams:
        """A command (``["make", "train"]``: an argv list, run without a shell) run in the folder
        ``cwd`` (default: this process's), located as scripts are: its repo is the git work tree
        holding that folder, else the folder itself, and the command runs in the same folder of
        the repo (or of its copy, with copy_repo) where the job runs."""
        argv = _check_command(argv)
        folder = expand_home(os.getcwd() if cwd is None else cwd)
        if not folder.is_dir():
            raise ConfigError(f"the command's folder {cwd} is not a folder")
        folder = folder.resolve()
        repo = find_repo_root(folder)
        return cls(repo_path_rh=collapse_home(repo), file_path_rh=collapse_home(folder),
                   file_path_r=folder.relative_to(repo).as_posix(), func_module=argv[0],
                   kind="command", command=argv)

    @classmethod
    def from_function_ref(cls, ref: str) -> JobParams:
        """``path/to/file.py:func`` or ``path/to/file.py:Class.func``, checked unimported."""
        path, sep, qualname = ref.rpartition(":")
        if not sep or not path or not re.match(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?\Z", qualname):
            raise ConfigError(f"{ref!r} is not FILE.py:FUNCTION", hint="e.g. mypkg/jobs.py:train")
        file = expand_home(path)
        if not file.is_file() or file.suffix != ".py":
            near = _closest(file.name, [p.name for p in file.parent.glob("*.py")])
            raise ConfigError(f"no Python file {path!r} (from {ref!r})", hint=near and (
                f"did you mean {near!r}? ({os.path.join(os.path.dirname(path), near)}:{qualname})"))
        file = file.resolve()
        head, names = qualname.split(".")[0], _top_level_names(file)
        if head not in names:
            near = _closest(head, sorted(names))
            raise ConfigError(f"{path} defines no top-level {head!r}", hint=near and (
                f"did you mean {near!r}? ({path}:{qualname.replace(head, near, 1)})"))
        module = _module_name_for(file)
        cls_name, _, func = qualname.rpartition(".")
        return cls._for_module(file, module, func, cls_name or None, "function")

    @classmethod
    def _for_module(cls, file: Path, module: str, name: str, owner: str | None,
                    kind: str) -> JobParams:
        root = _import_root(file, module)
        repo = find_repo_root(file, fallback=root)
        params = cls._located(file, repo, func_module=module, func_name=name, func_class=owner,
                              kind=kind)
        try:
            params.import_root_r = root.relative_to(repo).as_posix() or "."
        except ValueError:
            raise ConfigError(f"{module} is imported from {root}, "
                              f"outside its repo {repo}") from None
        return params

    @classmethod
    def from_callable(cls, func: Callable[..., Any]) -> JobParams:
        """A function, a bound method (its instance pickled) or a ``runpy.run_path`` one."""
        target = getattr(func, "__func__", func)
        name = getattr(target, "__name__", None)
        qualname = getattr(target, "__qualname__", "") or ""
        module = getattr(target, "__module__", None)
        code = getattr(target, "__code__", None)
        if name is None or code is None:
            raise ConfigError(f"{func!r} is not a Python function, method or script path")
        if name == "<lambda>":
            raise ConfigError("a lambda cannot be sent as a job",
                              hint="define it with def at the top of a module")
        if "<locals>" in qualname:
            raise ConfigError(f"{qualname} is defined inside another function and cannot be "
                              "imported by the job",
                              hint="move it to the top level of its module")
        if module == "__main__":
            raise ConfigError(f"{name} is defined in __main__, which the job cannot import",
                              hint=f"move {name} into a module file and import it from there")
        file = Path(code.co_filename).resolve()
        if not file.is_file():
            raise ConfigError(f"the source of {name} ({code.co_filename}) is not a file")
        owner = qualname.rpartition(".")[0] or None
        if hasattr(func, "__self__") and not isinstance(func.__self__, type(sys)):
            return cls._for_module(file, module or file.stem, name, owner, "method") \
                if module != "<run_path>" else cls._run_path(file, name, owner, "method")
        if module == "<run_path>":
            return cls._run_path(file, name, owner, "run_path")
        return cls._for_module(file, module or file.stem, name, owner, "function")

    @classmethod
    def _run_path(cls, file: Path, name: str, owner: str | None, kind: str) -> JobParams:
        params = cls._located(file, func_module=file.name, func_name=name, func_class=owner,
                              kind=kind)
        params.import_root_r = Path(params.file_path_r).parent.as_posix() or "."
        return params

    def get_execution_line(self, workload_params: WorkloadParams | None = None,
                           parallelize: bool = False, wrap_in_try_except: bool = False) -> str:
        """The Python lines (indented for the wrapper's ``execute``) that call the job. The
        workload written here is the job's, unless its own config names a slice of it (a Slurm
        array's task, whose wrapper is the array's: JobContext.workload)."""
        workload = workload_params.to_dict() if workload_params is not None else None
        given = f"workload_params = job.workload(WorkloadParams.from_dict({workload!r}))"
        if self.kind == "command":
            lines = _command_execution_lines(parallelize)
        elif self.kind == "script":
            if parallelize:
                raise ConfigError(f"{_option('parallelize=True', '--parallelize')} needs a "
                                  "function; a script cannot be split")
            lines = [given if workload_params is not None else "workload_params = None",
                     "res = job.run_script(func_kwargs, workload_params)"]
        elif workload_params is None:
            if parallelize:
                raise ConfigError(f"{_option('parallelize=True', '--parallelize')} needs "
                                  f"{_option('workload_params', '--workload')}")
            lines = ["func = job.load_callable()", "res = func(**func_kwargs)"]
        elif not parallelize:
            lines = [given, "func = job.load_callable()",
                     "res = func(workload_params=workload_params, **func_kwargs)"]
        else:
            lines = [given,
                     "parts = workload_params.split_to_jobs(workload_params.jobs)",
                     "from concurrent.futures import ProcessPoolExecutor",
                     "workers = stackops.pool_size(len(parts))",
                     "with ProcessPoolExecutor(max_workers=workers) as pool:",
                     "    futures = [pool.submit(stackops.call_job_part, JOB_ROOT, part.to_dict(), "
                     "func_kwargs)",
                     "               for part in parts]",
                     "    res = [future.result() for future in futures]"]
        if wrap_in_try_except:
            lines = (["try:"] + ["    " + line for line in lines]
                     + ["except Exception:", "    error_message = traceback.format_exc()",
                        "    res = None"])
        return "\n".join("    " + line for line in lines)


# -- command jobs: the argv, and the {name} placeholders a sweep's lines fill ---------------------

def _check_command(argv: Any) -> list[str]:
    """``argv`` as a command: a non-empty list of strings, the first naming the program, none
    holding a NUL character (exec cannot pass one). Returned as a new list."""
    if isinstance(argv, str) or not isinstance(argv, (list, tuple)) \
            or not all(isinstance(word, str) for word in argv):
        raise ConfigError(f"a command is a list of strings, got {_shorten(repr(argv), 60)}",
                          hint="e.g. ['python', 'train.py', '--epochs', '3']")
    if not argv or not argv[0].strip():
        raise ConfigError("the command is empty: name the program to run",
                          hint=f"e.g. {_prog()} run -- make train")
    if any("\0" in word for word in argv):
        raise ConfigError("a command's arguments cannot hold a NUL character")
    return list(argv)


def _command_execution_lines(parallelize: bool) -> list[str]:
    """The wrapper's lines for a command job: none of its own (run_job runs the command: see
    _run_command_job); a command cannot be split in processes."""
    if parallelize:
        raise ConfigError("parallelize runs a function's parts in processes; a command gets its "
                          "slice in STACKOPS_IDX_START and STACKOPS_IDX_END instead",
                          hint="split the work inside the command, or run its parts as a Slurm "
                               "array (--slurm) or over several hosts (cluster run)")
    return ["res = None  # a command: run_job starts it (its slice in STACKOPS_IDX_*)"]


# ``{name}`` is a placeholder; ``{{`` and ``}}`` stand for one brace; any other brace is itself
_COMMAND_PLACEHOLDER = _LazyPattern(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_SHELLS = frozenset(("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh"))
_SHELL_OPTIONS_WITH_VALUE = frozenset(("--rcfile", "--init-file"))


def command_placeholders(argv: list[str]) -> list[str]:
    """The names of the ``{name}`` placeholders in a command, each once, in order of appearance
    (``{{`` and ``}}`` are braces and name nothing)."""
    names: list[str] = []
    for word in argv:
        for match in _COMMAND_PLACEHOLDER.finditer(word):
            if match[1] and match[1] not in names:
                names.append(match[1])
    return names


def _shell_scripts(argv: list[str]) -> set[int]:
    """The positions in ``argv`` that a POSIX shell runs as code: the script after ``-c`` of
    ``sh``, ``bash -lc``, ``bash -o pipefail -c`` ..., wherever that shell stands in the command
    (``env``, ``timeout`` or ``srun`` may start it)."""
    scripts = set()
    for index, word in enumerate(argv):
        if os.path.basename(word) not in _SHELLS:
            continue
        position, has_c = index + 1, False
        while position < len(argv) and argv[position][:1] in ("-", "+") \
                and argv[position] not in ("-", "--"):
            option = argv[position]
            long = option.startswith("--")
            has_c = has_c or (not long and "c" in option[1:])
            takes_value = option in _SHELL_OPTIONS_WITH_VALUE or (not long and option[-1] in "oO")
            position += 2 if takes_value else 1
        if position < len(argv) and argv[position] == "--":
            position += 1
        if has_c and position < len(argv):
            scripts.add(position)
    return scripts


def _shell_state(text: str, state: str) -> str:
    """The quoting a POSIX shell is in after reading ``text`` from ``state``: "" (none), "'", '"' or
    "$'" (bash's C-like string), with a "\\" after it when a backslash escapes the next one."""
    quote, escaped, previous = state.rstrip("\\"), state.endswith("\\"), ""
    for char in text:
        if escaped:
            escaped = False
        elif quote == "'":
            quote = "" if char == "'" else quote
        elif char == "\\":
            escaped = True
        elif quote:
            quote = "" if char == quote[-1] else quote
        elif char == "'" and previous == "$":
            quote = "$'"
        elif char in "'\"":
            quote = char
        previous = char
    return quote + ("\\" if escaped else "")


def _value_text(value: Any) -> str:
    """A sweep value as command text: a string as it is, anything else as its JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _quoted_for(state: str, text: str) -> str:
    """``text`` as one literal piece of shell code read in quoting ``state`` (see _shell_state)."""
    if state == "'":
        return text.replace("'", "'\\''")
    if state == '"':
        return re.sub(r'([\\"$`])', r"\\\1", text)
    return shlex.quote(text)


def _fill_word(word: str, values: dict[str, Any], script: bool) -> str:
    """One word of a command with its placeholders filled: literally in an argument (no shell
    reads it), shell-quoted for where each stands in a shell's script."""
    pieces, state, done = [], "", 0
    for match in _COMMAND_PLACEHOLDER.finditer(word):
        literal = word[done:match.start()]
        pieces.append(literal)
        state = _shell_state(literal, state) if script else state
        done = match.end()
        if not match[1]:
            pieces.append(match[0][0])
            state = _shell_state(match[0][0], state) if script else state
            continue
        if script and (state.endswith("\\") or state.startswith("$") or literal.endswith("$")):
            raise ConfigError(f"{{{match[1]}}} stands after a '$' or a backslash, or in $'...', "
                              "in a shell script: there a value cannot stay literal",
                              hint="write ${{NAME}} for a shell variable, and leave a space or "
                                   "a quote before the placeholder")
        text = _value_text(values[match[1]])
        pieces.append(_quoted_for(state, text) if script else text)
    pieces.append(word[done:])
    return "".join(pieces)


def fill_command(argv: list[str], values: dict[str, Any]) -> list[str]:
    """The command with each ``{name}`` filled from ``values`` (``{{``/``}}``: a brace), so that
    every value arrives as exactly one literal piece, as GNU parallel's quoting promises: in an
    argument (the command runs without a shell) the value is put in as it is; in the script of a
    shell's ``-c`` (``sh -c``, ``bash -lc`` ... anywhere in the command), where a shell reads it,
    it is quoted for the quotes it stands in (none, '...' or "..."). A string goes as it is, any
    other value as its JSON text. A missing name is a ConfigError. The value goes unquoted into
    other programs' code (``python -c``, ``ssh host CMD``): pass it there as an argument."""
    missing = [name for name in command_placeholders(argv) if name not in values]
    if missing:
        raise ConfigError(f"no value for {', '.join('{' + name + '}' for name in missing)}",
                          hint="write {{ and }} for a literal brace")
    scripts = _shell_scripts(argv)
    filled = [_fill_word(word, values, index in scripts) for index, word in enumerate(argv)]
    return _check_command(filled)  # a value cannot bring a NUL character either


def check_command_sweep(argv: list[str], grid: list[dict[str, Any]]) -> None:
    """Refuse, before anything is written, a sweep of command ``argv`` over ``grid`` (one dict of
    values per job) that could not fill it: no placeholder at all (every job would run the same
    command), or a line without a value for one (named with the line's number)."""
    names = command_placeholders(argv)
    if not names:
        raise ConfigError(f"the sweep's command has no {{name}} placeholder: its {len(grid)} "
                          "jobs would all run the same command",
                          hint="e.g. -- python train.py --lr {lr}, with lines like {\"lr\": 0.1}")
    for number, line in enumerate(grid, 1):
        try:
            fill_command(argv, line)
        except ConfigError as exc:
            raise ConfigError(f"sweep line {number}: {exc}", hint=exc.hint) from None


def command_argv(params: JobParams, values: dict[str, Any] | None = None) -> list[str]:
    """The argv a command job runs: its command, or with ``values`` (a sweep job's line, from its
    kwargs) the command with its placeholders filled (fill_command)."""
    return fill_command(params.command, values) if values else list(params.command)


# ============================================================================================
# 6. templates
# ============================================================================================

def _template_class() -> Any:
    """string.Template with the delimiter ``@@`` (used by neither shell nor Python, so neither
    needs escaping); made when first rendered: a subclass compiles its pattern when made."""
    if not _TEMPLATE:
        _TEMPLATE.append(type("_Template", (string.Template,), {"delimiter": "@@"}))
    return _TEMPLATE[0]


_TEMPLATE: list[Any] = []


def render_template(template: str, **values: str) -> str:
    """Fill ``@@name`` placeholders; a missing or an unused value is an error, never a blank."""
    compiled = _template_class()(template)
    wanted = {m.group("named") or m.group("braced")
              for m in compiled.pattern.finditer(template)} - {None}
    missing, unused = sorted(wanted - set(values)), sorted(set(values) - wanted)
    if missing or unused:
        raise StackopsError(f"template values missing {missing} or unused {unused}")
    return compiled.substitute(values)


PYTHON_TEMPLATE = '''#!/usr/bin/env python3
# Generated by stackops @@version: the wrapper of one job. It needs only python3: the stackops.py
# beside it is the copy shipped with the job. run_job() holds the job's lock and its slot, runs
# execute() below in a process of its own (again after a failed run while retries allow), and
# records the end whatever happens inside, then lets the slot go.
import os
import sys

JOB_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(JOB_ROOT, "python"))
import stackops  # noqa: E402
from stackops import WorkloadParams, traceback  # noqa: E402,F401 (traceback: imported when used)


def execute(job, func_kwargs):
    """The job itself; returns (result, error_message)."""
    res = None
    error_message = ""
@@execution_line
    return res, error_message


if __name__ == "__main__":
    res = stackops.run_job(JOB_ROOT, execute)
'''


def render_execution_script(execution_line: str) -> str:
    """The Python wrapper around one execution line (see JobParams.get_execution_line)."""
    return render_template(PYTHON_TEMPLATE, version=__version__, execution_line=execution_line)


# The batch script Slurm runs on a compute node, in the folder sbatch was started in (the job's),
# so the nodes must see that folder (the cluster's shared home). Bash only finds the job's folder
# (an array task runs the folder of its index, beside the array's) and starts its wrapper.
SBATCH_TEMPLATE = r"""#!/bin/bash
#SBATCH --job-name=@@job_name
#SBATCH --output=@@output
#SBATCH --open-mode=append
@@options
# Generated by stackops @@version.
T=@@task_dir
if [ ! -f "$T/@@wrapper" ]; then
    echo "stackops: job folder $T not found in ${SLURM_SUBMIT_DIR:-?} on $(hostname)" >&2
    exit 97
fi
cd "$T" && exec @@python @@wrapper
"""


def render_sbatch_script(job_id: str, options: dict[str, str], tasks: int = 0, throttle: int = 0,
                         after: list[str] | None = None, python: str = "python3") -> str:
    """The batch script Slurm runs: the job's own wrapper with ``python``, with ``options`` as
    #SBATCH lines; with ``tasks`` it is an array whose task K runs the job folder ``{job_id}-K``
    beside this one, at most ``throttle`` at once (0: as many as Slurm allows)."""
    lines = [f"#SBATCH --{key}={value}" if value else f"#SBATCH --{key}"
             for key, value in sorted(check_slurm_options(options).items())]
    if after:  # a parent that fails makes Slurm cancel this job, never leave it pending forever
        parents = ":".join(check_safe_name(i, "slurm job") for i in after)
        lines += ["#SBATCH --dependency=afterok:" + parents, "#SBATCH --kill-on-invalid-dep=yes"]
    output, task_dir = OUTPUT_LOG, "."
    if tasks:
        lines.append(f"#SBATCH --array=0-{tasks - 1}" + (f"%{throttle}" if throttle else ""))
        sibling = f"../{check_safe_name(job_id)}-"
        output, task_dir = f"{sibling}%a/{OUTPUT_LOG}", f"{sibling}$SLURM_ARRAY_TASK_ID"
    return render_template(SBATCH_TEMPLATE, version=__version__, job_name=check_safe_name(job_id),
                           options="\n".join(lines) or "# (no sbatch options)", output=output,
                           task_dir=task_dir, wrapper=WRAPPER_PY, python=_sh_path(python))


# ============================================================================================
# 7. job folder: FileManager, its state record, liveness, slots and queue, the one judge
# ============================================================================================

def machine_key() -> str:
    """The executing machine as a folder name: host name, boot id and pid namespace. Hosts (or
    containers) sharing one home each keep their own slots and queue under it, and none judges
    pids of another (a pid means something only in its own pid namespace of one boot). Worked
    out once per process and host name (a list judges 10,000 jobs)."""
    known = (os.uname().nodename, os.getpid())
    if _MACHINE[:1] != [known]:
        _MACHINE[:] = [known, _machine_key()]
    return _MACHINE[1]


_MACHINE: list[Any] = []  # ((host name, pid), machine_key) of this process


def _machine_key() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", os.uname().nodename) or "host"
    boot = _read_text(Path("/proc/sys/kernel/random/boot_id")).strip()[:8]
    try:
        space = re.sub(r"[^0-9]", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        space = ""
    return f"{host}-{boot}-{space}"


def state_dir(pool: str = "") -> Path:
    """Where this machine's slots, queue and views live, for this user: one folder per executing
    machine (machine_key) unless STACKOPS_STATE_DIR names one; pools in ``pools/<name>``."""
    override = os.environ.get("STACKOPS_STATE_DIR")
    root = expand_home(override) if override else expand_home(DEFAULT_STATE_DIR) / machine_key()
    return root / "pools" / pool if pool else root


def gpu_ids(env: dict[str, str] | None = None) -> list[str]:
    """This machine's GPUs: ``STACKOPS_GPUS=0,1,...`` when set in ``env`` (default: this process's
    environment; it overrides), else what ``nvidia-smi`` lists, else none."""
    declared = (os.environ if env is None else env).get("STACKOPS_GPUS")
    if declared is not None:
        return [item.strip() for item in declared.split(",") if item.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True,
                                text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip().isdigit()]


class _Uninterrupted:
    """Ctrl-C waits while the block runs, and is taken right after it: for work that must be
    whole once begun (a lock held, a fire's bookkeeping, a withdrawal)."""

    def __enter__(self) -> None:
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # (as it is)
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        except BaseException:  # a Ctrl-C that came just before: taken now, the mask as it was
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            raise

    def __exit__(self, *exc: Any) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


class _FileLock:
    """An exclusive flock on a file, held while the block runs. Ctrl-C breaks off the wait for
    it, and once it is held waits until it is let go: a KeyboardInterrupt raised as it is won or
    let go would leave this process holding it, and the withdrawal that Ctrl-C starts
    (_withdraw_fire) would wait for it for ever."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, -1
        self.calm = _Uninterrupted()

    def __enter__(self) -> _FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.calm.__enter__()
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)
        self.calm.__exit__()


def _lock_kind(path: Path) -> str:
    return "slot file" if path.parent.name == "slots" else "lock file"


def _try_flock(path: str | Path, shared: bool = False, create: bool = True) -> int | None:
    """An fd holding a non-blocking flock on ``path``, or None when someone else holds it.
    ``create=False`` for files whose owner may delete them: a check must never bring one back."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o600)
    except FileNotFoundError:
        if not create:
            raise
        raise SlotError(f"cannot open {_lock_kind(Path(path))} {path}: its folder is gone") \
            from None
    except OSError as exc:
        raise SlotError(f"cannot open {_lock_kind(Path(path))} {path}: {exc.strerror or exc}",
                        hint=f"the folder {Path(path).parent} must be yours alone; for slots, "
                             "set STACKOPS_STATE_DIR to a folder of your own") from exc
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


# -- a job's state: one record, one writer, liveness held by the job -----------------------------
#
# Everything that happens to a job is written into its record, logs/state.json, by _update (read,
# change, write whole, under the record's own lock): fired, waiting, running, each attempt, the
# end. _record_end is the one way an end is recorded, and the first end wins, so whoever records it
# (the job, a cancel, a check that finds the job gone, Slurm's final word) also reports it, once.
# The job's process holds an flock on logs/alive.lock for its whole life, so "is it alive?" is a
# lock probe the kernel answers (as nq's is), and only on the machine that runs it (the record
# names it): a machine sharing the home shows the record as of when it was written.

_REMOVED = f"its state record {STATE_JSON} was removed"  # (said while its job runs: _judge)


def read_state(root: Path | str) -> dict[str, Any]:
    """A job's state record as last written (``{}`` before the job was written whole)."""
    try:  # plain strings, not Paths: list and status read 10,000 of these
        with open(f"{root}/{STATE_JSON}", encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return {"status": "failed", "error": f"its state record cannot be read: {exc}",
                "unreadable": True}
    return data if isinstance(data, dict) else {"status": "failed", "error": "state not a dict"}


def _update(root: Path, change: Callable[[dict[str, Any]], bool | None]) -> dict[str, Any]:
    """The one writer of a job's state record: under its lock, read it, let ``change`` alter it
    in place (returning False leaves it as it was), write it whole. Returns the record."""
    with _FileLock(root / STATE_LOCK):
        state = read_state(root)
        if not state or state.get("unreadable"):
            state = _afresh(root, state)
        if change(state) is not False:
            state["schema"], state["at"] = STATE_SCHEMA, _iso(_utcnow())
            _write_plain(root / STATE_JSON, json.dumps(state, ensure_ascii=False))
        return state


def _afresh(root: Path, state: dict[str, Any]) -> dict[str, Any]:
    """A record damaged or removed (``state``, read_state's), started again from what is known,
    never taken as an end: while the job's process holds its lock, it runs, and that lock's
    holder here (_lock_holder) is its process and group (what cancel stops). Else as read."""
    if not _alive(root):
        return {key: value for key, value in state.items() if key != "unreadable"}
    fresh: dict[str, Any] = {"status": "running"}
    if state:  # (damaged: why is said while it runs; a record not written yet is no news)
        fresh["warning"] = f"{state['error']}: written again"
    pid = next(iter(_lock_holders(f"{root}/{ALIVE_LOCK}")), None)
    with _suppress(OSError, ValueError, TypeError):
        if pid is not None:
            start = process_start_ticks(pid)
            fresh.update(pgid=os.getpgid(pid), pid=pid, pid_start=start, machine=machine_key(),
                         node=os.uname().nodename, started=_started_at(start))
    return fresh


def _started_at(ticks: int | None) -> str | None:
    """When a process that started ``ticks`` clock ticks after boot (/proc/stat's btime) did."""
    boot = re.search(r"^btime (\d+)$", _read_text(Path("/proc/stat")), re.M)
    if ticks is None or boot is None:
        return None
    moment = int(boot[1]) + ticks / os.sysconf("SC_CLK_TCK")
    return _iso(_dt.datetime.fromtimestamp(moment, _dt.timezone.utc))


def _lock_holders(path: str) -> list[int]:
    """The processes here that hold the flock on ``path``, first started first (of a job's: its
    wrapper, then its children and what they left running): each has a file open on it whose
    /proc fdinfo shows the lock, so it is a holder, not a number that matches. [] when none
    here does (or no /proc)."""
    try:
        lock = os.stat(path)
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        with _suppress(OSError):
            if any(_holds(f"/proc/{pid}", fd, lock) for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append((process_start_ticks(pid) or 0, int(pid)))
    return [pid for _, pid in sorted(found)]


def _holds(process: str, fd: str, lock: os.stat_result) -> bool:
    """Whether ``fd`` of ``process`` (its /proc folder) is the file ``lock`` with an exclusive
    flock on it: a job's (a reader's probe of it, _alive's, is shared: never taken for one)."""
    try:
        info = os.stat(f"{process}/fd/{fd}")
        if (info.st_ino, info.st_dev) != (lock.st_ino, lock.st_dev):
            return False
        with open(f"{process}/fdinfo/{fd}", encoding="utf-8") as handle:
            return any("FLOCK" in line and "WRITE" in line for line in handle)
    except OSError:
        return False


def _record(root: Path, **fields: Any) -> dict[str, Any]:
    """Set ``fields`` in the job's record (see _update)."""
    return _update(root, lambda state: state.update(fields))


def _record_end(root: Path, status: str, error: str = "", final: bool = True,
                **fields: Any) -> dict[str, Any] | None:
    """Record the job's end, unless one is recorded (a tentative one, ``final=False``: a Slurm run
    stopped by SIGTERM that Slurm may start again, can still change). A failure after a cancel
    was asked for is the cancel. Returns the record when this call recorded the end: its caller
    then reports it (_report_end), so every end is reported once."""
    recorded: list[bool] = []

    def end(state: dict[str, Any]) -> bool:
        if state.get("status") in TERMINAL_STATUSES and state.get("final", True):
            return False
        cancelled = status == "failed" and state.get("cancel")
        if state.get("slurm") and "slurm" not in fields:  # Slurm's word of before no longer holds
            state["slurm"] = {key: value for key, value in state["slurm"].items()
                              if key not in ("state", "reason")}
        if "reason" not in fields:
            state.pop("reason", None)  # why it waited or how it ran is not why it ended
        state.update(fields, status="cancelled" if cancelled else status,
                     error=f"cancelled ({state['cancel']})" if cancelled else error,
                     ended=fields.get("ended") or _iso(_utcnow()), final=final)
        recorded.append(True)
        return True

    state = _update(root, end)
    return state if recorded else None


def _ended(state: dict[str, Any]) -> bool:
    """Whether a state record holds the job's end for good (not a tentative Slurm one)."""
    return state.get("status") in TERMINAL_STATUSES and state.get("final", True)


def _alive(root: Path | str) -> bool:
    """Whether the job's process lives: it holds ALIVE_LOCK from before it starts until its last
    process ends, however it ends. Meaningful only on the machine that runs the job."""
    try:
        fd = _try_flock(f"{root}/{ALIVE_LOCK}", shared=True, create=False)
    except FileNotFoundError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def _hold_alive(root: Path) -> int:
    """Hold the job's ALIVE_LOCK (the fd the starter handed over, or taken now); a job that
    another live process runs already is refused."""
    handed = os.environ.pop("STACKOPS_ALIVE_FD", "")
    if handed.isdigit():
        os.set_inheritable(int(handed), False)
        return int(handed)
    fd = _try_flock(root / ALIVE_LOCK)
    if fd is None:
        raise SlotError(f"job {root.name} runs already (another process holds {ALIVE_LOCK})")
    return fd


def _mtime_ns(path: str | Path) -> int:
    """The mtime of ``path`` while it stands for its contents (-1: missing, or changed within
    the racy window, when a later change may leave it as it is)."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return -1
    return -1 if time.time_ns() - mtime < RACY_NS else mtime


_PLACES: dict[str, tuple[int, dict[str, int]]] = {}  # a queue's listing, while it is unchanged


def _place_in(queue: str, entry: str) -> int | None:
    """The place of ``entry`` in the queue folder ``queue`` (see Slots.place_of)."""
    places = _listing(queue)
    return places[entry] if entry in places else _listing(queue, fresh=True).get(entry)


def _listing(queue: str, fresh: bool = False) -> dict[str, int]:
    """The entries of the queue folder ``queue`` and their places (1 first), listed again only
    when the folder changed since (or ``fresh``); {} when it is gone."""
    version = _mtime_ns(queue)
    cached = _PLACES.get(queue)
    if cached is None or cached[0] != version or version < 0 or fresh:
        try:
            names = sorted(name for name in os.listdir(queue) if not name.startswith("."))
        except OSError:
            return {}
        cached = _PLACES[queue] = (version, {name: place for place, name in enumerate(names, 1)})
    return cached[1]


_DETACHED: list[subprocess.Popen[bytes]] = []  # processes started here, kept until they end
_HOLDING: list[int] = []  # the wrapper's hold on its job's ALIVE_LOCK (a command inherits it)


class Slots:
    """The slots and the queue of one machine and user, held by the kernel, not by JSON.

    A slot is an flock on ``slots/slot-<i>.lock``: a job holds it while it runs, and a holder
    killed with SIGKILL frees it with nobody cleaning up. A job waits in ``queue/`` as data: an
    entry named ``<fire time in ns>-<job_id>`` that holds its folder's path, written by its fire.
    The queue's one dispatcher (run_dispatcher: a small process that lives only while the queue
    has entries or jobs it started run) takes a free slot for the first entry and starts the job
    holding it (the lock's file descriptor is inherited); so jobs start in the order they were
    fired, and a queue of any length costs files, not processes. A job that waits in person
    (interactive, in tmux) flocks its own entry and takes its slot itself when first. Jobs that
    wait for their parents (``after``) have their entries in ``after/`` until the dispatcher moves
    them to the end of the queue. ``*_jobs.json`` are views for people, rewritten atomically.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()
        self.queue, self.slots = self.root / "queue", self.root / "slots"

    def _ensure(self) -> None:
        for folder in (self.root, self.queue, self.slots, self.root / AFTER_DIR):
            _trusted_dir(folder, "state folder")

    def entries(self, folder: str = "queue") -> list[str]:
        try:
            names = os.listdir(self.root / folder)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if not name.startswith("."))

    def _starting(self) -> list[str]:
        """The entries a dispatcher took out of the line to start their jobs (_take_entry)."""
        with _suppress(FileNotFoundError):
            return [name for name in os.listdir(self.queue) if name.startswith(STARTING)]
        return []

    def entry_state(self, name: str, folder: str = "queue") -> str:
        """``waiting`` (its own wrapper holds it: an interactive job waits in person), ``queued``
        (data: the dispatcher starts it) or ``stale`` (its job went, ended, was cancelled or
        started)."""
        path = self.root / folder / name
        try:
            fd = _try_flock(path, shared=True, create=False)
        except FileNotFoundError:  # its job took a slot meanwhile
            return "stale"
        if fd is None:
            return "waiting"
        try:
            text = os.read(fd, 65536).decode("utf-8", "surrogateescape")
        finally:
            os.close(fd)
        root = Path(text) if text else None
        if root is None or not (root / FILE_MANAGER_JSON).exists():
            return "stale"
        state = read_state(root)
        if state.get("cancel") or state.get("status") in TERMINAL_STATUSES or _alive(root):
            return "stale"
        return "queued"

    def dispatcher_pid(self) -> int | None:
        """The pid of this queue's live dispatcher (it holds DISPATCHER_LOCK), or None."""
        try:
            fd = _try_flock(self.root / DISPATCHER_LOCK, shared=True, create=False)
        except FileNotFoundError:
            return None
        if fd is not None:
            os.close(fd)
            return None
        pid = _read_text(self.root / DISPATCHER_PID).split()[:1]
        return int(pid[0]) if pid and pid[0].isdigit() else 0

    def ensure_dispatcher(self, python: str | None = None, view: bool = False) -> int | None:
        """Start this queue's dispatcher unless one lives or nothing is queued; returns its pid.
        Any stackops call that finds a queued job does this, so no entry waits forever because
        the process that would have started it died. A ``view`` (status, list, queue: asked
        again and again by a wait) leaves one it started, still starting, to start."""
        pid = self.dispatcher_pid()
        if pid is None and (self.entries() or self.entries(AFTER_DIR) or self._starting()):
            _detached(None)
            mine = [kept.pid for kept in _DETACHED if str(self.root) in getattr(kept, "args", ())]
            if view and mine:
                return mine[0]
            pid = _start_detached(_serve_argv(python or sys.executable or "python3", "dispatch",
                                              str(self.root), site=True),
                                  self.root / DISPATCHER_LOG)
        return pid

    def wait_for_slot(self, entry: str, job_root: Path, max_jobs: int, on_start: Callable[[], None],
                      names: list[str] | None = None, need: int = 1
                      ) -> tuple[list[tuple[str, int]], _dt.datetime]:
        """Wait in line under ``entry``, then take a free slot among the first ``max_jobs`` (or
        ``need`` of the slots ``names`` at once: a job's GPUs). Returns ([(slot, fd holding it)],
        when they were taken); ``on_start`` runs once the entry is ours. The time is taken before
        the entry goes, so start times follow queue order."""
        self._ensure()
        path = self.queue / entry
        if not path.exists():
            _write_plain(path, str(job_root))
        entry_fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(entry_fd, fcntl.LOCK_EX)
            on_start()
            look = 0.0
            while True:
                ahead = [name for name in self.entries() if name < entry]
                state = self.entry_state(ahead[0]) if ahead else ""
                if state == "stale":
                    with _suppress(FileNotFoundError):
                        os.unlink(self.queue / ahead[0])
                    continue
                if state == "queued" and time.monotonic() > look:  # data ahead: a dispatcher lives
                    look = time.monotonic() + 1.0
                    self.ensure_dispatcher(view=True)
                # the next in line looks as often as the first, so a freed slot passes on fast
                if ahead:
                    time.sleep(SLOT_POLL_HEAD if len(ahead) == 1 else SLOT_POLL_OTHERS)
                    continue
                held = self._take(names or [f"slot-{index}" for index in range(max_jobs)], need)
                if held:
                    taken = _utcnow()
                    with _suppress(FileNotFoundError):
                        os.unlink(path)
                    return held, taken
                time.sleep(SLOT_POLL_HEAD)
        finally:
            os.close(entry_fd)

    def _take(self, names: list[str], need: int) -> list[tuple[str, int]]:
        """``need`` of the slots ``names`` locked at once, or none (what was taken is let go)."""
        held: list[tuple[str, int]] = []
        for name in names:
            fd = _try_flock(self.slots / f"{name}.lock")
            if fd is not None:
                held.append((name, fd))
                if len(held) == need:
                    return held
        for _, fd in held:
            os.close(fd)
        return []

    def place_of(self, entry: str) -> int | None:
        """The place of ``entry`` in the queue (1: next), or None when it is not in it. The queue's
        listing is read once per change of the folder, so the places of all its jobs cost one."""
        return _place_in(str(self.queue), entry)

    def holders(self) -> list[dict[str, Any]]:
        """The jobs holding a slot now (an unheld slot lock is free, whatever the JSON says)."""
        found = []
        for lock in sorted(self.slots.glob("*.lock"), key=lambda p: (len(p.stem), p.stem)):
            fd = _try_flock(lock)
            if fd is not None:
                os.close(fd)
                continue
            info = lock.with_suffix(".json")
            try:
                holder = json.loads(info.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {"job_id": "?", "note": "slot held; its record is being written"}
            holder["slot"] = lock.stem
            found.append(holder)
        return found

    def waiters(self, checked: int = 20) -> list[dict[str, Any]]:
        """The queue in order, then the jobs that wait for their parents (place None). Read from
        the entries' names alone, so a queue of 10,000 costs one listing: only the first
        ``checked`` are looked at (entry_state), and those found stale are left out."""
        result: list[dict[str, Any]] = []
        for index, name in enumerate(self.entries()):
            state = self.entry_state(name) if index < checked else "queued"
            if state != "stale":
                result.append(self._waiter(name, len(result) + 1, state))
        result += [self._waiter(name, None, "after") for name in self.entries(AFTER_DIR)]
        return result

    @staticmethod
    def _waiter(name: str, place: int | None, state: str) -> dict[str, Any]:
        ticket, _, job_id = name.partition("-")
        since = None
        if ticket.isdigit():  # as _iso writes it, at a tenth of the cost (a queue has 10,000)
            seconds, nanoseconds = divmod(int(ticket), 10**9)
            since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            since += f".{nanoseconds // 1000:06d}+00:00"
        return {"place": place, "job_id": job_id, "state": state, "queued_since": since}

    def history(self) -> list[dict[str, Any]]:
        try:
            data = _read_json(self.root / HISTORY_VIEW)
        except StackopsError:
            return []
        return data if isinstance(data, list) else []

    def refresh_views(self, finished: dict[str, Any] | None = None, queue: bool = True) -> None:
        """Rewrite the JSON views from the truth; append ``finished`` to the history. The view of
        the queue (``queue``) is the dispatcher's to keep (at most once a second), as it grows
        with the queue."""
        self._ensure()
        with _FileLock(self.root / "state.lock"):
            _write_plain(self.root / RUNNING_VIEW, _json_lines(self.holders()))
            if queue:
                _write_plain(self.root / QUEUED_VIEW, _json_lines(self.waiters()))
            if finished is not None:
                history = (self.history() + [finished])[-HISTORY_KEEP:]
                _write_plain(self.root / HISTORY_VIEW, _json_lines(history))


# -- logind: would the host kill a detached job when the user logs out? ----------------------------
# With KillUserProcesses=yes, systemd-logind ends every process of a login session's scope when the
# session ends: setsid and nohup do not leave the scope, so a job fired over SSH dies with the
# connection. A scope of the user's own service manager (systemd-run --user --scope) is outside
# the session, but that manager stops at the user's last logout unless lingering is on. Probed on
# the executing machine, with the standard library only.

LOGIND_MARKER = "/run/systemd/system"  # exists when systemd is the init system (sd_booted)
LOGIND_CONF_DIRS = ("/etc/systemd", "/run/systemd", "/usr/local/lib/systemd", "/usr/lib/systemd")
LINGER_DIR = "/var/lib/systemd/linger"


def _probe_output(argv: list[str], timeout: float) -> str | None:
    """What ``argv`` prints when it runs and exits 0 within ``timeout`` seconds, else None."""
    try:
        done = _run_bounded(argv, timeout)
    except StackopsError:  # missing, or stopped at the timeout
        return None
    return done.stdout if done.returncode == 0 else None


def _logind_properties(text: str) -> dict[str, str]:
    """``Key=value`` lines (loginctl show-*, a [Login] section) as a dict."""
    pairs = (line.strip().partition("=") for line in text.splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep and key[:1] != "#"}


def _logind_conf(conf_dirs: tuple[str, ...]) -> dict[str, str]:
    """logind's settings from its files: ``logind.conf`` in the first of ``conf_dirs`` that has
    one, then the ``logind.conf.d/*.conf`` drop-ins by file name (the same name in an earlier
    folder hides a later one), the last setting winning, as logind reads them."""
    import glob

    settings: dict[str, str] = {}
    mains = [os.path.join(d, "logind.conf") for d in conf_dirs]
    drop_ins: dict[str, str] = {}
    for folder in reversed(conf_dirs):
        for path in glob.glob(os.path.join(folder, "logind.conf.d", "*.conf")):
            drop_ins[os.path.basename(path)] = path
    main = [path for path in mains if os.path.isfile(path)][:1]
    for path in main + [drop_ins[name] for name in sorted(drop_ins)]:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                section = handle.read().partition("[Login]")[2].split("\n[", 1)[0]
        except OSError:
            continue
        settings.update(_logind_properties(section))
    return settings


def _kills_user(settings: dict[str, str], user: str) -> bool:
    """Whether logind ``settings`` (KillUserProcesses, KillOnlyUsers, KillExcludeUsers) end the
    processes of ``user``'s sessions at logout."""
    yes = settings.get("KillUserProcesses", "no").lower() in ("yes", "true", "1", "on")
    only = settings.get("KillOnlyUsers", "").split()
    excluded = settings.get("KillExcludeUsers", "root").split()
    return yes and user not in excluded and (not only or user in only)


def _logind_probe(user: str | None = None, marker: str = LOGIND_MARKER,
                  conf_dirs: tuple[str, ...] = LOGIND_CONF_DIRS, linger_dir: str = LINGER_DIR,
                  timeout: float = 5.0) -> dict[str, Any]:
    """Whether a job started detached here by ``user`` (default: this process's) would be killed
    when that user logs out, and what stackops can do about it. Returns: ``systemd`` (init is
    systemd: ``marker`` exists), ``kill_user_processes`` (logind ends the user's session scopes
    at logout: ``loginctl show-session``, else the config files), ``linger``, ``scope``
    (``systemd-run --user --scope`` works; tried only when it matters), ``wrap`` (start the
    launcher in such a scope: _in_user_scope), ``kill_at_logout`` (the job, so started, still
    dies at the user's logout) and ``fix`` (what the user can do, "" when nothing is needed)."""
    import pwd

    user = user or pwd.getpwuid(os.getuid()).pw_name
    found: dict[str, Any] = {"user": user, "systemd": os.path.isdir(marker),
                             "kill_user_processes": False, "linger": False, "scope": False,
                             "wrap": False, "kill_at_logout": False, "fix": ""}
    if not found["systemd"]:
        return found
    names = ["KillUserProcesses", "KillOnlyUsers", "KillExcludeUsers"]
    shown = _probe_output(["loginctl", "show-session", *[f"-p{name}" for name in names]], timeout)
    settings = _logind_properties(shown) if shown is not None else _logind_conf(conf_dirs)
    found["kill_user_processes"] = _kills_user(settings, user)
    shown = _probe_output(["loginctl", "show-user", user, "-pLinger"], timeout)
    found["linger"] = (_logind_properties(shown).get("Linger") == "yes" if shown is not None
                       else os.path.exists(os.path.join(linger_dir, user)))
    if not found["kill_user_processes"]:
        return found
    scope = ["systemd-run", "--user", "--scope", "--quiet", "true"]
    found["scope"] = found["wrap"] = _probe_output(scope, timeout) is not None
    found["kill_at_logout"] = not (found["scope"] and found["linger"])
    if not found["linger"]:
        found["fix"] = f"loginctl enable-linger {user}"
    elif not found["scope"]:
        found["fix"] = (f"ask the administrator to add {user} to KillExcludeUsers in "
                        "/etc/systemd/logind.conf")
    return found


def _in_user_scope(argv: list[str], probe: dict[str, Any]) -> list[str]:
    """``argv`` started in a scope of the user's service manager when ``probe`` (_logind_probe)
    says so, out of the login session that logind would end at logout; else ``argv`` itself.
    systemd-run --scope runs the program itself (same pid), so nothing else changes."""
    if not probe.get("wrap"):
        return list(argv)
    return ["systemd-run", "--user", "--scope", "--quiet", "--", *argv]


_LOGIND: list[dict[str, Any]] = []  # this machine's _logind_probe, once per process


def _logind() -> dict[str, Any]:
    """This machine's answer to _logind_probe, asked once (and only where systemd is init)."""
    if not _LOGIND:
        _LOGIND.append(_logind_probe(marker=LOGIND_MARKER) if os.path.isdir(LOGIND_MARKER)
                       else {"kill_at_logout": False, "wrap": False, "fix": ""})
    return _LOGIND[0]


def _start_detached(argv: list[str], output: Path, env: dict[str, str] | None = None,
                    cwd: Path | None = None, fds: tuple[int, ...] = ()) -> int:
    """Start ``argv`` in a session of its own (it outlives us and our terminal), output appended
    to ``output``, keeping ``fds`` open in it, and out of the login session where logind would
    end it at logout (_logind); returns its pid."""
    with _private_append(output) as out:
        child = subprocess.Popen(_in_user_scope(argv, _logind()), stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=env, cwd=str(cwd) if cwd else None, pass_fds=fds)
    _detached(child)
    return child.pid


def _detached(child: Any) -> None:
    """Keep ``child`` (None: none), started here and never waited for, and reap those kept that
    ended: a process that starts thousands of jobs (a notebook, a dispatcher) gathers no zombies."""
    _DETACHED[:] = [kept for kept in _DETACHED if kept.poll() is None]
    if child is not None:
        _DETACHED.append(child)


def tmux_session_name(job_id: str) -> str:
    """The tmux session of an interactive job: its id with '.' (which tmux refuses) as ',' (which
    no job id holds), so that two ids never share a session (``a.b`` and ``a_b`` stay apart)."""
    return check_safe_name(job_id).replace(".", ",")


class FileManager:
    """The layout of one job folder ``{base_dir}/queued/{job_id}/`` and its slot on the machine."""

    def __init__(self, job_id: str, remote_machine_type: str = "Linux", lock_resources: bool = True,
                 max_simultaneous_jobs: int = 1, base: str | None = None,
                 submission_time: _dt.datetime | None = None, pool: str = "",
                 gpus: int = 0) -> None:
        self.job_id = check_safe_name(job_id)
        if remote_machine_type not in MACHINE_TYPES:
            raise ConfigError(f"remote_machine_type {remote_machine_type!r} is not supported "
                              "(Linux only)")
        if not isinstance(max_simultaneous_jobs, int) or isinstance(max_simultaneous_jobs, bool) \
                or max_simultaneous_jobs < 1:
            raise ConfigError("max_simultaneous_jobs must be at least 1, got "
                              f"{max_simultaneous_jobs!r}")
        self.remote_machine_type = remote_machine_type
        self.lock_resources = bool(lock_resources)
        self.max_simultaneous_jobs = max_simultaneous_jobs
        self.base_dir = collapse_home(base or DEFAULT_BASE_DIR)
        self.submission_time = submission_time or _utcnow()
        self.job_root_rh = f"{self.base_dir.rstrip('/')}/queued/{job_id}"
        self.job_root = expand_home(self.job_root_rh)
        # the slot pool ("" the machine's) and how many GPUs it takes
        self.pool, self.gpus = pool, gpus
        self._slot: list[tuple[str, int]] | None = None
        self.admitted_at: _dt.datetime | None = None  # when this process got its slot
        self.state_dir: str | None = None  # absolute, fixed at submit; None: the machine's own
        self.python = "python3"  # the interpreter that runs the job where it runs

    def __repr__(self) -> str:
        return f"FileManager({self.job_id!r}, job_root={self.job_root_rh!r})"

    def path(self, relative: str) -> Path:
        return self.job_root / relative

    py_script_path = property(lambda self: self.path(WRAPPER_PY))
    kwargs_path = property(lambda self: self.path(KWARGS_JSON))
    file_manager_path = property(lambda self: self.path(FILE_MANAGER_JSON))
    remote_machine_path = property(lambda self: self.path(REMOTE_MACHINE_JSON))
    remote_machine_config_path = property(lambda self: self.path(CONFIG_JSON))
    execution_log_dir = property(lambda self: self.path(LOGS))

    def to_dict(self) -> dict[str, Any]:
        return {"remote_machine_type": self.remote_machine_type, "job_id": self.job_id,
                "max_simultaneous_jobs": self.max_simultaneous_jobs,
                "lock_resources": self.lock_resources,
                "submission_time": _iso(self.submission_time), "base_dir": self.base_dir,
                "pool": self.pool, "gpus": self.gpus, "state_dir": self.state_dir,
                "python": self.python}

    @classmethod
    def from_dict(cls, data: Any, job_root: Path | None = None) -> FileManager:
        if not isinstance(data, dict) or not isinstance(data.get("job_id"), str):
            raise ConfigError("file_manager.json: expected an object with a job_id")
        manager = cls(data["job_id"], data.get("remote_machine_type", "Linux"),
                      data.get("lock_resources", True), data.get("max_simultaneous_jobs", 1),
                      data.get("base_dir"), _parse_iso(data.get("submission_time")),
                      data.get("pool", ""), data.get("gpus", 0))
        if job_root is not None:  # the folder is where it is, wherever it was made
            manager.job_root = job_root
        if isinstance(data.get("state_dir"), str) and os.path.isabs(data["state_dir"]):
            manager.state_dir = data["state_dir"]
        manager.python = str(data.get("python") or "python3")
        return manager

    @classmethod
    def from_job_root(cls, job_root: str | os.PathLike[str]) -> FileManager:
        root = Path(job_root)
        return cls.from_dict(_read_json(root / FILE_MANAGER_JSON), job_root=root)

    def slots(self) -> Slots:
        """The slots and queue of this job: the state folder fixed at submit, else the machine's
        (its pool's folder inside, if it names a pool)."""
        if not self.state_dir:
            return Slots(state_dir(self.pool))
        base = Path(self.state_dir)
        return Slots(base / "pools" / self.pool if self.pool else base)

    # -- on the executing machine --------------------------------------------------------------

    def secure_resources(self) -> bool:
        """Hold this job's slot: the one its dispatcher handed this process, else wait in line for
        one (a job waiting in person: interactive, or started by hand). A job that takes no slot
        is admitted at once."""
        if not self.lock_resources:
            self.admitted_at = _utcnow()
            return True
        slots = self.slots()
        adopted = self._adopt_slots()
        if not adopted:
            self._wait_in_person(slots)
        elif not self.gpus:  # its dispatcher wrote the slot's record, the same as this one
            return True
        holder = {"job_id": self.job_id, "job_root": str(self.job_root), "pid": os.getpid(),
                  "submission_time": _iso(self.submission_time),
                  "start_time": _iso(self.admitted_at)}
        if self.gpus:
            held = [name[4:] for name, _ in self._slot or []]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(held)  # the job's code sees its GPUs only
            holder["gpus"] = held
        for name, _ in self._slot or []:
            _write_plain(slots.slots / f"{name}.json", json.dumps(holder))
        return True

    @property
    def slot_names(self) -> list[str]:
        return [name for name, _ in self._slot or []]

    def _adopt_slots(self) -> bool:
        """Take over the slots the dispatcher handed this process (their locks' inherited file
        descriptors, named in the environment, which the job's own code does not see)."""
        fds = os.environ.pop("STACKOPS_SLOT_FDS", None)
        names = os.environ.pop("STACKOPS_SLOT_NAMES", "").split()
        admitted = _parse_iso(os.environ.pop("STACKOPS_ADMITTED", ""))
        if fds is None:
            return False
        numbers = [int(fd) for fd in fds.split() if fd.isdigit()]
        if not numbers or len(numbers) != len(names):
            raise SlotError(f"job {self.job_id}: the slots handed over are unreadable "
                            f"({fds!r}, {names!r})")
        for fd in numbers:
            os.set_inheritable(fd, False)  # the job's own children never hold the slot
        self._slot = list(zip(names, numbers))
        self.admitted_at = admitted or _utcnow()
        return True

    def _wait_in_person(self, slots: Slots) -> None:
        """Wait in line under this job's entry, then take a slot (Slots.wait_for_slot)."""
        state = read_state(self.job_root)
        entry = os.path.basename(state.get("entry") or "")
        if not entry.startswith(tuple("0123456789")):
            entry = f"{time.time_ns():019d}-{self.job_id}"
        gpus = gpu_ids() if self.gpus else []
        if len(gpus) < self.gpus:
            raise SlotError(f"job {self.job_id} needs {self.gpus} GPU(s) and this machine has "
                            f"{len(gpus)}")

        def started() -> None:
            _record(self.job_root, status="waiting", entry=str(slots.queue / entry),
                    machine=machine_key(), node=os.uname().nodename, pid=os.getpid(),
                    pgid=os.getpgrp())

        names = [f"gpu-{gpu}" for gpu in gpus] if self.gpus else None
        self._slot, self.admitted_at = slots.wait_for_slot(entry, self.job_root,
                                                           self.max_simultaneous_jobs,
                                                           started, names, max(1, self.gpus))

    def unlock_resources(self, record: dict[str, Any] | None = None,
                         keep_slot: bool = False) -> None:
        """Give the slot back and add ``record`` to the machine's history. ``keep_slot``: the
        process lives on (an interactive job's REPL, with the job's memory), so it keeps holding
        its slot until it exits, when the kernel frees it."""
        if self._slot is None:
            return
        held, self._slot = self._slot, None
        slots = self.slots()
        for name, fd in held:
            info = slots.slots / f"{name}.json"
            if keep_slot:  # the fds stay open: the REPL holds the slot until it exits
                with _suppress(OSError, ValueError):
                    holder = json.loads(info.read_text(encoding="utf-8"))
                    holder["note"] = ("finished; its interactive session holds the slot until it "
                                      "ends")
                    _write_plain(info, json.dumps(holder))
                continue
            with _suppress(FileNotFoundError):
                os.unlink(info)
            fcntl.flock(fd, fcntl.LOCK_UN)  # for every copy: a process the job left behind
            os.close(fd)  # (`cmd &`, a fork) holds one, and the slot is free all the same
        with _suppress(OSError, StackopsError):
            slots.refresh_views(finished=record, queue=False)

    # -- status ----------------------------------------------------------------------------------

    def get_job_status(self) -> str:
        """prepared, queued, waiting, running, completed, failed or cancelled: the job's record,
        judged on the machine that runs it (see _judge)."""
        return judge_jobs([self.job_root])[0].get("status") or "prepared"

    def status_report(self, log_lines: int = 20) -> JobStatus:
        """Everything about the job in one call: status, pid, times, results, error, log tail."""
        if not self.path(FILE_MANAGER_JSON).exists():
            raise StackopsError(f"no job folder at {self.job_root}")
        return job_reports([self.job_root], log_lines)[0]


def _shared_of(root: Path) -> Path | None:
    """The shared folder (a sweep's or an array's) the member in ``root`` links its code to."""
    with _suppress(OSError, IndexError):
        return root.parent / os.readlink(root / "python").split("/")[1]
    return None


def _gone(root: Path, shared: Path | None = None) -> str:
    """Why a job whose folder, or the record in it, is gone cannot be read as a job: how it
    ended went with it (or, while its process holds its lock, that it still runs). ``shared``:
    the folder of the sweep it is a member of (a folder there linked to no such one is not it)."""
    if os.path.isfile(root / FILE_MANAGER_JSON) and not os.path.islink(root) \
            and shared in (None, _shared_of(root)):
        how = f"its process still runs ({_prog()} cancel {root.name} stops it)" if _alive(root) \
            else "how it ended is not known"
        return f"{_record_missing(root)}: {how}"
    if os.path.lexists(root):
        return (f"its folder was removed (by hand?), and {collapse_home(root)} is another's: "
                "how it ended is not known")
    return f"no job folder at {collapse_home(root)} (removed?): how it ended is not known"


def _record_missing(root: Path) -> str:
    return (f"no job record at {collapse_home(root / REMOTE_MACHINE_JSON)} (removed?), though its "
            "folder is there")


def _judge(root: Path | str, state: dict[str, Any] | None = None,
           slurm: dict[str, Any] | None | bool = False,
           listed: frozenset[str] = frozenset(), here: str = "") -> dict[str, Any]:
    """The job's state now: the one place that decides it. An end stands. A job under Slurm is
    what Slurm says (``slurm``: its view from _slurm_views; False: not asked) combined with its
    record. Otherwise only the machine that runs the job judges it: on any other (a shared home)
    the record is shown as of when it was written. There, a job in line waits; a job whose
    process holds its lock runs; one whose process is gone without an end failed, and that end is
    recorded (and reported) here. An array is its tasks (each judged as a job; see _combine):
    its own record is never judged. ``listed``: entries found in line by a listing made after
    the record was read (one seen there waits, or runs if its process lives); ``here``: this
    machine's key, when worked out already."""
    state = read_state(root) if state is None else state
    if (not state or state.get("unreadable")) and _alive(root):  # damaged or removed: it lives
        return dict(state, status="running", error="", reason=state.get("error") or _REMOVED)
    status = state.get("status") or "prepared"
    if status in TERMINAL_STATUSES and state.get("final", True) or state.get("tasks"):
        return state
    if status not in STATUSES:
        ended = _record_end(Path(root), "failed", f"unreadable status {status!r} in {STATE_JSON}")
        return ended or read_state(root)
    if state.get("slurm"):
        return state if slurm is False else _judge_slurm(Path(root), state, slurm)
    if status == "prepared" or not state.get("machine"):
        return state
    if state["machine"] != (here or machine_key()):
        return dict(state, as_of=state.get("at"))
    entry = state.get("entry") or ""
    if entry in listed:  # in line, so not started: the dispatcher takes a job out of the line
        return state     # before it starts it (a job in line in person waits too)
    root = Path(root)  # (list and status hand 10,000 folders over as text: a Path from here on)
    in_line = bool(entry) and os.path.exists(entry)
    if _alive(root):  # its process holds its lock (and, unless it waits in line in person, a slot)
        if status == "waiting" and in_line and _waits_in_person(Path(entry)):
            return state
        return dict(state, status="running") if status in ("queued", "waiting") else state
    if in_line or entry and _in_line_elsewhere(entry, root.name):
        return state  # in line: for a slot, or for the jobs it runs after
    starting = _parse_iso(state.get("starting"))
    if starting is not None and (_utcnow() - starting).total_seconds() < STARTING_GRACE:
        return state
    fresh = read_state(root)  # it may have ended (or started) meanwhile
    if fresh.get("at") != state.get("at") or _alive(root):
        return _judge(root, fresh, slurm)
    if not state.get("pid") and state.get("entry") \
            and Slots(Path(state["entry"]).parent.parent).dispatcher_pid():
        return state  # its dispatcher started it: it records the end of a wrapper that failed
    how = _zombie_exit(state.get("pid"), state.get("pid_start"))  # its parent has not reaped it
    ended = _record_end(root, "failed", f"process gone: the job's wrapper ended ({how}) without "
                                        "recording the job's end" if how else
                        "process gone: the job's process ended without recording its end "
                        "(killed, or out of memory?)")
    if ended is None:
        return read_state(root)
    _report_end(root, ended, inline=False)
    return ended


def _in_line_elsewhere(entry: str, job_id: str) -> bool:
    """Whether the job is in line under another name than ``entry``, the one its record names:
    taken out of the line to be started (STARTING; the next dispatcher puts it back, see
    _take_entry), or moved from after/ to the queue before the move was recorded (see
    _Dispatcher._in_line), each by a dispatcher that may have died since."""
    folder, _, name = entry.rpartition("/")
    if os.path.exists(f"{folder}/{STARTING}{name}"):
        return True
    state_dir = folder.rpartition("/")[0]
    return any(other[20:] == job_id for line in ("queue", AFTER_DIR)
               for other in _listing(f"{state_dir}/{line}", fresh=True))


def _waits_in_person(entry: Path) -> bool:
    """Whether a queue entry is held by its own waiting wrapper (an interactive job in line)."""
    try:
        fd = _try_flock(entry, shared=True, create=False)
    except FileNotFoundError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def _judge_slurm(root: Path, state: dict[str, Any], view: dict[str, Any] | None) -> dict[str, Any]:
    """A Slurm job: its record (the job writes its start and end) beside Slurm's ``view`` of it
    (None: Slurm no longer knows it). Pending or requeued reads queued (a tentative end of a run
    that Slurm starts again is set aside as an earlier run); Slurm's final word is recorded in the
    folder the first time it is seen, so it stays once Slurm forgets the job."""
    slurm = dict(state.get("slurm") or {})
    status = state.get("status") or "queued"
    if view is None:  # forgotten (MinJobAge) or never known: what the folder says stands
        if status in TERMINAL_STATUSES:
            return _settle_slurm_end(root, state, status, state.get("error") or "")
        started = state.get("started") is not None
        why = ("lost by Slurm: it no longer knows job " + str(slurm.get("id")) +
               ", which recorded no end" if started else
               f"the job never started: do the compute nodes see {root}?")
        return _settle_slurm_end(root, state, "failed", why)
    slurm.update(state=view["state"], reason=view.get("reason", ""), exit=view.get("exit", ""),
                 restarts=view.get("restarts", 0))
    why = _slurm_words(slurm)
    word = view["state"]
    if word in SLURM_WAITING:
        return _slurm_again(root, state, slurm)
    if word in SLURM_RUNNING:  # after a tentative end: ending (COMPLETING), or run again, whose
        shown = {key: value for key, value in state.items()  # start the job records itself
                 if key not in ("ended", "error", "exit_code", "signal", "final")}
        return dict(shown, status="running" if state.get("started") else "queued", reason=why,
                    slurm=slurm)
    if word.startswith("CANCELLED"):
        return _settle_slurm_end(root, dict(state, slurm=slurm), "cancelled", f"cancelled ({why})",
                                 reason=why)
    if word == "COMPLETED" and status in TERMINAL_STATUSES:
        return _settle_slurm_end(root, dict(state, slurm=slurm), status, state.get("error") or "",
                                 reason=why)
    if word == "COMPLETED":
        why = f"the job recorded no end though {why}; do the compute nodes see {root}?"
    elif not state.get("started"):  # (again: Slurm requeued a run, then failed the job)
        why += f"; the job never started{' again' if state.get('runs') else ''}: do the compute " \
               f"nodes see {root}?"
        if view.get("exit", "").startswith("127"):
            why += " (exit code 127: is its python installed there?)"
    error = f"{state['error']}\n{why}" if state.get("error") else why
    return _settle_slurm_end(root, dict(state, slurm=slurm), "failed", error, reason=why)


def _slurm_again(root: Path, state: dict[str, Any], slurm: dict[str, Any]) -> dict[str, Any]:
    """Slurm will run the job (again, after a run that ended tentatively: that run is kept
    among the earlier ones): it reads queued (requeued, with the attempt). A record that says
    so already is not written again (status of an array of 1,000 pending tasks writes none)."""
    if state.get("status") == "queued" and state.get("slurm") == slurm \
            and state.get("reason") == _slurm_words(slurm):
        return state

    def again(record: dict[str, Any]) -> bool:
        status = record.get("status")
        if status in TERMINAL_STATUSES and record.get("final", True):
            return False
        restarts = int(slurm.get("restarts") or 0)
        if status == "running" and restarts <= int((record.get("slurm") or {}).get("restarts")
                                                   or 0):
            return False  # it started after Slurm was asked
        if status in TERMINAL_STATUSES or status == "running":  # a run Slurm stopped (requeued)
            run = _run_of(record)
            record.setdefault("runs", []).append(
                run if status != "running" else dict(run, status="requeued",
                                                     error=f"requeued by Slurm ({restarts}x)"))
            for key in ("started", "ended", "error", "exit_code", "signal", "final"):
                record.pop(key, None)  # kept in runs; the next run records its own
        record.update(status="queued", slurm=slurm, reason=_slurm_words(slurm))
        return True

    return _update(root, again)


def _settle_slurm_end(root: Path, state: dict[str, Any], status: str, error: str,
                      reason: str = "") -> dict[str, Any]:
    """Record Slurm's final word on a job (once; it is reported then), and return the record."""
    slurm = state.get("slurm") or {}
    ended = _record_end(root, status, error, slurm=slurm, reason=reason, ended=state.get("ended"))
    if ended is not None:
        _report_end(root, ended, inline=False)
        return ended
    return read_state(root)


def _slurm_words(slurm: dict[str, Any]) -> str:
    reason = slurm.get("reason") if slurm.get("reason") not in ("None", "", None) else ""
    code = slurm.get("exit") or ""
    restarts = int(slurm.get("restarts") or 0)
    return (f"Slurm: {slurm.get('state')}" + (f" ({reason})" if reason else "")
            + (f", exit code {code}" if code and code != "0:0" else "")
            + (f", requeued {restarts}x" if restarts else ""))


def _run_of(state: dict[str, Any]) -> dict[str, Any]:
    """One earlier run of a job (a retry's, or a Slurm run before a requeue), as reported."""
    run = {key: state.get(key) for key in ("started", "ended", "status", "exit_code", "signal")}
    run["error"] = _last_line(state.get("error") or "")
    return run


def _job_status(root: Path, state: dict[str, Any], log_lines: int = 0) -> JobStatus:
    """The JobStatus of a job folder on this machine from its judged state."""
    place, tail = _place_and_tail(root, state, log_lines)
    return _status_of(root.name, state, tail, place)


def _place_and_tail(root: Path | str, state: dict[str, Any], log_lines: int,
                    places: dict[str, dict[str, int]] | None = None) -> tuple[int | None, str]:
    """A job's place in its queue (while it waits there) and the last lines of its log
    (``places``: the queues listed for the other jobs of one answer, by folder)."""
    entry = state.get("entry") or ""
    place = None
    queue, _, name = entry.rpartition("/")  # (os.path.split: 10,000 jobs)
    if state.get("status") == "waiting" and queue.endswith("/queue"):
        if places is None or queue not in places:
            place = _place_in(queue, name)
            if places is not None:
                places[queue] = _PLACES.get(queue, (0, {}))[1]
        else:
            place = places[queue].get(name)
    tail = _tail(_read_text(Path(root) / OUTPUT_LOG), log_lines) if log_lines > 0 else ""
    return place, tail


def _status_of(job_id: str, state: dict[str, Any], tail: str = "",
               place: int | None = None) -> JobStatus:
    """A JobStatus from a job's judged state record (read here or sent by its host)."""
    return JobStatus(**_status_fields(job_id, state, tail, place))


def _status_fields(job_id: str, state: dict[str, Any], tail: str,
                   place: int | None) -> dict[str, Any]:
    """The fields of _status_of's JobStatus (unchecked)."""
    get = state.get  # (a literal, one lookup of get: 10,000 rows)
    status = get("status") or "prepared"
    attempt, attempts = get("attempt"), get("attempts") or 1
    slurm = get("slurm") or {}
    warning = get("warning") if status not in TERMINAL_STATUSES else ""
    return {"job_id": job_id, "status": status if status in STATUSES else "failed",
            "pid": get("pid"), "submission_time": get("submitted"),
            "start_time": get("started"), "end_time": get("ended"),
            "results_path": get("results"), "error_message": get("error") or "",
            "place": place, "host": get("node") or "?", "log_tail": tail,
            "slurm_job_id": slurm.get("id"), "reason": get("reason") or warning or "",
            "attempt": f"{attempt}/{attempts}" if attempt and attempts > 1 else "",
            "exit_code": get("exit_code"), "signal": get("signal"),
            "max_rss_bytes": get("max_rss_bytes"), "cpu_seconds": get("cpu_seconds"),
            "slot": get("slot"), "runs": list(get("runs") or []),
            "as_of": get("as_of"), "schema": STATE_SCHEMA}


# ============================================================================================
# 8. job execution: the wrapper's lifecycle, the dispatcher, fire, cancel, the executing side
# ============================================================================================

class _Terminated(BaseException):
    """SIGTERM reached the job: unwind so that it ends as failed and frees its slot."""


def _raise_terminated(signum: int, frame: Any) -> None:
    """Once: the same signal again (a cancel reaches the whole process group, and the wrapper
    passes it on too) must not cut short the unwinding that records why the run ended."""
    signal.signal(signum, signal.SIG_IGN)
    why = (" (Slurm sends it at the time limit, on scancel and on preemption)"
           if "SLURM_JOB_ID" in os.environ else "")
    raise _Terminated(f"terminated by signal {signum}{why}")


class JobContext:
    """The job folder as the wrapper sees it: its parameters and how to load the callable.

    The job's repo is its own copy of its snapshot with copy_repo (``code/`` in the job folder),
    else the repo in place; it is the job's working folder. What a script or function job has
    first on ``sys.path``, in this order, each once: the folder of its file (as ``python
    path/to/file.py`` has), the folder its module is imported from (the parent of its top
    package; for a file outside any package, that same folder), and the repo's root. So a
    function in ``experiments/run.py`` imports the repo's own packages. A job run in place
    writes no bytecode (the repo is yours): ``sys.dont_write_bytecode``, and
    PYTHONDONTWRITEBYTECODE for the processes it starts. With copy_repo, each data path inside
    the repo is a link in the job's copy to where the data is on this machine (unless the
    snapshot holds it)."""

    def __init__(self, job_root: str | os.PathLike[str]) -> None:
        self.job_root = Path(job_root)
        self.params = JobParams.from_dict(_read_json(self.job_root / JOB_PARAMS_JSON))
        self.repo = expand_home(self.params.repo_path_rh)
        if self.params.code_snapshot:  # the job's own copy of the code it was submitted with
            for relative in self.params.data_r:
                _link_data(self.job_root / CODE_DIR, _safe_relative(relative), self.repo / relative)
            self.repo = self.job_root / CODE_DIR
        else:
            sys.dont_write_bytecode = True
            os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        self._func: Callable[..., Any] | None = None

    def workload(self, written: WorkloadParams) -> WorkloadParams:
        """The slice of the workload this job runs: the one its own config names (an array's
        task has a config of its own, its wrapper is the array's), else the ``written`` one."""
        own = _read_json(self.job_root / CONFIG_JSON).get("workload_params")
        return WorkloadParams.from_dict(own) if isinstance(own, dict) else written

    def sys_path(self) -> list[Path]:
        """The folders the job puts first on sys.path, in order (see the class docstring)."""
        file = self.repo / self.params.file_path_r
        return list(dict.fromkeys([file.parent, self.repo / self.params.import_root_r, self.repo]))

    def _put_on_path(self) -> None:
        for folder in reversed(self.sys_path()):
            entry = str(folder)
            if entry in sys.path:
                sys.path.remove(entry)
            sys.path.insert(0, entry)

    def load_callable(self) -> Callable[..., Any]:
        """The job's function, imported from the shipped repo (first on sys.path)."""
        if self._func is not None:
            return self._func
        params = self.params
        self._put_on_path()
        if params.kind == "method":
            import pickle

            with open(self.job_root / INSTANCE_PICKLE, "rb") as handle:
                owner: Any = pickle.load(handle)
        elif params.kind == "run_path":
            import runpy

            owner = _Namespace(runpy.run_path(str(self.repo / params.file_path_r)))
        else:
            import importlib

            owner = importlib.import_module(params.func_module)
        if params.kind != "method" and params.func_class:
            for part in params.func_class.split("."):
                owner = getattr(owner, part)
        self._func = getattr(owner, params.func_name or "")
        return self._func

    def run_script(self, func_kwargs: dict[str, Any],
                   workload_params: WorkloadParams | None) -> Any:
        """Run the script as ``__main__``; it sees ``func_kwargs`` and ``workload_params`` as
        globals, and a global ``res`` it sets names its results folder."""
        import runpy

        script = self.repo / self.params.file_path_r
        self._put_on_path()
        sys.argv = [str(script)]
        try:
            namespace = runpy.run_path(str(script), run_name="__main__",
                                       init_globals={"func_kwargs": func_kwargs,
                                                     "workload_params": workload_params})
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise StackopsError(f"the script exited with status {exc.code}") from exc
            return None
        return namespace.get("res")


def _link_data(code: Path, relative: str, target: Path) -> None:
    """Show data ``target`` at ``relative`` in the job's copy ``code`` as a link to it, unless
    the copy has that path already (where both are folders: each entry only the data has)."""
    place = code / relative
    if os.path.lexists(place):
        if place.is_dir() and not place.is_symlink() and target.is_dir():
            for name in sorted(os.listdir(target)):
                _link_data(code, f"{relative}/{name}", target / name)
        return
    if os.path.lexists(target):
        _mkdir_private(place.parent)
        with _suppress(FileExistsError):  # another job of the same sweep made it
            os.symlink(target, place)


class _Namespace:
    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


_CONTEXTS: dict[str, JobContext] = {}


def call_job_part(job_root: str, part: dict[str, Any], func_kwargs: dict[str, Any]) -> Any:
    """Run one part of a parallelized job (in a worker process): load the callable, call it."""
    context = _CONTEXTS.get(job_root) or _CONTEXTS.setdefault(job_root, JobContext(job_root))
    return context.load_callable()(workload_params=WorkloadParams.from_dict(part), **func_kwargs)


def pool_size(parts: int) -> int:
    """How many processes run ``parts`` parallel parts: one per part, at most one per CPU this
    process may use (more would only compete for the same CPUs and memory)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    size = max(1, min(parts, cpus))
    if size < parts:
        log.info("running %d parts on %d processes (at most one per CPU)", parts, size)
    return size


def _results_folder(manager: FileManager, res: Any) -> tuple[Path, bool]:
    """(folder holding the results, whether the job named it itself)."""
    if isinstance(res, (str, os.PathLike)):
        named = Path(os.path.abspath(os.path.expanduser(os.fspath(res))))
        if named.exists():
            return named, True
        log.warning("the job returned %s, which does not exist; using the default results folder",
                    res)
    folder = expand_home(f"{DEFAULT_RESULTS_DIR}/{manager.job_id}")
    _mkdir_private(folder)
    return folder, False


def _save_result(folder: Path, res: Any) -> None:
    if res is None:
        return
    try:
        _atomic_write_text(folder / "result.json",
                           json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    except (TypeError, ValueError):
        _atomic_write_text(folder / "result.txt", repr(res) + "\n")


_LOG: list[Path] = []  # the job's log, when this process is its wrapper


def _say(text: str) -> None:
    """A line of stackops' own in the job's log, marked so that it never passes for the job's,
    and on a line of its own (the job's output may have ended in the middle of one)."""
    sys.stdout.flush()
    start = ""
    with _suppress(OSError, IndexError), open(_LOG[0], "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        start = "" if handle.read(1) == b"\n" else "\n"
    print(f"{start}stackops: {text}", flush=True)


_TERM_SEEN: list[int] = []  # SIGTERM reached the wrapper (its run was asked to stop)
_CHILD: list[int] = []  # the pid of the run under way, which a SIGTERM to the wrapper reaches too


def _note_term(signum: int, frame: Any) -> None:
    _TERM_SEEN.append(signum)
    for pid in _CHILD:
        with _suppress(ProcessLookupError):
            os.kill(pid, signum)


def _pass_term_on(pid: int) -> None:
    """A SIGTERM that reached the wrapper while its run was being started reaches the run too."""
    for signum in _TERM_SEEN[:1]:
        with _suppress(ProcessLookupError):
            os.kill(pid, signum)


class _NeverRuns(BaseException):
    """The job ends before its first run: cancelled, or a job it runs after did not complete."""


def run_job(job_root: str | os.PathLike[str],
            execute: Callable[[JobContext, dict[str, Any]], tuple[Any, str]]) -> Any:
    """The wrapper's lifecycle: hold the job's lock (its liveness), wait for the jobs it runs after
    and for its slot, record the start, run ``execute`` in a child process of its own (again after
    a failed run, killed ones included, while retries allow; an interactive job runs it in this
    process, for its REPL), record the end with the run's exit status and resources, give the slot
    back, report the end. Whatever happens inside, the job ends completed, failed or cancelled;
    the wrapper's exit status is 0 only for a completed job (not interactive: its REPL stays)."""
    _LATE_HANDLER[:] = [(20, _job_logging)]  # (its level: logging.INFO)
    root = Path(os.path.abspath(job_root))
    _LOG[:] = [root / OUTPUT_LOG]
    manager = FileManager.from_job_root(root)
    config = _read_json(root / CONFIG_JSON)
    alive = _hold_alive(root)
    _HOLDING[:] = [alive]
    interactive = bool(sys.flags.interactive)
    signal.signal(signal.SIGTERM, _raise_terminated if interactive else _note_term)
    res: Any = None
    outcome: dict[str, Any] = {"error": "the job ended before it started"}
    ended: dict[str, Any] | None = None
    try:
        try:
            _begin(root, manager, config)
            res, outcome = _attempts(root, manager, config, execute, interactive)
        except (_NeverRuns, StackopsError) as exc:  # said in one line: no traceback of ours
            outcome = {"error": str(exc)}
        except BaseException:  # a crash of any kind still ends the job: failed, traceback kept
            outcome = {"error": traceback.format_exc()}
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ended = _finish(root, outcome)
    finally:
        manager.unlock_resources(_history_record(manager, ended), keep_slot=interactive)
        if ended is not None:
            _report_end(root, ended)
        if not interactive:
            os.close(alive)
    if not interactive:  # the wrapper's own exit status says it too: Slurm's afterok, sacct
        _leave(0 if read_state(root).get("status") == "completed" else 1)
    return res


def _leave(code: int) -> None:
    """End the wrapper's process now, its output flushed: it has nothing left to clean up, and
    tearing down an interpreter that holds this module costs as much as a job's own run."""
    for stream in (sys.stdout, sys.stderr):
        with _suppress(Exception):
            stream.flush()
    os._exit(code)


def _history_record(manager: FileManager, ended: dict[str, Any] | None) -> dict[str, Any]:
    """The job's line in the machine's history view."""
    state = ended or {}
    return {"job_id": manager.job_id, "status": state.get("status"),
            "submission_time": _iso(manager.submission_time), "start_time": state.get("started"),
            "end_time": state.get("ended"),
            "duration_seconds": _seconds_between(state.get("started"), state.get("ended"))}


def _job_logging(logger: logging.Logger) -> None:
    """The wrapper's own log lines go to the job's log (its stdout), marked as stackops'. Set
    when the wrapper first logs (_LATE_HANDLER): most jobs log nothing and never import logging."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("stackops: %(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _begin(root: Path, manager: FileManager, config: dict[str, Any]) -> None:
    """Before the first run: the jobs it runs after, the slot, the repo's update or install, and
    the record says running (an earlier, tentative end, of a Slurm run requeued, set aside)."""
    if read_state(root).get("cancel"):
        raise _NeverRuns("cancelled before it started")
    parents = list(config.get("after") or [])
    if parents and "STACKOPS_SLOT_FDS" not in os.environ:  # the dispatcher waited for them
        _wait_for_parents(root, parents, wait=config.get("launch_method") != "slurm")
    manager.secure_resources()
    if manager.slot_names:
        _say(f"job {manager.job_id} holds {', '.join(manager.slot_names)}")
    admitted = manager.admitted_at or _utcnow()

    def start(state: dict[str, Any]) -> bool:
        if state.get("cancel") or (state.get("status") in TERMINAL_STATUSES
                                   and state.get("final", True)):
            return False
        if state.get("status") in TERMINAL_STATUSES:  # a Slurm run before a requeue
            state.setdefault("runs", []).append(_run_of(state))
        for key in ("entry", "starting", "ended", "error", "exit_code", "signal", "final"):
            state.pop(key, None)
        state.update(status="running", started=_iso(admitted), pid=os.getpid(),
                     pid_start=process_start_ticks(), pgid=os.getpgrp(), machine=machine_key(),
                     node=os.uname().nodename, attempt=1,
                     attempts=int(config.get("retries") or 0) + 1,
                     slot=",".join(manager.slot_names) or None)
        return True

    if _update(root, start).get("status") != "running":
        raise _NeverRuns("cancelled before it started")
    _say(f"EXECUTION START: job {manager.job_id} on {os.uname().nodename} (pid {os.getpid()})")
    _aside_old_results(root, manager)
    _setup_repo(root, config)


def _aside_old_results(root: Path, manager: FileManager) -> None:
    """A job id used again (the earlier job deleted) never passes off the earlier job's results as
    its own: their folder, made before this job was submitted, is moved aside (nothing lost)."""
    folder = expand_home(f"{DEFAULT_RESULTS_DIR}/{manager.job_id}")
    with _suppress(OSError):
        if folder.is_dir() and not folder.is_symlink() \
                and folder.stat().st_mtime < manager.submission_time.timestamp():
            aside = folder.with_name(f"{folder.name}.before-{int(time.time())}")
            os.rename(folder, aside)
            log.warning("moved the results of an earlier job %s aside, to %s", manager.job_id,
                        collapse_home(aside))


def _work_dir(root: Path) -> Path:
    """Where the job runs: its own copy of its code (copy_repo), else the repo it names."""
    params = _read_json(root / JOB_PARAMS_JSON)
    if params.get("code_snapshot"):
        return root / CODE_DIR
    return expand_home(params.get("repo_path_rh") or "~")


def _setup_repo(root: Path, config: dict[str, Any]) -> None:
    """``update_repo``: git pull in the repo; ``install_repo``: pip install -e . there (with the
    job's interpreter); a failure of either fails the job."""
    steps = []
    if config.get("update_repo"):
        steps.append(("git pull", ["git", "pull", "--ff-only"]))
    if config.get("install_repo"):
        steps.append(("pip install -e .", [sys.executable, "-m", "pip", "install", "-e", "."]))
    folder = _work_dir(root)
    if not folder.is_dir():
        raise StackopsError(f"cannot enter the repo folder {collapse_home(folder)}: it is gone")
    env = dict(os.environ, STACKOPS_JOB_ID=root.name)
    version = _read_json(root / JOB_PARAMS_JSON).get("scm_version")
    if version:  # setuptools-scm and hatch-vcs read it: the copy has no .git
        env["SETUPTOOLS_SCM_PRETEND_VERSION"] = version
    for name, argv in steps:
        _say(f"running {name} in {collapse_home(folder)}")
        try:
            done = subprocess.run(argv, cwd=str(folder), env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise StackopsError(f"{name} failed in {collapse_home(folder)}: {exc}") from None
        if done.returncode != 0:
            raise StackopsError(f"{name} failed in {collapse_home(folder)} "
                                f"(exit status {done.returncode})")


def _attempts(root: Path, manager: FileManager, config: dict[str, Any],
              execute: Callable[[JobContext, dict[str, Any]], tuple[Any, str]],
              interactive: bool) -> tuple[Any, dict[str, Any]]:
    """Run the job, and again after a failed run (killed ones too) while ``retries`` allow; a
    cancel stops it. Returns (the result in this process, if any, the last run's outcome)."""
    retries, delay = int(config.get("retries") or 0), float(config.get("retry_delay") or 0.0)
    attempt = 1
    while True:
        if _TERM_SEEN:
            return None, {"error": f"terminated by signal {_TERM_SEEN[0]} before its run"}
        env = _run_environment(root, manager, config, attempt)
        if interactive:
            res, outcome = _run_here(root, manager, execute, env)
        else:
            res, outcome = None, _run_child(root, manager, config, execute, env)
        if not outcome.get("error") or attempt > retries or _stopping(root):
            return res, outcome
        _say(f"run {attempt} of {retries + 1} failed; again in {delay:g}s")
        print(outcome["error"], file=sys.stderr, flush=True)
        run = dict(_run_of(dict(outcome, started=read_state(root).get("started"),
                                ended=_iso(_utcnow()), status="failed")))
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not _stopping(root):
            time.sleep(min(0.2, delay))
        if _stopping(root):
            return res, outcome
        attempt += 1
        _update(root, lambda state, n=attempt, run=run: state.update(
            attempt=n, started=_iso(_utcnow()), runs=[*state.get("runs", []), run]))


def _stopping(root: Path) -> bool:
    return bool(_TERM_SEEN) or bool(read_state(root).get("cancel"))


def _run_environment(root: Path, manager: FileManager, config: dict[str, Any],
                     attempt: int) -> dict[str, str]:
    """What a run adds to its environment: the user's ``env`` and the job's own variables (see
    _job_environment), its folder and results folder, and unbuffered Python output (a job run in
    place writes no bytecode into the user's tree: JobContext)."""
    sweep = re.search(r"-(\d+)\Z", manager.job_id) if os.path.islink(root / "python") else None
    env = _job_environment(manager.job_id, attempt, ",".join(manager.slot_names),
                           config.get("workload_params"), int(sweep[1]) if sweep else None,
                           config.get("env"))
    env.update(STACKOPS_JOB_ROOT=str(root), PYTHONUNBUFFERED="1",
               STACKOPS_RESULTS=str(expand_home(f"{DEFAULT_RESULTS_DIR}/{manager.job_id}")))
    return env


def _run_child(root: Path, manager: FileManager, config: dict[str, Any],
               execute: Callable[[JobContext, dict[str, Any]], tuple[Any, str]],
               env: dict[str, str]) -> dict[str, Any]:
    """One run in a child process of the wrapper (a fork for a Python job: nothing to start; the
    command itself for a command job), in the wrapper's process group; its outcome, with its exit
    status or signal, peak memory and CPU time as the kernel counted them."""
    params = JobParams.from_dict(_read_json(root / JOB_PARAMS_JSON))
    sys.stdout.flush()
    sys.stderr.flush()
    if params.kind == "command":  # it holds the job's lock and slot as a fork would
        held = (*_HOLDING, *(fd for _, fd in manager._slot or []))
        return _run_command_job(root, params, env, held)
    told = root / LOGS / f".outcome-{os.getpid()}.json"
    with _suppress(FileNotFoundError):
        os.unlink(told)
    # SIGTERM waits across the fork: the child takes it once its own handler is in place, the
    # wrapper once it knows the child to pass it on to
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child: it never returns)
            _child_main(root, manager, execute, env, told)
        _CHILD[:] = [pid]
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _pass_term_on(pid)
    try:  # (a Ctrl-C here stops the run first: the slot it holds is let go for every copy)
        ended = _wait_child(pid)
    finally:
        _CHILD.clear()
    outcome: dict[str, Any] = {}
    with _suppress(OSError, ValueError):
        outcome = json.loads(told.read_text(encoding="utf-8"))
        os.unlink(told)
    return _outcome(outcome, ended)


def _run_command_job(root: Path, params: JobParams, env: dict[str, str],
                     held: tuple[int, ...] = ()) -> dict[str, Any]:
    """One run of a command job: its argv (a sweep's placeholders filled from its kwargs) in its
    folder of the repo (of its own copy, with copy_repo), with the job's variables, its output
    into the job's log, holding the locks ``held`` (the job's liveness and slot: a command that
    outlives its wrapper still counts as the job running); the results folder is
    STACKOPS_RESULTS."""
    argv = command_argv(params, _read_json(root / KWARGS_JSON))
    folder = _work_dir(root) / params.file_path_r
    if params.code_snapshot and not folder.exists():  # empty here: no snapshot holds it
        _mkdir_private(folder)
    results = Path(env["STACKOPS_RESULTS"])
    _mkdir_private(results)
    try:
        record = _run_command(argv, folder, {**os.environ, **env}, sys.stdout.fileno(),
                              started=_CHILD, held=held)
    finally:
        _CHILD.clear()
    return dict(record, error=_command_failure(argv, record), results=collapse_home(results))


def _outcome(outcome: dict[str, Any], ended: dict[str, Any]) -> dict[str, Any]:
    """A run's outcome with how it ended (its _exit_record)."""
    outcome, code, killed = dict(outcome, **ended), ended["exit_code"], ended["signal"]
    if killed is not None and not outcome.get("error"):
        name = _signal_name(killed)
        outcome["error"] = f"the run was killed by signal {killed} ({name})" + (
            ": out of memory?" if killed == signal.SIGKILL else "")
    elif code and not outcome.get("error"):
        outcome["error"] = f"the run ended with exit status {code}"
    return outcome


def _signal_name(number: int) -> str:
    with _suppress(ValueError):
        return signal.Signals(number).name
    return "?"


def _child_main(root: Path, manager: FileManager,
                execute: Callable[[JobContext, dict[str, Any]], tuple[Any, str]],
                env: dict[str, str], told: Path) -> None:
    """The child of a Python job's run: the job's environment and folder, its own output
    unbuffered, then the call; its outcome in ``told``. It exits without the wrapper's clean-up."""
    code = 1
    wrapper = os.getppid()
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.environ.update(env)
        for stream in (sys.stdout, sys.stderr):
            with _suppress(AttributeError, ValueError):
                stream.reconfigure(write_through=True)  # type: ignore[union-attr]
        outcome = _call(root, manager, execute)
        code = 1 if outcome["error"] else 0
        if os.getppid() != wrapper:  # the wrapper was killed meanwhile: the run records its end
            _record_end(root, "failed" if outcome["error"] else "completed", outcome["error"],
                        results=outcome.get("results"), exit_code=code)
    except BaseException:
        outcome = {"error": traceback.format_exc()}
    finally:
        with _suppress(BaseException):
            _write_plain(told, json.dumps(outcome))
        with _suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _call(root: Path, manager: FileManager,
          execute: Callable[[JobContext, dict[str, Any]], tuple[Any, str]]) -> dict[str, Any]:
    """Call the job once, in its working folder, and save its result: its outcome (the error,
    empty when it completed; the results folder)."""
    context = JobContext(root)
    os.chdir(_work_dir(root))
    func_kwargs = _read_json(root / KWARGS_JSON)  # fresh for every run
    try:
        res, error = execute(context, func_kwargs)
    except (Exception, SystemExit):
        res, error = None, traceback.format_exc()
    try:
        folder, named = _results_folder(manager, res)
        if not named:
            _save_result(folder, res)
        results: str | None = collapse_home(folder)
    except Exception:
        error = _add_error(error, "the finishing step could not save the job's result:\n"
                           + traceback.format_exc())
        results = None
    return {"error": error, "results": results}


def _run_here(root: Path, manager: FileManager,
              execute: Callable[[JobContext, dict[str, Any]], tuple[Any, str]],
              env: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """One run in this very process (an interactive job: its REPL then has the job's objects)."""
    os.environ.update(env)
    context = JobContext(root)
    os.chdir(_work_dir(root))
    try:
        res, error = execute(context, _read_json(root / KWARGS_JSON))
    except (Exception, SystemExit, _Terminated):
        res, error = None, traceback.format_exc()
    folder, named = _results_folder(manager, res)
    if not named:
        _save_result(folder, res)
    return res, {"error": error, "results": collapse_home(folder)}


def _finish(root: Path, outcome: dict[str, Any]) -> dict[str, Any] | None:
    """Record the job's end from its last run's outcome (see _record_end), and say it in the log.
    A run stopped by SIGTERM under Slurm, not by a cancel, ends tentatively: Slurm may start it
    again (requeue, preemption), and its final word is recorded when status next asks it."""
    error = outcome.get("error") or ""
    state = read_state(root)
    final = True
    if error and state.get("cancel"):
        error = f"cancelled ({state['cancel']})"
    elif error and (_TERM_SEEN or outcome.get("signal") == signal.SIGTERM) \
            and "SLURM_JOB_ID" in os.environ:
        final = False
    fields = {key: outcome.get(key) for key in ("results", "exit_code", "signal",
                                                "max_rss_bytes", "cpu_seconds")}
    ended = _record_end(root, "failed" if error else "completed", error, final=final, **fields)
    state = ended or read_state(root)
    took = _seconds_between(state.get("started"), state.get("ended"))
    _say(f"JOB {str(state.get('status')).upper()}: {root.name} after {_format_duration(took)}"
         + (f", results in {state.get('results')}" if state.get("results") else ""))
    if error:
        print(error.rstrip(), file=sys.stderr, flush=True)
    return ended


def _seconds_between(start: str | None, end: str | None) -> float:
    first, last = _parse_iso(start), _parse_iso(end)
    return (last - first).total_seconds() if first and last else 0.0


def _add_error(error: str, more: str) -> str:
    return f"{error.rstrip()}\n\n{more}" if error else more


# -- e-mail on completion (sent by the executing machine) ------------------------------------------

def _email_config_path() -> Path:
    return expand_home(os.environ.get("STACKOPS_EMAIL_CONFIG") or DEFAULT_EMAIL_CONFIG)


def load_email_config(name: str) -> dict[str, Any]:
    """The SMTP settings called ``name`` from this machine's private e-mail config file, checked:
    a missing, unreadable, shared (not 0600) or incomplete file is a ConfigError naming the fix."""
    path = _email_config_path()
    example = (f'{{"{name}": {{"host": "smtp.example.org", "port": 587, "security": "starttls", '
               f'"user": "me@example.org", "password": "...", "from": "me@example.org"}}}}')
    try:
        mode = path.stat().st_mode
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"e-mail config {path} does not exist on {os.uname().nodename}",
                          hint=f"create it (chmod 600) with: {example}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"e-mail config {path} cannot be read: {exc}") from exc
    if mode & 0o077:
        raise ConfigError(f"e-mail config {path} holds credentials but others may read it",
                          hint=f"chmod 600 {path}")
    entry = data.get(name) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        raise ConfigError(f"e-mail config {path} has no entry {name!r}",
                          hint=f"add one like: {example}")
    missing = [key for key in ("host", "port", "security", "from") if key not in entry]
    if missing or entry["security"] not in ("ssl", "starttls", "plain"):
        raise ConfigError(f"e-mail config {name!r} in {path} needs host, port, from and security "
                          "(ssl, starttls or plain); missing or wrong: "
                          f"{', '.join(missing) or 'security'}")
    _check_plaintext_auth(entry, f"e-mail config {name!r} in {path}")
    timeout = entry.get("timeout", MAIL_DEADLINE)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= 600:
        raise ConfigError(f"e-mail config {name!r} in {path}: timeout must be seconds (more "
                          f"than 0, at most 600) for the whole exchange, got {timeout!r}")
    return entry


def _check_plaintext_auth(settings: dict[str, Any], what: str) -> None:
    """A password over an unencrypted connection only when the config says so in as many words."""
    plain = settings.get("security") == "plain"
    if plain and settings.get("user") and settings.get("allow_plaintext_auth") is not True:
        raise ConfigError(f"{what} would send its password in clear text (security plain)",
                          hint='use "ssl" or "starttls", or add "allow_plaintext_auth": true if '
                               "the server is on a network you trust")


def send_job_email(settings: dict[str, Any], to: str, subject: str, body: str,
                   deadline: float | None = None) -> None:
    """One plain-text message over SMTP (SSL, STARTTLS or plain), the whole exchange within
    ``deadline`` seconds (default: the config's ``timeout``, else MAIL_DEADLINE), not per read:
    a server that trickles its greeting cannot hold the job's process. A message not sent in
    time is a StackopsError (the exchange is cut off); any other failure is raised as it is."""
    import threading
    from email.message import EmailMessage

    _check_plaintext_auth(settings, f"SMTP server {settings.get('host')}")
    message = EmailMessage()
    message["Subject"], message["From"], message["To"] = subject, settings["from"], to
    message.set_content(body)
    limit = float(deadline if deadline is not None else settings.get("timeout") or MAIL_DEADLINE)
    server, context = _smtp_client(settings, limit)
    outcome: list[BaseException | None] = []

    def exchange() -> None:
        try:
            _smtp_exchange(server, settings, message, context)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    talker = threading.Thread(target=exchange, name="stackops-mail", daemon=True)
    talker.start()
    talker.join(limit)
    if not outcome:  # still talking: cut it off (a daemon thread keeps no process alive)
        with _suppress(Exception):
            server.sock.shutdown(2)
        raise StackopsError(f"the SMTP server {settings['host']}:{settings['port']} did not "
                            f"finish the exchange within {limit:g}s")
    if outcome[0] is not None:
        raise outcome[0]


def _smtp_client(settings: dict[str, Any], limit: float) -> tuple[Any, Any]:
    """An smtplib client for ``settings``, not yet connected (so another thread can cut off its
    socket), with ``limit`` as its timeout per read; and its TLS context."""
    import smtplib
    import ssl

    context = ssl.create_default_context(cafile=settings.get("cafile"))
    if settings["security"] == "ssl":
        server: Any = smtplib.SMTP_SSL(timeout=limit, context=context)
    else:
        server = smtplib.SMTP(timeout=limit)
    server._host = settings["host"]  # the TLS server name, as connecting in the constructor sets
    return server, context


def _smtp_exchange(server: Any, settings: dict[str, Any], message: Any, context: Any) -> None:
    """Connect, greet, encrypt, log in, send and quit: what smtplib's constructor and ``with``
    would do, on a client made by _smtp_client."""
    import smtplib

    code, reply = server.connect(settings["host"], int(settings["port"]))
    if code != 220:
        server.close()
        raise smtplib.SMTPConnectError(code, reply)
    try:
        if settings["security"] == "starttls":
            server.starttls(context=context)
        if settings.get("user"):
            server.login(settings["user"], settings.get("password", ""))
        server.send_message(message)
        server.quit()
    finally:
        server.close()


def _report_end(root: Path, state: dict[str, Any], inline: bool = True) -> None:
    """Report a recorded end (every end is recorded once, so it is reported once): the e-mail
    and the ``on_end`` hook the job asked for, each bounded in time. A check that found the end
    (``inline=False``) leaves it to a detached process of the job's stackops, so that it never
    waits for a mail server; a tentative end (a Slurm run that may be requeued) is not reported,
    nor the end of a job withdrawn from an interrupted submission: it never ran (a sweep of 2,000
    broken off by Ctrl-C sent 2,000 mails, started by the submitter with Ctrl-C held back)."""
    if not state.get("final", True) or state.get("cancel") == WITHDRAWN:
        return
    try:
        config = _read_json(root / CONFIG_JSON)
    except StackopsError:
        return
    if not config.get("notify_upon_completion") and not config.get("on_end"):
        return
    if not inline:
        with _suppress(OSError):
            _start_detached([sys.executable or "python3", "-S", str(root / STACKOPS_COPY),
                             "--serve", "notify", str(root)], root / OUTPUT_LOG)
        return
    if config.get("notify_upon_completion"):
        _notify(root, state, config)
    if config.get("on_end"):
        _run_hook(root, state, str(config["on_end"]))


def _notify(root: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Send the job's one e-mail; how it went is recorded (``notified``), never raised."""
    host = state.get("node") or os.uname().nodename
    status, job_id = state.get("status"), root.name
    took = _format_duration(_seconds_between(state.get("started"), state.get("ended")))
    body = (f"Job {job_id} {status} on {host}.\n\nhost: {host}\njob: {job_id}\nstatus: {status}\n"
            f"duration: {took}\nresults: {state.get('results') or '-'}\n")
    for key in ("exit_code", "signal", "max_rss_bytes", "cpu_seconds"):
        if state.get(key) is not None:
            body += f"{key}: {state[key]}\n"
    if state.get("error"):
        body += f"\nerror (last lines):\n{_tail(state['error'], 20)}\n"
    try:
        send_job_email(load_email_config(config.get("email_config_name") or ""),
                       str(config.get("to_email")), f"stackops: job {job_id} {status} on {host}",
                       body)
        said = f"sent {_iso(_utcnow())} to {config.get('to_email')}"
        log.info("sent the end e-mail of job %s to %s", job_id, config.get("to_email"))
    except Exception as exc:  # the job's outcome stands whatever the mail server does
        said = f"not sent: {_last_line(str(exc))}"
        log.warning("could not send the end e-mail of job %s: %s", job_id, exc)
    with _suppress(OSError, StackopsError):
        _record(root, notified=said)


HOOK_TIMEOUT = 60.0  # seconds an --on-end command may take
HOOK_PLACEHOLDERS = ("job_id", "status", "exit_code", "host", "duration")


def check_hook(command: Any, what: str = "on_end") -> str:
    """An ``on_end`` command: text whose ``{name}`` placeholders are HOOK_PLACEHOLDERS'; checked
    when the job is described, not when it ends."""
    hint = "a shell command; its placeholders: " + " ".join(f"{{{n}}}" for n in HOOK_PLACEHOLDERS)
    if not isinstance(command, str) or not command.strip() or "\0" in command:
        raise ConfigError(f"{what} must be a shell command, got {_shorten(repr(command), 60)}",
                          hint=hint)
    try:
        fill_placeholders(command, dict.fromkeys(HOOK_PLACEHOLDERS, ""))
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}", hint=hint) from None
    return command


def _run_hook(root: Path, state: dict[str, Any], template: str) -> None:
    """Run the job's ``on_end`` command once (bash; ``{job_id}``, ``{status}``, ``{exit_code}``,
    ``{host}``, ``{duration}`` filled in shell-quoted), within HOOK_TIMEOUT seconds; its output goes
    to the job's log and its exit status into the record (``hook``)."""
    values = {"job_id": root.name, "status": state.get("status") or "",
              "exit_code": "" if state.get("exit_code") is None else str(state["exit_code"]),
              "host": state.get("node") or os.uname().nodename,
              "duration": f"{_seconds_between(state.get('started'), state.get('ended')):.1f}"}
    command = fill_placeholders(template, values, quote=True)
    try:
        done = _run_bounded([shutil.which("bash") or "sh", "-c", command], HOOK_TIMEOUT)
        said = f"exit status {done.returncode}"
        sys.stdout.write(done.stdout)
        sys.stdout.write(done.stderr)
    except StackopsError as exc:
        said = f"not run to its end: {exc}"
    with _suppress(OSError, StackopsError):
        _record(root, hook=said)


def notify_job_end(job_root: str | os.PathLike[str]) -> None:
    """Report a job's recorded end (the e-mail, the on_end hook) in this process: what a check
    that found the end starts detached (see _report_end)."""
    root = Path(job_root)
    state = read_state(root)
    if state.get("status") in TERMINAL_STATUSES:
        _report_end(root, state)


# -- jobs that run after others -----------------------------------------------------------------

def _parents(root: Path, parents: list[str]) -> tuple[list[str], list[str]]:
    """(parents that ended without completing, or are gone: ``"P failed"``; parents not ended yet:
    ``"P (running)"``), each judged as any reader judges a job (elsewhere: as recorded)."""
    bad, pending = [], []
    for parent in parents:
        folder = root.parent / parent
        if not (folder / FILE_MANAGER_JSON).exists():
            bad.append(f"{parent} gone")
            continue
        status = judge_jobs([folder])[0].get("status") or "prepared"
        if status in ("failed", "cancelled"):
            bad.append(f"{parent} {status}")
        elif status != "completed":
            pending.append(f"{parent} ({status})")
    return bad, pending


def _wait_for_parents(root: Path, parents: list[str], wait: bool = True) -> None:
    """Wait, holding no slot, until the jobs in ``parents`` (folders beside this one) completed;
    one that failed or was cancelled ends this job ``cancelled`` with that reason. ``wait=False``
    (Slurm, which waited for them): only refuse a parent that did not complete."""
    while True:
        bad, pending = _parents(root, parents)
        if bad:
            why = f"cancelled: it runs after {', '.join(bad)}"
            _record(root, cancel=why)
            raise _NeverRuns(why)
        if not pending or not wait:
            break
        _record(root, status="waiting", reason="after " + ", ".join(pending))
        time.sleep(AFTER_POLL)
    _record(root, reason="")


# -- command jobs and forked children: one attempt, its environment, exit status and resources ---

def _job_environment(job_id: str, attempt: int, slot: str | None,
                     workload: WorkloadParams | dict[str, Any] | None = None,
                     sweep_index: int | None = None,
                     config_env: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a job gets on top of its machine's environment: the user's ``config_env``
    (--env), then stackops' own, which win: STACKOPS_JOB_ID, STACKOPS_ATTEMPT (1 for the first
    run), STACKOPS_SLOT (the slot it holds, "" for none); STACKOPS_SWEEP_INDEX for a sweep's job
    (its line, from 0); with a workload its slice: STACKOPS_IDX_START and STACKOPS_IDX_END (the
    slice), STACKOPS_IDX_MIN and STACKOPS_IDX_MAX (the whole range), STACKOPS_PART (the slice's
    index: a cluster host's, an array task's) and STACKOPS_PARTS (into how many parts the slice
    is to be cut: --workload's PARTS, a cluster host's threads)."""
    env = {str(key): str(value) for key, value in (config_env or {}).items()}
    env.update(STACKOPS_JOB_ID=job_id, STACKOPS_ATTEMPT=str(attempt), STACKOPS_SLOT=slot or "")
    if sweep_index is not None:
        env["STACKOPS_SWEEP_INDEX"] = str(sweep_index)
    if workload is not None:
        part = workload if isinstance(workload, WorkloadParams) else WorkloadParams.from_dict(
            workload)
        env.update(STACKOPS_IDX_START=str(part.idx_start), STACKOPS_IDX_END=str(part.idx_end),
                   STACKOPS_IDX_MIN=str(part.idx_min), STACKOPS_IDX_MAX=str(part.idx_max),
                   STACKOPS_PART=str(part.idx), STACKOPS_PARTS=str(part.jobs))
    return env


def _exit_record(status: int, usage: Any) -> dict[str, Any]:
    """What a wait4() status and resource use say of an ended process: ``exit_code`` (None when a
    signal ended it), ``signal`` (None when it exited), ``max_rss_bytes`` (the largest resident set
    of it or of a descendant it waited for) and ``cpu_seconds`` (user + system, the same way)."""
    scale = 1 if sys.platform == "darwin" else 1024  # Linux counts ru_maxrss in KiB, macOS bytes
    killed = os.WIFSIGNALED(status)
    return {"exit_code": None if killed else os.WEXITSTATUS(status),
            "signal": os.WTERMSIG(status) if killed else None,
            "max_rss_bytes": int(usage.ru_maxrss) * scale,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3)}


def _stop_child(pid: int, grace: float) -> None:
    """Child ``pid`` ended and reaped: ``grace`` seconds to end of itself (it took the same
    Ctrl-C: a checkpoint being saved), then SIGTERM, and SIGKILL ``grace`` seconds after."""
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
                time.sleep(0.05)
            os.kill(pid, sig)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass  # gone, and reaped already


def _wait_child(pid: int, grace: float = 10.0) -> dict[str, Any]:
    """Wait for child ``pid`` (a command job's program, or the forked Python of a function job)
    and return its _exit_record. Whatever is raised meanwhile (Ctrl-C: SIGINT to the group, the
    child's too) stops the child first (see _stop_child) and then goes on up."""
    try:
        _, status, usage = os.wait4(pid, 0)
    except BaseException:
        with _Uninterrupted():  # (a second Ctrl-C is taken once it is stopped)
            _stop_child(pid, grace)
        raise
    return _exit_record(status, usage)


def _run_command(argv: list[str], cwd: str | os.PathLike[str], env: dict[str, str], out_fd: int,
                 grace: float = 10.0, started: list[int] | None = None,
                 held: tuple[int, ...] = ()) -> dict[str, Any]:
    """One attempt of a command job: ``argv`` run without a shell (the program is looked up on
    ``env``'s PATH) in folder ``cwd`` with exactly ``env``, stdin empty, stdout and stderr both
    on ``out_fd`` (one stream, in the order the program writes). It stays in this process's
    group, so stopping the job's group stops it too. Returns its _exit_record (see _wait_child);
    a program that cannot be started is a StackopsError."""
    if not os.path.isdir(cwd):
        raise StackopsError(f"the command's folder {cwd} is not there")
    try:
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_fd,
                                 stderr=out_fd, pass_fds=held)
    except OSError as exc:
        raise StackopsError(f"cannot run {argv[0]!r}: {exc.strerror or exc}",
                            hint="is it installed where the job runs, and on its PATH? (or give "
                                 "its path)") from exc
    if started is not None:
        started[:] = [child.pid]  # (the wrapper passes a SIGTERM on to it)
        _pass_term_on(child.pid)
    try:
        record = _wait_child(child.pid, grace)
    finally:
        child.returncode = -1  # reaped by _wait_child: Popen must not wait for it again
    return record


def _command_failure(argv: list[str], record: dict[str, Any]) -> str:
    """The error of a command's attempt from its _exit_record: "" when it exited 0."""
    number = record.get("signal")
    if number is not None:
        try:
            name = f" ({signal.Signals(number).name})"
        except ValueError:
            name = ""
        return f"the command {argv[0]} was killed by signal {number}{name}"
    if record.get("exit_code"):
        return f"the command {argv[0]} exited with status {record['exit_code']}"
    return ""


# -- the queue's dispatcher: hands slots to queued entries, first come first served --------------

def run_dispatcher(root: str | os.PathLike[str]) -> None:
    """Hand the slots of the queue in ``root`` (a state folder) to its entries, in order, while it
    has any, and keep the jobs it started in view until they end; then exit. At most one runs per
    queue (an flock); a second one exits at once, and one killed is replaced by the next stackops
    call that finds a job in line (Slots.ensure_dispatcher)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        line = "%(asctime)s stackops dispatcher %(process)d: %(message)s"
        handler.setFormatter(logging.Formatter(line))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    booted = [os.path.dirname(_own_file()), *([] if getattr(sys.flags, "safe_path", False)
                                              else [""])]  # as _serve_argv starts it
    if not sys.flags.no_site and sys.path[:len(booted)] == booted:
        _FORK_BASE[:] = [_start_environment(os.environ), sys.path[len(booted):], _site_state()]
        _own_source()  # the bytes this process runs, before anyone edits the file
    _Dispatcher(Path(root)).run()


class _Dispatcher:
    """The one process that starts a queue's jobs (run_dispatcher). It takes a free slot for the
    first entry and starts the job's wrapper holding it and the job's lock: the locks' file
    descriptors are inherited, so the kernel frees them when the job's processes end, whatever
    happens to this one. A wrapper that ends without recording the job's end (killed, or its
    interpreter missing) has that end recorded here, with its exit status."""

    def __init__(self, root: Path) -> None:
        self.slots = Slots(root)
        self.line: list[str] = []  # the queue as last listed, first in line first
        self.relist = 0.0
        self.listed = -1  # the queue folder's mtime when it was last listed
        self.views = 0.0
        self.viewed: tuple[Any, ...] = ()  # what the views were last written from
        self.full_of_ours = False  # the head waits for slots only its own children hold
        self.after_look = 0.0
        self.children: dict[subprocess.Popen[bytes] | _Forked, tuple[Path, _dt.datetime]] = {}
        self.holding: dict[subprocess.Popen[bytes] | _Forked, list[str]] = {}  # slots each holds
        self.ends: dict[subprocess.Popen[bytes] | _Forked, int] = {}  # pidfds: readable at the end
        self.orphans: dict[Path, tuple[str, _dt.datetime]] = {}  # wrapper died (how), run lived
        self.in_person: set[str] = set()  # entries of jobs that take their slot themselves (tmux)
        self.parents: dict[str, list[str]] = {}
        self.head: tuple[str, Path] | None = None  # the first entry, found live and queued
        self.ready: tuple[str, FileManager, dict[str, str]] | None = None  # the head's job, read

    def run(self) -> None:
        """Dispatch while there is work; an entry that came as this one was leaving (its fire saw
        this dispatcher alive) is served: after letting go, it looks once more."""
        while True:
            lock = _try_flock(self.slots.root / DISPATCHER_LOCK)
            if lock is None:  # another one lives
                return
            try:
                _write_plain(self.slots.root / DISPATCHER_PID, str(os.getpid()))
                log.info("dispatching the queue in %s", collapse_home(self.slots.root))
                self._give_back()
                while self._round():
                    pass
            finally:
                with _suppress(Exception):
                    if self.slots.queue.is_dir():
                        self.slots.refresh_views(queue=True)
                with _suppress(FileNotFoundError):
                    os.unlink(self.slots.root / DISPATCHER_PID)  # while it is still ours
                os.close(lock)
            if not self.slots.queue.is_dir() or not (self.slots.entries()
                                                     or self.slots.entries(AFTER_DIR)):
                return

    def _round(self) -> bool:
        """One look at the queue; False when this dispatcher's work is done."""
        self._reap()
        if not self.slots.queue.is_dir():
            return False  # the state folder is gone
        if time.monotonic() >= self.after_look:
            self.after_look = time.monotonic() + AFTER_POLL
            self._look_after()
        head = self._head()
        if head is None and not self.line:
            if self.slots.entries(AFTER_DIR) or self.children or self.orphans:
                self._nap(AFTER_POLL / 5)
                return True
            return bool(self.slots.entries())
        if head is None or not self._hand_over(*head):  # a slot only an end of ours can free:
            ours = head is not None and self.full_of_ours and not self.orphans \
                and len(self.ends) == len(self.children)  # (its pidfd wakes the nap at once)
            self._nap(AFTER_POLL if ours else DISPATCH_POLL)
        if time.monotonic() >= self.views:
            self.views = time.monotonic() + VIEWS_EVERY
            seen = (*(_mtime_ns(self.slots.root / folder) for folder in ("queue", AFTER_DIR,
                                                                            "slots")),
                    len(self.children), int(time.monotonic() / 30))  # (and twice a minute)
            if seen != self.viewed or min(seen[:3]) < 0:
                self.viewed = seen
                self.slots.refresh_views()
        return True

    def _reap(self) -> None:
        """Record the end of a job whose wrapper ended without recording it (killed by a signal,
        its interpreter missing) once the job's lock is free: its run, killed with it, may take
        a moment longer to die, and one that lives on records its own end."""
        for child, (root, submitted) in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            del self.children[child]
            self.holding.pop(child, None)
            if child in self.ends:
                os.close(self.ends.pop(child))
            if code == 0 or read_state(root).get("ended"):  # its end is recorded already
                continue
            why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            if code == 127:
                why += f": is {child.args[0]} installed?"  # type: ignore[index]
            self.orphans[root] = (why, submitted)
        for root, (why, submitted) in list(self.orphans.items()):
            if _alive(root):  # its run goes on (it records its end), or still dies with it
                continue
            del self.orphans[root]
            with _suppress(OSError, StackopsError):  # (its folder deleted meanwhile, and its id
                if FileManager.from_job_root(root).submission_time != submitted:  # used again)
                    continue
                ended = _record_end(root, "failed", f"process gone: the job's wrapper ended "
                                                    f"({why}) without recording the job's end")
                if ended is not None:
                    _report_end(root, ended, inline=False)

    def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, woken at once when a job this dispatcher started ends, so that the
        slot it held goes to the next in line in the same wake-up."""
        if not self.ends:
            time.sleep(seconds)
            return
        import select

        select.select(list(self.ends.values()), [], [], seconds)

    def _head(self) -> tuple[str, Path] | None:
        """The first live entry and its job folder; None when there is none or when the first
        waits in person (it takes its slot itself). Stale entries are removed on the way. An
        entry found queued is not looked at again while it stays first (_hand_over looks once
        more before it starts the job)."""
        while True:
            if not self.line or time.monotonic() >= self.relist:  # when it changed
                self.relist = time.monotonic() + 1.0
                mtime = _mtime_ns(self.slots.queue)
                if not self.line or mtime != self.listed or mtime < 0:
                    self.line, self.listed = self.slots.entries(), mtime
            if not self.line:
                return None
            name = self.line[0]
            if self.head is not None and self.head[0] == name:
                return self.head
            state = self.slots.entry_state(name)
            if state == "stale":
                with _suppress(FileNotFoundError):
                    os.unlink(self.slots.queue / name)
                self.line.pop(0)
                continue
            job_root = Path(_read_text(self.slots.queue / name))
            if state == "queued" and name not in self.in_person:
                with _suppress(OSError, StackopsError):
                    if _read_json(job_root / CONFIG_JSON).get("interactive"):
                        self.in_person.add(name)
            if state == "queued" and name in self.in_person and self._left_line(name, job_root):
                continue
            if state != "queued" or name in self.in_person:
                return None
            self.head = (name, job_root)
            return self.head

    def _left_line(self, name: str, job_root: Path) -> bool:
        """Whether the job that waits first in line in person has gone: its wrapper holds its
        entry (and its lock) while it lives, so one not held was killed once it had recorded its
        pid, or never started STARTING_GRACE after its fire. It ends failed and the line moves
        on (it held up the queue for ever)."""
        state = read_state(job_root)
        starting = _parse_iso(state.get("starting"))
        if not state.get("pid") and starting is not None \
                and (_utcnow() - starting).total_seconds() < STARTING_GRACE:
            return False
        self.in_person.discard(name)
        self._refuse(name, job_root, "process gone: its wrapper, waiting in line in person, "
                                     "ended without recording the job's end (killed?)")
        return True

    def _hand_over(self, name: str, job_root: Path) -> bool:
        """Start the job of entry ``name`` holding a free slot (or its GPUs); False: none free.
        Its folder is read once while it waits first in line; whether it is still queued (not
        cancelled or started meanwhile) is asked again once its slot is held."""
        if self.ready is None or self.ready[0] != name:
            try:
                self.ready = (name, FileManager.from_job_root(job_root), _fire_env(job_root))
            except (OSError, StackopsError) as exc:
                self._refuse(name, job_root, f"its job folder cannot be read: {exc}")
                return True
        _, manager, env = self.ready
        names, need = [f"slot-{index}" for index in range(manager.max_simultaneous_jobs)], 1
        if manager.gpus:
            gpus = gpu_ids(env)
            if len(gpus) < manager.gpus:
                why = (f"job {manager.job_id} needs {manager.gpus} GPU(s) and this machine has "
                       f"{len(gpus)}")
                self._refuse(name, job_root, why)
                return True
            names, need = [f"gpu-{gpu}" for gpu in gpus], manager.gpus
        try:
            held = self.slots._take(names, need)
        # a slot file that cannot be opened: the job says why, with the fix
        except SlotError as exc:
            self._refuse(name, job_root, f"{exc} ({exc.hint})" if exc.hint else str(exc))
            return True
        if not held:
            ours = {slot for child in self.children for slot in self.holding.get(child, ())}
            self.full_of_ours = len(set(names) - ours) < need
            return False
        self.head = self.ready = None  # looked at again from here on
        try:
            # not cancelled or started meanwhile, and out of the line before it starts
            if self.slots.entry_state(name) == "queued" and self._take_entry(name):
                self._start(name, manager, env, held)
        except OSError as exc:
            self._refuse(name, job_root, f"its wrapper could not be started: {exc}")
        finally:
            for _, fd in held:
                os.close(fd)  # the job's processes hold the slot from here on
        return True

    def _start(self, name: str, manager: FileManager, env: dict[str, str],
               held: list[tuple[str, int]]) -> None:
        taken = _utcnow()
        root = manager.job_root
        env = dict(env, STACKOPS_SLOT_FDS=" ".join(str(fd) for _, fd in held),
                   STACKOPS_SLOT_NAMES=" ".join(slot for slot, _ in held),
                   STACKOPS_ADMITTED=_iso(taken) or "")
        child = _spawn_wrapper(root, manager.python, env, tuple(fd for _, fd in held))
        if child is not None:
            self.children[child] = (root, manager.submission_time)
            self.holding[child] = [slot for slot, _ in held]
            with _suppress(AttributeError, OSError):  # Linux 5.3 and Python 3.9 or newer
                self.ends[child] = os.pidfd_open(child.pid)
            holder = {"job_id": manager.job_id, "job_root": str(root), "pid": child.pid,
                      "submission_time": _iso(manager.submission_time),
                      "start_time": _iso(taken)}
            for slot, _ in held:
                _write_plain(self.slots.slots / f"{slot}.json", json.dumps(holder))
        with _suppress(FileNotFoundError):
            os.unlink(self.slots.queue / f"{STARTING}{name}")
        if self.line and self.line[0] == name:
            self.line.pop(0)

    def _take_entry(self, name: str) -> bool:
        """Take entry ``name`` out of the line (renamed STARTING...: no listing shows it) before
        its job is started, so that a job listed in line has not started: the judge need not
        probe it. False when it went meanwhile (a cancel took it out)."""
        try:
            os.rename(self.slots.queue / name, self.slots.queue / f"{STARTING}{name}")
        except FileNotFoundError:
            if self.line and self.line[0] == name:
                self.line.pop(0)
            return False
        return True

    def _give_back(self) -> None:
        """The entries a dispatcher killed while starting their jobs left out of the line (see
        _take_entry), each put back in its place, or dropped when its job started (it recorded
        its start, or its wrapper holds the job's lock), ended or was cancelled: a job is never
        lost, and never started again once its wrapper has recorded its start."""
        for name in self.slots._starting():
            path = self.slots.queue / name
            text = _read_text(path)
            root = Path(text)
            state = read_state(root) if text and (root / FILE_MANAGER_JSON).is_file() else {}
            waits = bool(state) and state.get("status") in _NOT_STARTED \
                and not state.get("started")
            with _suppress(FileNotFoundError):
                if waits and not state.get("cancel") and not _alive(root):
                    os.rename(path, self.slots.queue / name[len(STARTING):])
                else:
                    os.unlink(path)

    def _refuse(self, name: str, job_root: Path, why: str, folder: str = "queue",
                status: str = "failed") -> None:
        """End a job that cannot start (``why``), take its entry out and report its end."""
        log.warning("job %s: %s", job_root.name, why)
        with _suppress(OSError, StackopsError):
            if status == "cancelled":
                _record(job_root, cancel=why)
            ended = _record_end(job_root, status, why)
            if ended is not None:
                _report_end(job_root, ended, inline=False)
        for gone in (name, f"{STARTING}{name}"):
            with _suppress(FileNotFoundError):
                os.unlink(self.slots.root / folder / gone)
        if folder == "queue" and self.line and self.line[0] == name:
            self.line.pop(0)

    def _look_after(self) -> None:
        """Move the jobs whose parents all completed to the end of the queue, and end those with
        a parent that failed, was cancelled or is gone (``cancelled``, as it never runs)."""
        for name in self.slots.entries(AFTER_DIR):
            job_root = Path(_read_text(self.slots.root / AFTER_DIR / name))
            state = read_state(job_root) if (job_root / FILE_MANAGER_JSON).exists() else {}
            if not state or state.get("cancel") or state.get("status") in TERMINAL_STATUSES:
                with _suppress(FileNotFoundError):
                    os.unlink(self.slots.root / AFTER_DIR / name)
                continue
            if name not in self.parents:
                with _suppress(OSError, StackopsError):
                    self.parents[name] = list(_read_json(job_root / CONFIG_JSON).get("after") or [])
            bad, pending = _parents(job_root, self.parents.get(name, []))
            if bad:
                self._refuse(name, job_root, f"cancelled: it runs after {', '.join(bad)}",
                             AFTER_DIR, "cancelled")
                continue
            reason = "after " + ", ".join(pending) if pending else ""
            if state.get("reason", "") != reason:
                _record(job_root, reason=reason)
            if not pending:  # now in line, like a job fired at this moment
                self._in_line(name, job_root)


    def _in_line(self, name: str, job_root: Path) -> None:
        """Move an entry from after/ to the end of the queue, and its record with it."""
        entry = self.slots.queue / f"{time.time_ns():019d}-{job_root.name}"

        def move(state: dict[str, Any]) -> None:
            os.rename(self.slots.root / AFTER_DIR / name, entry)
            state.update(entry=str(entry), reason="")

        _update(job_root, move)
        self.relist = 0.0


def _fire_env(job_root: Path) -> dict[str, str]:
    """The environment the job was fired with (recorded by its fire), without the hand-over
    variables; this process's own when it was not recorded."""
    try:
        raw = (job_root / FIRE_ENV).read_bytes()
    except FileNotFoundError:
        env = dict(os.environ)
    else:
        pairs = (item.partition(b"=") for item in raw.split(b"\0") if b"=" in item)
        env = {os.fsdecode(key): os.fsdecode(value) for key, _, value in pairs}
    for key in ("STACKOPS_SLOT_FDS", "STACKOPS_SLOT_NAMES", "STACKOPS_ADMITTED",
                "STACKOPS_ALIVE_FD"):
        env.pop(key, None)
    return env


def _spawn_wrapper(root: Path, python: str, env: dict[str, str],
                   fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes] | _Forked | None:
    """Start the job's wrapper detached (a session of its own, output to its log), handing it
    the job's lock taken here, so the job is alive from this moment on (and reads running, its
    queue entry or not); None when another process runs the job already. A dispatcher forks
    the wrapper when that is the same as starting it (see _forks_as_started)."""
    alive = _try_flock(root / ALIVE_LOCK)
    if alive is None:
        log.warning("job %s runs already: not started again", root.name)
        return None
    try:
        env = dict(env, STACKOPS_ALIVE_FD=str(alive))
        with _private_append(root / OUTPUT_LOG) as out:
            argv = [os.path.expanduser(python), str(root / WRAPPER_PY)]
            if fds and _forks_as_started(root, argv[0], env):
                child: Any = _fork_wrapper(root, argv, env, out.fileno(), (*fds, alive))
            else:
                child = subprocess.Popen(argv if fds else _in_user_scope(argv, _logind()),
                                         cwd=str(root), env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         pass_fds=(*fds, alive), start_new_session=True)
    finally:
        os.close(alive)
    with _suppress(FileNotFoundError):  # its job has it now: no copy of an environment stays
        os.unlink(root / FIRE_ENV)
    _detached(child)
    return child


_FORK_BASE: list[Any] = []  # a dispatcher's start: its environment, sys.path, site packages


class _Forked:
    """A wrapper forked by this dispatcher, with what the dispatcher asks of a Popen."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid, self.args = pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its lock says whether it lives
                pid, status = self.pid, 0
            if pid:
                self.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                                   else os.WEXITSTATUS(status))
        return self.returncode


def _start_environment(env: Any) -> dict[str, str]:
    """The variables of ``env`` that a process could read as it starts: all (a ``.pth`` file of
    the site packages may read any) but the shell's bookkeeping (and pyenv's: the folder its
    shim was run in) and the job's own variables, which its wrapper reads later."""
    return {key: value for key, value in env.items() if not key.startswith("STACKOPS_")
            and key not in ("PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "PYENV_DIR")}


def _forks_as_started(root: Path, python: str, env: dict[str, str]) -> bool:
    """Whether forking this dispatcher gives the job the process that starting ``python`` on
    its wrapper would: the same interpreter (by path: a virtual environment's differs from the
    one it links to), the same environment (variables such as PYTHONPATH, LD_LIBRARY_PATH or
    the locale are read only at start; no relative PYTHONPATH entry), the same site packages'
    ``.pth`` files and the same stackops, byte for byte. A fork saves a job Python's start and
    the module's import: most of a trivial job's cost."""
    if not _FORK_BASE or not hasattr(os, "fork"):
        return False
    found = shutil.which(python, path=env.get("PATH", os.defpath)) if "/" not in python \
        else python
    relative = [item for item in (env.get("PYTHONPATH") or "/").split(os.pathsep)  # (an empty
                if not os.path.isabs(item)]  # one is none) made absolute at start, against the cwd
    if relative or found != sys.executable or _start_environment(env) != _FORK_BASE[0] \
            or _site_state() != _FORK_BASE[2]:
        return False
    try:
        return (root / STACKOPS_COPY).read_bytes() == _own_source()
    except OSError:
        return False


def _site_state() -> list[Any]:
    """What a Python start reads from the site packages: whether each folder exists, and its
    ``.pth`` files (a package installed since, an editable install changed)."""
    import site

    state: list[Any] = []
    folders: list[str] = getattr(site, "getsitepackages", list)()  # (none in an old virtualenv)
    for folder in [*folders, site.getusersitepackages()]:
        try:
            with os.scandir(folder) as entries:
                state.append((folder, sorted((entry.name, entry.stat().st_mtime_ns)
                                             for entry in entries if entry.name.endswith(".pth"))))
        except OSError:
            state.append((folder, None))
    return state


def _fork_wrapper(root: Path, argv: list[str], env: dict[str, str], out: int,
                  keep: tuple[int, ...]) -> _Forked:
    """The job's wrapper as a fork of this dispatcher (see _forks_as_started)."""
    for stream in (sys.stdout, sys.stderr):
        with _suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child: whatever happens, it never returns)
        code = 1
        try:
            code = _script_status(lambda: _as_wrapper(root, argv, env, out, keep))
        except BaseException:
            with _suppress(BaseException):
                traceback.print_exc()
        finally:
            _leave(code)
    return _Forked(pid, argv)


def _as_wrapper(root: Path, argv: list[str], env: dict[str, str], out: int,
                keep: tuple[int, ...]) -> None:
    """In the fork: become what ``python WRAPPER_PY`` would be (a session of its own in the job's
    folder, output to its log, only the job's locks open, default signal handling, the job's
    environment and script), then run the wrapper."""
    import runpy

    os.setsid()
    os.chdir(root)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        if int(name) > 2 and int(name) not in keep:
            with _suppress(OSError):  # (the listing's own, closed already)
                os.close(int(name))
    for number in signal.valid_signals():
        if callable(signal.getsignal(number)):
            signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    log.handlers.clear()
    log.setLevel(logging.NOTSET)
    os.environ.clear()
    os.environ.update(env)
    globals()["__file__"] = str(root / STACKOPS_COPY)  # the same bytes: the job's own copy
    _DETACHED.clear()
    script = argv[1]
    sys.argv[:] = [script]
    sys.path[:] = [*([] if getattr(sys.flags, "safe_path", False)
                     else [os.path.dirname(os.path.realpath(script))]), *_FORK_BASE[1]]
    runpy.run_path(script, run_name="__main__")


# -- fire: one way to start a job, a sweep's jobs or an array, where they are ------------------

def fire_jobs(roots: list[Path], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the jobs in folders ``roots`` (one job, a sweep's jobs in order, or an array), on
    this machine, after the checks any folder of ours gets (the jobs' parent folder and the state
    folder must be yours alone). How depends on the first job's config: Slurm takes a job or an
    array with one sbatch; an interactive job starts in tmux; a job that takes no slot starts at
    once; the rest join the machine's queue as entries (``after/`` for a job with parents), in
    order, and its dispatcher starts them as slots free up. Each job's start and the environment
    it runs with (``env``, default this process's) are recorded in its folder. Returns what
    started: ``{"pid": ...}`` (the dispatcher's, or the job's own) or ``{"slurm_id": ...}``."""
    if not roots:
        return {}
    first = FileManager.from_job_root(roots[0])
    config = _read_json(roots[0] / CONFIG_JSON)
    _trusted_dir(roots[0].parent, "base folder")
    for root in roots:
        _check_job_folder(root)
    if config.get("launch_method") == "slurm":
        return _fire_slurm(roots[0], first, config)
    _record_fire_env(roots, env)
    logind = _logind()
    if logind.get("kill_at_logout"):  # said once at submit (the answer) and in each status
        warning = ("this host ends your processes when you log out, and the job with them"
                   + (f": {logind['fix']}" if logind.get("fix") else ""))
        for root in roots:
            _record(root, warning=warning)
        return dict(_fire_started(roots, first, config), warning=warning)
    return _fire_started(roots, first, config)


def _fire_started(roots: list[Path], first: FileManager, config: dict[str, Any]) -> dict[str, Any]:
    """fire_jobs' start proper, once the jobs' folders and environment are in order."""
    if config.get("interactive"):
        return _fire_tmux(roots[0], first)
    if not first.lock_resources:
        return {"pid": [_start_now(root, first.python) for root in roots][-1]}
    return _fire_queue(roots, first, bool(config.get("after")))


def _check_job_folder(root: Path) -> None:
    """A job folder must be a real folder (not a link) of yours that nobody else may change."""
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        raise StackopsError(f"no job folder at {collapse_home(root)}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ConfigError(f"refusing job folder {collapse_home(root)}: not a private folder of "
                          "yours", hint="folders others could change are never run")


def _record_fire_env(roots: list[Path], env: dict[str, str] | None) -> None:
    """The environment the jobs start with, written once (a sweep's jobs link to one copy)."""
    data = {os.fsencode(k): os.fsencode(v) for k, v in env.items()} if env else dict(os.environb)
    data.pop(b"PWD", None)
    text = b"".join(key + b"=" + value + b"\0" for key, value in data.items())
    shared = roots[0].parent / os.readlink(roots[0] / "python").split("/")[1] \
        if os.path.islink(roots[0] / "python") else None
    if shared is None or len(roots) == 1:
        for root in roots:
            _write_plain(root / FIRE_ENV, text)
        return
    _write_plain(shared / "data" / "fire_env", text)
    for root in roots:
        with _suppress(FileExistsError):
            os.symlink(f"../../{shared.name}/data/fire_env", root / FIRE_ENV)


def _fire_queue(roots: list[Path], first: FileManager, after: bool) -> dict[str, Any]:
    """Each job becomes an entry of its pool's queue (or of ``after/``), recorded as waiting, in
    order (consecutive tickets); then the queue's dispatcher is made sure of. A state folder
    that cannot be trusted ends the jobs failed at once, saying why (they never run)."""
    slots = first.slots()
    try:
        slots._ensure()
    except StackopsError as exc:
        for root in roots:
            if read_state(root).get("status") not in (None, "prepared"):
                continue  # started before (a start again): not this fire's to end
            ended = _record_end(root, "failed", f"not started: {exc}")
            if ended is not None:
                _report_end(root, ended, inline=False)
        raise
    folder = slots.root / (AFTER_DIR if after else "queue")
    ticket = time.time_ns()
    node, machine = os.uname().nodename, machine_key()
    for index, root in enumerate(roots):
        entry = folder / f"{ticket + index:019d}-{root.name}"

        def join(state: dict[str, Any], entry: Path = entry, root: Path = root) -> bool:
            if state.get("status") not in (None, "prepared") or state.get("cancel"):
                raise ConfigError(f"job {root.name} was already started ({state.get('status')})",
                                  hint=f"{_prog()} rerun {root.name} runs it again")
            _write_plain(entry, str(root))  # under the record's lock: one truth at every moment
            state.update(status="waiting", entry=str(entry), machine=machine, node=node,
                         fired=_iso(_utcnow()))
            return True

        _update(root, join)
    return {"pid": slots.ensure_dispatcher()}


WITHDRAWN = "not started: its submission was interrupted"


def _withdraw_fire(roots: list[Path]) -> bool:
    """A fire broken off (Ctrl-C, the submitting process failing): each of its jobs that has not
    started is withdrawn: marked cancelled (no dispatcher starts it), its queue entry taken out, a
    wrapper that took it meanwhile stopped, its end recorded cancelled. Returns whether any job of
    it started: that one goes on, seen by every view, beside the withdrawn ones (when none did,
    the caller may remove them all). A second Ctrl-C waits until this is done."""
    with _Uninterrupted():
        entries = _entries_of([root.name for root in roots], roots[0] if roots else None)
        started = False
        for root in roots:
            if not os.path.exists(root / STATE_JSON):
                continue  # never written whole: nothing of it can start

            def mark(state: dict[str, Any], root: Path = root) -> bool:
                if state.get("started") or state.get("status") not in _NOT_STARTED:
                    return False
                state.setdefault("cancel", WITHDRAWN)
                entries.setdefault(root.name, []).append(Path(state.pop("entry", None) or root))
                return True

            state = _update(root, mark)
            if state.get("started") or state.get("status") not in _NOT_STARTED:
                started = True
                continue
            for entry in entries.get(root.name, []):
                if entry != root:
                    with _suppress(FileNotFoundError):
                        os.unlink(entry)
            if _alive(root):
                _stop(root, 2.0)
            ended = _record_end(root, "cancelled", WITHDRAWN)
            if ended is not None:
                _report_end(root, ended, inline=False)
        return started


_NOT_STARTED = (None, "prepared", "queued", "waiting")


def _entries_of(names: list[str], root: Path | None) -> dict[str, list[Path]]:
    """The entries of jobs ``names`` in the queue (and after/) of the job in ``root``: an entry
    written before its job's record said so is found too."""
    found: dict[str, list[Path]] = {}
    if root is None:
        return found
    with _suppress(OSError, StackopsError):
        slots = FileManager.from_job_root(root).slots()
        wanted = set(names)
        for folder in (slots.queue, slots.root / AFTER_DIR):
            for entry in os.listdir(folder) if folder.is_dir() else []:
                name = entry.split("-", 1)[-1]
                if name in wanted:
                    found.setdefault(name, []).append(folder / entry)
    return found


def _start_now(root: Path, python: str) -> int:
    """A job that takes no slot: its wrapper starts at once, holding the job's lock."""
    _record(root, status="queued", machine=machine_key(), node=os.uname().nodename,
            fired=_iso(_utcnow()))
    child = _spawn_wrapper(root, python, _fire_env(root))
    if child is None:
        raise ConfigError(f"job {root.name} runs already")
    return child.pid


def _fire_tmux(root: Path, manager: FileManager) -> dict[str, Any]:
    """An interactive job: its wrapper in a tmux session named after it (a person can attach),
    output also into its log; with a slot it waits in line in person. Returns once the wrapper
    holds the job's lock (or has ended)."""
    session = tmux_session_name(manager.job_id)
    why = ""
    if shutil.which("tmux") is None:
        why = "interactive jobs need tmux, which is not installed"
    elif subprocess.run(["tmux", "has-session", "-t", f"={session}:"], capture_output=True,
                        stdin=subprocess.DEVNULL).returncode == 0:
        why = f"tmux session {session} is taken"
    if why:
        _record_end(root, "failed", why)
        raise ConfigError(f"job {manager.job_id} was not started: {why}")
    entry = ""
    if manager.lock_resources:
        entry = str(manager.slots().queue / f"{time.time_ns():019d}-{manager.job_id}")
    _record(root, status="waiting" if entry else "queued", entry=entry or None,
            machine=machine_key(), node=os.uname().nodename, starting=_iso(_utcnow()))
    env = [f"{key}={value}" for key, value in _fire_env(root).items() if key in TMUX_PASSED_ENV]
    argv = ["tmux", "new-session", "-d", "-s", session, "env", *env,
            os.path.expanduser(manager.python), "-i", str(root / WRAPPER_PY)]
    if subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode != 0:
        _record_end(root, "failed", f"tmux could not start session {session}")
        raise StackopsError(f"job {manager.job_id} was not started: tmux failed")
    subprocess.run(["tmux", "pipe-pane", "-t", f"={session}:", "-o",
                    f"cat >> {shlex.quote(str(root / OUTPUT_LOG))}"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not _alive(root) \
            and read_state(root).get("status") not in TERMINAL_STATUSES:
        time.sleep(0.02)
    pane = subprocess.run(["tmux", "display-message", "-p", "-t", f"={session}:", "#{pane_pid}"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.strip()
    return {"pid": int(pane) if pane.isdigit() else None}


# -- Slurm: sbatch where the job was submitted, and what Slurm says of its jobs ------------------

def _fire_slurm(root: Path, manager: FileManager, config: dict[str, Any]) -> dict[str, Any]:
    """sbatch the job (an array: every task at once) from its folder; Slurm's id is recorded in
    the job's and each task's record. A refusal by sbatch ends the job (and its tasks) failed at
    once, with sbatch's own words."""
    if shutil.which("sbatch") is None:
        raise ConfigError(f"no sbatch on {os.uname().nodename}: is it a Slurm login node?")
    tasks = list(read_state(root).get("tasks") or [])
    done = _run_bounded(["sbatch", "--parsable", SBATCH_SH], 120.0, cwd=root)
    folders = [root] + [root.parent / task for task in tasks]
    if done.returncode != 0 or not done.stdout.strip():
        why = _tail(done.stderr, 3) or "sbatch failed"
        for folder in folders:
            _record_end(folder, "failed", f"sbatch refused it: {why}")
        raise CommandError(os.uname().nodename, "sbatch", done.returncode, why)
    slurm_id = done.stdout.strip().splitlines()[-1].split(";")[0]
    node = os.uname().nodename
    _record(root, status="queued", slurm={"id": slurm_id}, node=node, fired=_iso(_utcnow()))
    for k, task in enumerate(tasks):
        _record(root.parent / task, status="queued", slurm={"id": f"{slurm_id}_{k}"}, node=node)
    return {"slurm_id": slurm_id}


def _slurm_views(ids: set[str]) -> dict[str, dict[str, Any] | None]:
    """What Slurm says of jobs ``ids`` ("123" or array tasks "123_4"), one ``scontrol`` call per
    job or array (an array of 1,000 tasks is one call): {id: view or None (unknown to Slurm)}.
    A controller that does not answer raises (nothing is decided from silence)."""
    views: dict[str, dict[str, Any] | None] = {}
    for base in sorted({slurm_id.split("_")[0] for slurm_id in ids}):
        done = _run_bounded(["scontrol", "show", "job", "-o", base], SLURM_TIMEOUT)
        if done.returncode != 0 and "Invalid job id" not in done.stderr + done.stdout:
            raise StackopsError(f"Slurm did not answer: {_last_line(done.stderr or done.stdout)}")
        for line in done.stdout.splitlines():
            views.update(_slurm_view_of(line))
        views.setdefault(base, views.get(base))
    return {slurm_id: views.get(slurm_id) for slurm_id in ids}


def _slurm_view_of(line: str) -> dict[str, dict[str, Any]]:
    """The view(s) in one line of ``scontrol show job -o``: a job, an array task, or several
    pending tasks of an array at once (``ArrayTaskId=2-7%3``)."""
    fields = dict(re.findall(r"(\w+)=(\S*)", line))
    if "JobId" not in fields:
        return {}
    view = {"state": fields.get("JobState", "?"), "reason": fields.get("Reason", ""),
            "exit": fields.get("ExitCode", ""), "restarts": int(fields.get("Restarts") or 0)}
    array, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId", "")
    if not array:
        return {fields["JobId"]: view}
    found = {}
    for part in tasks.split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit():
            for k in range(int(low), int(high or low) + 1):
                found[f"{array}_{k}"] = view
    return found


def _combine(reports: list[JobStatus], parent: JobStatus) -> JobStatus:
    """One status for a whole array (or set of jobs): running while any task runs, queued while
    the rest wait, and at the end completed only if every task completed; the counts in the
    reason agree with the tasks' own statuses, since they are the same reports."""
    counts = {status: sum(task.status == status for task in reports) for status in STATUSES}
    unfinished = [task for task in reports if not task.finished]
    if unfinished:
        status = "running" if counts["running"] or len(unfinished) < len(reports) else "queued"
    elif counts["completed"] == len(reports):
        status = "completed"
    else:
        status = "failed" if counts["failed"] else "cancelled"
    errors = [f"task {task.job_id}: {task.status}: {_last_line(task.error_message)}"
              for task in reports if task.status in ("failed", "cancelled")]
    starts = [task.start_time for task in reports if task.start_time]
    ends = [task.end_time for task in reports if task.end_time]
    summary = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    return dataclasses.replace(parent, status=status, start_time=min(starts) if starts else None,
                               end_time=max(ends) if not unfinished and ends else None,
                               error_message="\n".join(errors),
                               reason=f"{len(reports)} tasks: {summary}",
                               log_tail="\n".join(t.log_tail for t in reports if t.log_tail),
                               results_path=parent.results_path if status == "completed" else None)


# -- what the executing side answers: the judged state of many jobs at once ----------------------

def judge_jobs(roots: list[Path]) -> list[dict[str, Any]]:
    """Each job's state now (see _judge), for many jobs in one go: Slurm is asked once per job
    or array, a queue with jobs in line gets its dispatcher made sure of (once)."""
    return _judge_records(roots, [read_state(root) for root in roots])


def _judge_records(roots: Sequence[Path | str],
                   states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """judge_jobs of jobs whose records were read (``states``, read_state's)."""
    asked = {str(s["slurm"]["id"]) for s in states
             if isinstance(s.get("slurm"), dict) and s["slurm"].get("id") and not s.get("tasks")
             and not (s.get("status") in TERMINAL_STATUSES and s.get("final", True))}
    views: dict[str, Any] = {}
    silent = ""
    if asked:
        try:
            views = _slurm_views(asked)
        except StackopsError as exc:
            silent = str(exc)
    judged = []
    pools = set()
    listed = _listed({state["entry"].rpartition("/")[0] for state in states
                      if state.get("status") == "waiting" and state.get("entry")})
    here = machine_key()
    for root, state in zip(roots, states):
        sid = str((state.get("slurm") or {}).get("id") or "")
        view = views.get(sid, False)
        current = _judge(root, state, view, listed, here)
        if silent and sid and view is False:
            current = dict(current, reason=silent)
        if current.get("status") == "waiting" and current.get("entry") and not current.get("as_of"):
            pools.add(current["entry"].rsplit("/", 2)[0])  # a queue of this machine's only
        judged.append(current)
    for pool in pools:
        with _suppress(OSError, StackopsError):
            Slots(Path(pool)).ensure_dispatcher(view=True)
    return judged


def _listed(folders: set[str]) -> frozenset[str]:
    """The paths of the entries in queue ``folders`` now (each listed once, not each stat'ed;
    the listing _place_in then reads its places from)."""
    return frozenset(f"{folder}/{name}" for folder in folders for name in _listing(folder))


def job_reports(roots: list[Path], log_lines: int = 0) -> list[JobStatus]:
    """The JobStatus of each folder in ``roots`` (an array's: its tasks combined), judged there."""
    judged = judge_jobs(roots)
    reports = []
    for root, state in zip(roots, judged):
        report = _job_status(root, state, log_lines)
        tasks = state.get("tasks")
        if tasks:
            parts = job_reports([root.parent / task for task in tasks], 0)
            report = _combine(parts, report)
        reports.append(report)
    return reports


# -- cancel and delete, where the job is ---------------------------------------------------------

def cancel_job(root: Path, grace: float = 10.0) -> dict[str, Any]:
    """Cancel the job in ``root`` where it runs: mark it, take it out of the queue (a job that
    never started ends cancelled at once), ``scancel`` a Slurm job, else SIGTERM its process
    group (only while the job's lock is held, so only its own processes), SIGKILL what is left
    after ``grace`` seconds, and record ``cancelled`` if the job could not. Returns the record
    after, with ``was`` the status it had (an ended job is left as it was)."""
    return _cancel(root, _mark_cancel(root), grace)


def _cancel(root: Path, marked: dict[str, Any], grace: float) -> dict[str, Any]:
    """cancel_job of a job marked by _mark_cancel (``marked``, its record then)."""
    state = dict(marked)
    ours = state.pop("ours", True)  # (False: another cancel marked it first)
    if _ended(state):
        return state
    asked, was = state["cancel"], state.pop("was")

    def mark(record: dict[str, Any]) -> bool:
        return "cancel" not in record and bool(record.update(cancel=asked) or True)

    tasks = [root.parent / task for task in state.get("tasks") or []]
    for task in tasks:  # an array's tasks: one scancel for them all, below
        _update(task, mark)
    if (state.get("slurm") or {}).get("id"):
        done = _run_bounded(["scancel", str(state["slurm"]["id"])], SLURM_TIMEOUT)
        if done.returncode != 0:
            raise CommandError(os.uname().nodename, "scancel", done.returncode, done.stderr)
    else:
        _check_runs_here(root, state)  # (fired elsewhere meanwhile)
        with _suppress(FileNotFoundError):
            os.unlink(state.get("entry") or root / ".no-entry")
        _stop(root, grace)
        state = read_state(root)
    for folder in [*tasks, root]:
        ended = _record_end(folder, "cancelled", f"cancelled ({state['cancel']})")
        if ended is not None:
            _report_end(folder, ended, inline=False)
    after = read_state(root)
    if not ours and _ended(after):  # another cancel marked it first: that one cancelled it
        was = after["status"]
    return dict(after, was=was)


def _mark_cancel(root: Path) -> dict[str, Any]:
    """Mark the job in ``root`` cancelled (the queue then never starts it) unless it has ended; its
    record after, ``was`` the status judged before. A job another machine runs is refused first."""
    before = read_state(root)
    if before.get("unreadable"):  # damaged: it runs while its process holds its lock
        before = _judge(root, before)
    if _ended(before):
        return dict(before, was=before["status"])
    if not (before.get("slurm") or {}).get("id"):
        _check_runs_here(root, before)
    was = _judge(root, before).get("status")
    asked = f"asked {_iso(_utcnow())}"
    ours: list[bool] = []

    def mark(record: dict[str, Any]) -> bool:
        if "cancel" in record:  # another cancel asked first
            return False
        record["cancel"] = asked
        ours.append(True)
        return True

    return dict(_update(root, mark), was=was, ours=bool(ours))


def _check_runs_here(root: Path, state: dict[str, Any]) -> None:
    """Refuse to act on the processes of a job that another machine runs (a shared home)."""
    if state.get("machine") not in (None, machine_key()):
        raise StackopsError(f"job {root.name} runs on {state.get('node')}, not here",
                            hint="cancel it from there (or through --host)")


def _stop(root: Path, grace: float) -> None:
    """SIGTERM the job's process group while the job's lock is held (its processes, and only
    while they live: the group's id cannot be taken by another while any of them does), then
    SIGKILL after ``grace`` seconds, saying so in the record's cancel mark first; what the job
    left running outside its group, holding its lock, is told the same, once the group is gone;
    returns once the lock is free (at most a few seconds more)."""
    deadline = time.monotonic() + grace
    sent: list[int] = []
    told: set[int] = set()
    while _alive(root):
        pgid = read_state(root).get("pgid")
        late = time.monotonic() > deadline
        if isinstance(pgid, int) and pgid > 1:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if sig not in sent and (sig == signal.SIGTERM or late):
                    if sig == signal.SIGKILL:
                        _update(root, _killed_mark)
                    with _suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, sig)
                    sent.append(sig)
        sig = signal.SIGKILL if late else signal.SIGTERM  # what it left (`cmd &`, setsid) holds
        if sent and sig not in told and (late or not _group_lives(int(pgid or 0))):  # its lock,
            told.add(sig)  # and its slot if its wrapper was killed: it goes with the job, told
            for pid in _lock_holders(f"{root}/{ALIVE_LOCK}"):  # as its group was (once each)
                with _suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        if late and time.monotonic() > deadline + 5.0:
            break
        time.sleep(0.05)


def _group_lives(pgid: int) -> bool:
    """Whether a process of group ``pgid`` lives, not a zombie (a wrapper that ended stays one
    until its starter, a notebook that fired it, reaps it: no telling when)."""
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():  # (none: no holders)
        with _suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _killed_mark(record: dict[str, Any]) -> bool:
    """A cancel mark completed with why SIGKILL followed (read by whoever records the end)."""
    record["cancel"] = f"{record.get('cancel') or 'asked'}; killed: it ignored SIGTERM for the " \
        "grace period"
    return True


def _deletable(status: str) -> bool:
    """Whether a job of ``status`` may be deleted: ended, or never fired."""
    return status in TERMINAL_STATUSES or status == "prepared"


def delete_job(root: Path) -> str:
    """Remove an ended job's folder where it ran: only a real job folder (not a link), never one
    whose job has not ended. The shared folder of a sweep or array goes with its last job.
    Returns what was removed (``~/...``)."""
    if root.is_symlink() or not (root / FILE_MANAGER_JSON).is_file():
        if not os.path.lexists(root):
            return ""
        raise ConfigError(f"{collapse_home(root)} is not a stackops job folder; nothing deleted")
    state = judge_jobs([root])[0]
    status = state.get("status") or "prepared"
    if not _deletable(status):
        raise ConfigError(f"job {root.name} is {status}; cancel it before deleting it",
                          hint=f"{_prog()} cancel {root.name}")
    _remove_job_folder(root)
    return collapse_home(root)


def _remove_job_folder(root: Path) -> None:
    """Remove an ended job's folder, once its last process has ended (5 s at most); it leaves its
    sweep first, and the sweep's shared folder goes with its last job."""
    deadline = time.monotonic() + 5  # an ended job's wrapper may still be finishing (its report):
    while _alive(root) and time.monotonic() < deadline:  # removed under it, it would end failed,
        time.sleep(0.02)  # and its dispatcher would take a new job of its id for it
    ids = _leave_sweep(root)
    shutil.rmtree(root)
    if ids is not None and not any(os.path.lexists(root.parent / other) for other in ids[1]):
        shutil.rmtree(ids[0], ignore_errors=True)


def _leave_sweep(root: Path) -> tuple[Path, list[str]] | None:
    """A deleted job leaves its sweep's members (no view then counts it as gone missing). Returns
    (the sweep's folder, the ids left), or None for a job of no sweep."""
    if not os.path.islink(root / "python"):
        return None
    shared = root.parent / os.readlink(root / "python").split("/")[1]
    if not (shared / SWEEP_JSON).is_file():
        return None

    def leave(record: dict[str, Any]) -> None:
        _not_submitting(root, record)
        record["ids"] = [other for other in record.get("ids") or [] if other != root.name]

    return shared, _change_sweep(shared, leave)["ids"]


def _submitter(record: dict[str, Any]) -> int | None:
    """The pid of the process that submits a sweep (its record's "submitting" mark), while it
    lives on this machine (one elsewhere is not judged here), in this home (the copy of the
    mark a host is sent names the submitter's); None once the submission is over."""
    machine, pid, start, *home = record.get("submitting") or [None, None, None]
    if machine == machine_key() and isinstance(pid, int) and start is not None \
            and home[:1] in ([], [os.path.expanduser("~")]) and is_job_process(pid, "", start):
        return pid
    return None


def _not_submitting(root: Path, record: dict[str, Any]) -> None:
    """Refuse to delete a member of a sweep still being submitted (its submission would fail on
    the folder gone, and be rolled back whole)."""
    pid = _submitter(record)
    if pid is not None:
        sweep = record.get("sweep_id")
        what = f"sweep {sweep}" if root.name == sweep else \
            f"job {root.name} is a member of sweep {sweep}, which"
        raise ConfigError(f"{what} is still being submitted (by pid {pid}); nothing deleted",
                          hint="wait for the submission to end, then delete it (or stop the "
                               f"submission: Ctrl-C in pid {pid} withdraws what it has not "
                               "started)")


def _change_sweep(shared: Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """A sweep's record (``sweep.json`` in its folder ``shared``) changed under its lock."""
    with _FileLock(shared / SWEEP_JSON.replace(".json", ".lock")):
        record = _read_json(shared / SWEEP_JSON)
        change(record)
        _atomic_write_json(shared / SWEEP_JSON, record)
    return record


def _is_own_results(job_root: Path, job_id: str, path: Path) -> bool:
    real = Path(os.path.realpath(path))
    for base in (expand_home(f"{DEFAULT_RESULTS_DIR}/{job_id}"), job_root):
        if os.path.islink(base):  # a folder swapped for a link owns nothing it points into
            continue
        own = Path(os.path.realpath(base))
        if real == own or own in real.parents:
            return True
    return False


def delete_own_results(job_root: str | os.PathLike[str]) -> str:
    """Delete a finished job's results folder, only when it is the job's own (its default results
    folder or inside its job folder); whatever path the job returned, nothing else is touched."""
    root = Path(job_root)
    state = read_state(root)
    recorded = state.get("results") or ""
    if not recorded:
        raise StackopsError(f"job {root.name} has no results yet ({state.get('status')})")
    results = expand_home(recorded)
    if not _is_own_results(root, root.name, results):
        raise ConfigError(f"refusing to delete {recorded}: it is not job {root.name}'s own "
                          "results folder", hint="delete it yourself if you are sure")
    _remove(results)
    return recorded


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def demo_job(seconds: float = 1.0, message: str = "hello from stackops") -> str:
    """A small real job for trying stackops out: waits, then writes a results folder."""
    folder = expand_home(f"{DEFAULT_RESULTS_DIR}/demo-{os.getpid()}")
    _mkdir_private(folder)
    time.sleep(seconds)
    (folder / "message.txt").write_text(f"{message}\nhost={os.uname().nodename} "
                                        f"pid={os.getpid()}\n")
    return str(folder)


# -- the executing machine's half of a hand-over -------------------------------------------------
#
# A hand-over is one conversation with serve() on the host (one shell start): the request says
# what the job needs (the snapshot's blobs, the data files with their sizes and times, whether the
# host sees a nonce file of this machine: a shared home); the host answers its plan (what it
# lacks, and facts: its node, python, sbatch, logind); this machine sends what is missing as
# parts (a line, then the bytes), and the host puts each in place: blobs into the snapshot store
# (each checked against its hash), data files each replaced whole, the job folder (and a sweep's
# or array's members) staged and renamed into place with the job's own copy of its code, every
# file of it checked against the manifest's hash as it is copied; a blob found damaged there is
# asked for again. Then, in the same conversation, the job can be fired.

def _store() -> Path:
    """This machine's snapshot store, used only when it is yours alone (as any folder of ours)."""
    return _trusted_dir(expand_home(DEFAULT_SNAPSHOT_DIR), "snapshot store")


def _blob(store: Path, digest: str) -> Path:
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError(f"refusing the blob name {digest!r}")
    return store / "blobs" / digest[:2] / digest


def _handover_plan(request: dict[str, Any]) -> dict[str, Any]:
    """What this machine lacks for a job (blobs, data files), whether it sees the sender's files
    (its nonce) and whether the job exists here already; with facts about this machine. A base
    folder that is not yours alone is refused here, before anything is sent."""
    store = _store()
    _trusted_dir(expand_home(request["job_root"]).parent, "base folder")
    wanted = list(request.get("blobs") or [])
    manifest = store / f"{_safe_relative(request['snapshot'])}.json" if request.get("snapshot") \
        else None
    if manifest is not None and manifest.exists():  # a snapshot it has whole: only its use checks
        os.utime(manifest)
        wanted = []
    missing = []
    for digest in dict.fromkeys(wanted + list(request.get("folder_blobs") or [])):
        try:
            os.utime(_blob(store, digest))  # in use again: a collection leaves it alone
        except FileNotFoundError:
            missing.append(digest)
    seen = [nonce for nonce in request.get("nonces") or [] if expand_home(nonce).exists()]
    roots = [expand_home(root) for root in request.get("roots") or [request["job_root"]]]
    return {"missing": missing, "seen": seen, "node": os.uname().nodename,
            "data": [_data_plan(item) for item in request.get("data") or []],
            "exists": [collapse_home(root) for root in roots if os.path.lexists(root)],
            "facts": _facts(request.get("facts") or [])}


def _facts(wanted: list[str]) -> dict[str, Any]:
    """What the client asked to know of this machine: its Python, whether it has sbatch (or
    another command), its GPUs, its CPUs and memory."""
    facts: dict[str, Any] = {"python": ".".join(map(str, sys.version_info[:3])),
                             "executable": sys.executable}
    for name in wanted:
        if name == "gpus":
            facts["gpus"] = gpu_ids()
        elif name == "specs":
            facts["specs"] = _local_specs()
        elif name.startswith("command:"):
            facts[name] = shutil.which(os.path.expanduser(name[8:])) is not None
        elif name.startswith("exists:"):
            facts[name] = os.path.lexists(expand_home(name[7:]))
        elif name.startswith("rclone:"):
            listed = _run_bounded(["rclone", "listremotes"], 30.0) if shutil.which("rclone") \
                else None
            remote = name[7:].split(":", 1)[0] + ":"
            facts[name] = listed is not None and remote in listed.stdout.split()
    return facts


def _local_specs() -> dict[str, Any]:
    """This machine's OS, CPUs, memory, Python, home and user (SSH.remote_specs; the cluster's
    load calculators read the CPUs and memory)."""
    memory = 0
    with _suppress(OSError, StopIteration, ValueError, IndexError), open("/proc/meminfo") as handle:
        line = next(line for line in handle if line.startswith("MemTotal:"))
        memory = int(line.split()[1]) * 1024
    if not memory:
        with _suppress(ValueError, OSError, AttributeError):
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    uname = os.uname()
    return {"os": uname.sysname, "release": uname.release, "machine": uname.machine,
            "hostname": uname.nodename, "cpu_count": os.cpu_count(), "memory_bytes": memory,
            "python": sys.executable, "python_version": ".".join(map(str, sys.version_info[:3])),
            "home": os.path.expanduser("~"),
            "user": os.environ.get("USER") or os.environ.get("LOGNAME") or ""}


def _receive(stream: Any, size: int, path: Path, mode: int, digest: str | None = None,
             mtime_ns: int | None = None) -> Path:
    """Read exactly ``size`` bytes into a hidden temp file beside ``path`` (checked against
    ``digest`` if given); returns it, for the caller to rename into place."""
    import hashlib

    temp = path.parent / f".{path.name}.{os.urandom(6).hex()}.stackops"
    hasher = hashlib.sha256() if digest else None
    try:
        with open(temp, "xb") as handle:
            left = size
            while left:
                chunk = stream.read(min(left, 1 << 20))
                if not chunk:
                    raise EOFError("the hand-over broke off")
                handle.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                left -= len(chunk)
        if hasher is not None and hasher.hexdigest() != digest:
            raise TransferError(f"blob {digest} arrived damaged: the file changed while it was "
                                "sent", hint="submit again once the repo is saved")
        os.chmod(temp, mode)
        if mtime_ns is not None:
            os.utime(temp, ns=(mtime_ns, mtime_ns))
    except BaseException:
        with _suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return temp


def _receive_parts(request: dict[str, Any], staging: Path, stream: Any) -> None:
    """The parts that follow a header, up to the end line: blobs into the store, data files into
    place, the job folder's files into ``staging``."""
    store = _store()
    while True:
        line = stream.readline()
        if not line:
            raise EOFError("the hand-over broke off")
        part = json.loads(line)
        if part.get("end"):
            return
        kind, _, name = part["name"].partition("/")
        if kind == "b":
            path = _blob(store, name)
            _mkdir_private(path.parent)
            os.replace(_receive(stream, part["size"], path, 0o600, name), path)
        elif kind == "d":
            index, _, relative = name.partition("/")
            item = request["data"][int(index)]
            target = expand_home(item["target"])
            path = target / _safe_relative(relative) if item["dir"] else target
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(_receive(stream, part["size"], path, part["mode"] & 0o777, None,
                                part["mtime_ns"]), path)
        elif part.get("dir"):
            _mkdir_private(staging / _safe_relative(name))
        elif part.get("link"):
            os.symlink(part["link"], staging / _safe_relative(name))
        elif part.get("blob"):  # a file of the job folder the store holds (stackops): copied here
            path = staging / _safe_relative(name)
            _mkdir_private(path.parent)
            _copy_verified(str(_blob(store, part["blob"])), str(path), part["blob"],
                           part["mode"] & 0o700)
        else:
            path = staging / _safe_relative(name)
            _mkdir_private(path.parent)
            os.rename(_receive(stream, part["size"], path, part["mode"] & 0o700), path)


def _handover_commit(request: dict[str, Any], header: dict[str, Any], stream: Any,
                     say: Callable[[dict[str, Any]], None]) -> list[Path]:
    """Take the parts, give the job (or the sweep's shared folder) its code, put it in place, and
    write the members of a sweep or array; a damaged blob met on the way is asked for again
    (``say``), at most twice. Returns the job folders written (nothing is left on a failure)."""
    store = _store()
    root = expand_home(request["job_root"])
    _trusted_dir(root.parent, "base folder")

    def taken() -> Exception:
        return ConfigError(f"job {root.name!r} already exists at {collapse_home(root)}",
                           hint="choose another job_id, or leave it out for a fresh one")

    if os.path.lexists(root):
        raise taken()
    with _Staged(root, exists=taken) as made:
        staging = Path(made)
        _receive_parts(request, staging, stream)
        entries = header.get("manifest")  # None: no copy of the repo; []: an empty repo's
        blobs = {value: str(_blob(store, value)) for _, kind, value in entries or [] if kind != "l"}
        for _ in range(3):
            try:
                if entries is not None:  # a snapshot, empty or not
                    _materialize(entries, blobs, staging / CODE_DIR)
                break
            except _SnapshotMismatchError as exc:  # a blob of the store damaged: sent again
                _remove(_blob(store, exc.digest))
                say({"resend": [exc.digest]})
                _receive_parts(request, staging, stream)
        else:
            raise TransferError("the snapshot store keeps damaging blobs",
                                hint="check the host's disk")
        _keep_manifest(store, request.get("snapshot"), header.get("manifest"))
    return [root] + _place_members(root, header.get("members") or [])


def _keep_manifest(store: Path, snapshot: str | None, entries: list[Any] | None) -> None:
    if not snapshot or entries is None:
        return
    manifest = store / f"{_safe_relative(snapshot)}.json"
    if manifest.exists():
        os.utime(manifest)
    else:
        _write_plain(manifest, json.dumps(entries))


def _place_members(shared: Path, members: list[list[Any]]) -> list[Path]:
    """A sweep's or array's members beside its shared folder (see write_sweep_job); all or none."""
    written: list[Path] = []
    try:
        links = sweep_links(shared.parent, shared.name)
        for job_id, files in members:
            written.append(write_sweep_job(shared.parent, job_id, files, links))
    except BaseException:
        for root in written:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return written


def collect_snapshots(store: Path, queued: Path, keep_seconds: float) -> int:
    """At most once a day: remove the snapshots no job folder under ``queued`` refers to and
    older than ``keep_seconds``, then the blobs no remaining snapshot uses, as old."""
    stamp = store / ".collected"
    now = time.time()
    if stamp.exists() and now - stamp.stat().st_mtime < 86400:
        return 0
    _write_plain(stamp, "")
    used = set()
    for name in os.listdir(queued):
        with _suppress(OSError, ValueError, AttributeError, StackopsError):
            used.add(_read_json(queued / name / JOB_PARAMS_JSON).get("code_snapshot"))
    removed, keep = 0, set()  # type: ignore[var-annotated]
    for path in store.glob("*.json"):
        if path.stem not in used and now - path.stat().st_mtime > keep_seconds:
            path.unlink()
            removed += 1
            continue
        with _suppress(OSError, ValueError):
            keep.update(value for _, kind, value in json.loads(path.read_text()) if kind != "l")
    for path in store.glob("blobs/*/*"):
        if path.name not in keep and now - path.stat().st_mtime > keep_seconds:
            path.unlink()
    return removed


# -- sweeps and arrays: the members beside a shared folder -------------------------------------
# A sweep is many jobs of one function, one per line of kwargs; a Slurm array is many tasks of one
# job, one per slice of the workload. What they have in common (this file, the wrapper, the code
# snapshot, the job parameters and config) is in one folder named after the sweep or array,
# {base}/queued/<id>; each member's folder <id>-K beside it holds its own files (kwargs,
# file_manager.json, its record, logs) and relative links to the shared parts. The links keep every
# path a job is known by the same as for any other job.

SWEEP_JSON = "data/sweep.json"  # in the shared folder: its id and its members' ids
_SWEEP_SHARED = ("python", "shell", CODE_DIR, JOB_PARAMS_JSON, CONFIG_JSON, INSTANCE_PICKLE,
                 CODE_MANIFEST_JSON)


def sweep_links(queued: Path, sweep_id: str) -> dict[str, str]:
    """The links a member folder of ``sweep_id`` holds: {its path: the relative target}, for
    each shared part the shared folder has."""
    shared = queued / sweep_id
    links = {}
    for relative in _SWEEP_SHARED:
        if os.path.lexists(shared / relative):
            up = "../" * relative.count("/")
            links[relative] = f"{up}../{sweep_id}/{relative}"
    return links


def write_sweep_job(queued: Path, job_id: str, files: dict[str, str],
                    links: dict[str, str]) -> Path:
    """One member folder, put in place whole (built under a hidden name, then renamed): ``files``
    (relative path: text) and ``links`` (see sweep_links) to the shared parts it has no file of
    its own for (an array task has its own config). A folder of that name that exists already
    is an error, never replaced. Plain string paths: a sweep writes thousands."""
    root = os.path.join(queued, check_safe_name(job_id))

    def taken() -> Exception:
        return ConfigError(f"job {job_id!r} already exists at {collapse_home(root)}")

    if os.path.lexists(root):
        raise taken()
    with _Staged(root, exists=taken) as staging:
        for folder in (f"{staging}/data", f"{staging}/logs"):
            os.mkdir(folder, 0o700)
        for relative, target in links.items():
            if relative not in files:
                os.symlink(target, f"{staging}/{relative}")
        for relative, text in files.items():
            _write_new(f"{staging}/{relative}", text)
    return Path(root)


# ============================================================================================
# 9. network helpers: local addresses, the LAN address, the public IP and its rotation
# ============================================================================================

DEFAULT_PUBLIC_IP_URL = "https://ipinfo.io/json"
_VIRTUAL_IFACE = _LazyPattern(
    r"(lo|loopback|docker\d*|br-.*|veth.*|virbr.*|bridge.*|vboxnet.*|vmnet.*|zt.*|ham.*|"
    r"tailscale.*|wg\d*|utun\d*|llw\d*|awdl\d*|tun\d*|tap\d*|cloudflarewarp.*|warp.*)",
    re.IGNORECASE)
_PHYSICAL_IFACE = _LazyPattern(r"(eth\d*|en\d*|enp.*|ens.*|eno.*|wlan\d*|wl.*|"
                               r".*wifi.*|.*ethernet.*)", re.IGNORECASE)
_NOISY_NETWORKS = ("100.64.0.0/10", "172.17.0.0/16", "172.18.0.0/16", "172.19.0.0/16",
                   "192.168.49.0/24", "10.0.2.0/24")


@_model(frozen=True)
class InterfaceAddress:
    """One IPv4 address of a local interface, with what the LAN choice looks at."""

    interface: str
    ipv4_address: str
    mac_address: str | None = None
    is_up: bool = True
    broadcast: str | None = None
    speed: int = 0  # Mbit/s, 0 when unknown


def _normalise_mac(text: str | None) -> str | None:
    parts = (text or "").strip().replace("-", ":").lower().split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-f]{1,2}", p) for p in parts):
        return None
    mac = ":".join(p.zfill(2) for p in parts)
    return None if mac == "00:00:00:00:00:00" else mac


def _table_from_psutil(psutil: Any) -> list[InterfaceAddress]:
    import socket

    link_families = {getattr(psutil, "AF_LINK", None), getattr(socket, "AF_PACKET", None)} - {None}
    stats = psutil.net_if_stats()
    rows = []
    for name, addresses in psutil.net_if_addrs().items():
        macs = (_normalise_mac(a.address) for a in addresses if a.family in link_families)
        mac = next((m for m in macs if m), None)
        stat = stats.get(name)
        for addr in addresses:
            if addr.family == socket.AF_INET and addr.address:
                # getifaddrs reports the address itself when no broadcast is set; iproute2 says none
                broadcast = addr.broadcast if addr.broadcast != addr.address else None
                speed = int(stat.speed) if stat and stat.speed else 0
                rows.append(InterfaceAddress(name, addr.address, mac, bool(stat and stat.isup),
                                             broadcast, speed))
    return rows


def _link_speed(name: str) -> int:
    try:
        return max(0, int(Path(f"/sys/class/net/{name}/speed").read_text().strip()))
    except (OSError, ValueError):
        return 0


def _table_from_ip_command() -> list[InterfaceAddress]:
    """The same table from ``ip -j addr`` (iproute2), for a copied file with no psutil."""
    try:
        done = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=10)
        links = json.loads(done.stdout or "[]")
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise DependencyError("cannot list the interfaces without psutil: ip -j addr failed "
                              f"({exc})",
                              hint="pip install psutil, or install iproute2") from exc
    rows = []
    for link in links:
        name, flags = link.get("ifname", ""), link.get("flags", [])
        for info in link.get("addr_info", []):
            if info.get("family") == "inet" and info.get("local"):
                rows.append(InterfaceAddress(name, info["local"],
                                             _normalise_mac(link.get("address")), "UP" in flags,
                                             info.get("broadcast"), _link_speed(name)))
    return rows


def interface_table() -> list[InterfaceAddress]:
    """Every local IPv4 address with its interface, MAC, state, broadcast and link speed."""
    psutil = _psutil()
    return _table_from_psutil(psutil) if psutil is not None else _table_from_ip_command()


def get_all_ipv4_addresses() -> list[tuple[str, str]]:
    """``(interface, ip)`` for every local IPv4 address, loopback included."""
    return [(row.interface, row.ipv4_address) for row in interface_table()]


def lan_score(row: InterfaceAddress, prefer_vpn: bool = False) -> float | None:
    """How much ``row`` looks like the machine's real LAN address; None when it is out of the race
    (down, loopback, link-local, or unless ``prefer_vpn``: virtual, or on a noisy network)."""
    import ipaddress

    try:
        ip = ipaddress.IPv4Address(row.ipv4_address)
    except ValueError:
        return None
    if not row.is_up or ip.is_loopback or ip.is_link_local:
        return None
    if not prefer_vpn and (_VIRTUAL_IFACE.fullmatch(row.interface)
                           or any(ip in ipaddress.ip_network(net) for net in _NOISY_NETWORKS)):
        return None
    score = 200.0 if _PHYSICAL_IFACE.fullmatch(row.interface) else 0.0
    score += 100.0 if row.broadcast is not None else 0.0
    if ip.is_private:
        for network, points in (("192.168.0.0/16", 90), ("10.0.0.0/8", 70), ("172.16.0.0/12", 50)):
            if ip in ipaddress.ip_network(network):
                score += points
                break
    else:
        score -= 50.0
    score += 20.0 if row.speed > 0 else 0.0
    return score - 0.01 * len(row.interface)


def choose_lan_ipv4(table: list[InterfaceAddress],
                    prefer_vpn: bool = False) -> InterfaceAddress | None:
    """The best-scoring row of ``table`` (the first one on a tie), or None."""
    rows = [row for row in table if lan_score(row, prefer_vpn) is not None]
    return max(rows, key=lambda row: lan_score(row, prefer_vpn) or 0.0, default=None)


def select_lan_ipv4(prefer_vpn: bool = False) -> str | None:
    """This machine's real LAN IPv4: physical interfaces first, 192.168 > 10 > 172.16, up only;
    loopback, link-local, container/VPN interfaces and noisy networks out unless ``prefer_vpn``."""
    chosen = choose_lan_ipv4(interface_table(), prefer_vpn)
    return chosen.ipv4_address if chosen else None


def get_public_ip_address(endpoint: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """What the internet sees of this machine: the ``ipinfo`` CLI when installed, otherwise a JSON
    lookup over http(s) (``endpoint``, or STACKOPS_PUBLIC_IP_URL, or ipinfo.io). Installs nothing.
    ``timeout`` bounds the whole lookup (name resolution, connection and answer together)."""
    if not timeout > 0:
        raise ConfigError(f"the public-IP lookup needs a positive timeout, got {timeout}")
    url = endpoint or os.environ.get("STACKOPS_PUBLIC_IP_URL")
    if url is None and shutil.which("ipinfo"):
        done = _run_bounded(["ipinfo", "myip", "--json"], timeout, StackopsConnectionError)
        if done.returncode != 0:
            raise CommandError("localhost", "ipinfo myip --json", done.returncode, done.stderr)
        return _public_ip_json(done.stdout, "ipinfo myip")
    url = _check_http_url(url or DEFAULT_PUBLIC_IP_URL)
    return _public_ip_json(_fetch_within(url, timeout), url)


def _check_http_url(url: str) -> str:
    """``url`` if it is http(s):// with a host (file:// reads what it should not); else refused."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        shown = _shorten(url, 80)
        raise ConfigError(f"the public-IP endpoint must be an http:// or https:// URL, "
                          f"got {shown!r}",
                          hint="e.g. --endpoint https://ipinfo.io/json (or STACKOPS_PUBLIC_IP_URL)")
    return url


def _fetch_within(url: str, timeout: float, limit: int = 1 << 20) -> str:
    """The body of ``url`` (at most ``limit`` bytes), all within ``timeout`` seconds: a silent DNS
    server or an endpoint that trickles its answer ends in an error at the deadline. The lookup runs
    in a daemon thread, which is left to finish on its own when it overruns."""
    import http.client
    import threading
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": f"stackops/{__version__}"})
    box: dict[str, Any] = {}
    opener = urllib.request.OpenerDirector()  # http and https only, redirects included
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)

    def fetch() -> None:
        try:
            with opener.open(request, timeout=timeout) as response:
                box["body"] = response.read(limit)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=fetch, name="stackops-public-ip", daemon=True)
    worker.start()
    worker.join(timeout)
    hint = "set STACKOPS_PUBLIC_IP_URL (or --endpoint) to another JSON endpoint"
    if worker.is_alive():
        raise StackopsConnectionError(f"public IP lookup at {url} timed out: no whole answer "
                                      f"within {timeout:g}s", hint=hint)
    error = box.get("error")
    if isinstance(error, (urllib.error.URLError, OSError, ValueError, http.client.HTTPException)):
        reason = getattr(error, "reason", error)
        raise StackopsConnectionError(f"public IP lookup at {url} failed: {reason}",
                                      hint=hint) from error
    if error is not None:
        raise error
    return bytes(box.get("body", b"")).decode("utf-8", "replace")


def _public_ip_json(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StackopsError(f"{source} did not answer JSON: {_shorten(text, 80)!r}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("ip"), str):
        raise StackopsError(f"{source} answered no 'ip': {_shorten(text, 80)!r}")
    return data


WARP_TIMEOUT = 30.0  # seconds one warp-cli call may take


def _warp(*args: str, timeout: float = WARP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return _run_bounded(["warp-cli", *args], timeout)
    except StackopsError as exc:
        exc.hint = exc.hint or ("is the WARP service running? (warp-cli status, or: systemctl "
                                "status warp-svc)")
        raise


def switch_public_ip_address_with_log(max_trials: int = 10, wait_seconds: float = 2.0,
                                      target_ip_addresses: list[str] | None = None,
                                      endpoint: str | None = None,
                                      timeout: float | None = None) -> tuple[bool, str, list[str]]:
    """switch_public_ip_address, also returning every address seen after a new registration.
    ``timeout`` bounds each lookup and each warp-cli call (default 5 s and WARP_TIMEOUT): a
    warp-cli that does not answer in time stops the switch with a StackopsError."""
    if shutil.which("warp-cli") is None:
        raise DependencyError("warp-cli is not installed",
                              hint="install Cloudflare WARP to rotate the public IP")
    if max_trials < 1 or wait_seconds < 0 or (timeout is not None and not timeout > 0):
        raise ConfigError("max_trials must be at least 1, wait_seconds not negative "
                          "and timeout positive")
    url = endpoint or os.environ.get("STACKOPS_PUBLIC_IP_URL")
    if url is not None:
        _check_http_url(url)  # a bad endpoint is refused now, not retried in every trial
    lookup = timeout or 5.0
    warp = timeout or WARP_TIMEOUT
    targets = set(target_ip_addresses or [])
    try:
        current: str | None = get_public_ip_address(endpoint, lookup)["ip"]
    except StackopsError as exc:
        log.warning("cannot read the current public IP: %s", exc)
        current = None
    if targets and current in targets:
        return True, current or "", []
    seen: list[str] = []
    for trial in range(1, max_trials + 1):
        _warp("registration", "delete", timeout=warp)
        time.sleep(wait_seconds)
        if _warp("registration", "new", timeout=warp).returncode != 0:
            log.warning("warp-cli registration new failed (trial %d)", trial)
            continue
        _warp("connect", timeout=warp)
        time.sleep(wait_seconds)
        address = _lookup_a_few_times(endpoint, wait_seconds, lookup)
        if not address:
            continue
        seen.append(address)
        log.info("trial %d: public IP %s", trial, address)
        if (address in targets) if targets else (address != current):
            return True, address, seen
    return False, seen[-1] if seen else (current or ""), seen


def _lookup_a_few_times(endpoint: str | None, wait_seconds: float,
                        timeout: float = 5.0) -> str | None:
    for _ in range(5):
        try:
            return get_public_ip_address(endpoint, timeout)["ip"] or None
        except StackopsError as exc:
            log.warning("public IP lookup failed: %s", exc)
            time.sleep(wait_seconds)
    return None


def switch_public_ip_address(max_trials: int = 10, wait_seconds: float = 2.0,
                             target_ip_addresses: list[str] | None = None) -> tuple[bool, str]:
    """Rotate the public IP with Cloudflare WARP (delete the registration, register, connect, look),
    until it changes - or, with targets, until it is one of them. Returns (success, address)."""
    success, address, _ = switch_public_ip_address_with_log(max_trials, wait_seconds,
                                                            target_ip_addresses)
    return success, address


# ============================================================================================
# 10. SSH (paramiko, imported lazily)
# ============================================================================================

# The executing side's one program on a host: this boot (run as ``python3 -S -c BOOT FENCE``)
# checks the host's snapshot store as any folder of ours is checked (yours alone, up to /), finds
# this very version of stackops there by its SHA-256 (or says it needs it, and this machine sends
# it on the same channel), checks the file against its hash, imports it and calls serve(): JSON
# requests in, JSON answers out. The fence line it prints first is what the client waits for, so
# a login file's chatter before it is skipped.
SERVE_BOOT_PY = r"""import hashlib,os,sys
o=sys.stdout.buffer;i=sys.stdin.buffer;h=@@digest;f=sys.argv[1]
def say(w):o.write((f+' '+w+'\n').encode());o.flush()
def bad(w):say('error '+w);sys.exit(3)
if sys.version_info<(3,8):bad('its python3 is '+sys.version.split()[0]+': stackops needs 3.8+')
os.umask(63);d=os.path.expanduser(@@store)
try:os.makedirs(d,448,exist_ok=True)
except OSError as e:bad('cannot make '+d+': '+str(e))
p=os.path.realpath(d);u=os.getuid()
while 1:
 s=os.stat(p);r=s.st_uid==0 and s.st_mode&512
 if s.st_uid not in(u,0) or s.st_mode&18 and not r:
  bad('refusing the store '+d+': '+p+' could be changed by another user')
 if r or p=='/':break
 p=os.path.dirname(p)
v=os.path.join(d,'stackops-'+h[:24]);m=os.path.join(v,'stackops.py')
def ok():
 try:
  with open(m,'rb') as r:return hashlib.sha256(r.read()).hexdigest()==h
 except OSError:return False
if not ok():
 say('need');b=i.read(int(i.readline()))
 if hashlib.sha256(b).hexdigest()!=h:bad('stackops.py arrived damaged')
 os.makedirs(v,448,exist_ok=True);t=m+'.'+os.urandom(6).hex()
 with open(os.open(t,os.O_WRONLY|os.O_CREAT|os.O_EXCL,384),'wb') as w:w.write(b)
 os.replace(t,m)
say('ready');sys.path.insert(0,v);import stackops;sys.exit(stackops.serve([]))
"""
_OWN_SOURCE: list[bytes] = []  # this file's bytes, read once


def _own_source() -> bytes:
    if not _OWN_SOURCE:
        _OWN_SOURCE.append(_own_file().read_bytes())
    return _OWN_SOURCE[0]


def _serve_command(python: str, fence: str) -> str:
    """The command that runs serve() on a host with ``python`` (see SERVE_BOOT_PY)."""
    import hashlib

    boot = render_template(SERVE_BOOT_PY, digest=repr(hashlib.sha256(_own_source()).hexdigest()),
                           store=repr(DEFAULT_SNAPSHOT_DIR))
    return f"{shlex.quote(python)} -S -c {shlex.quote(boot)} {fence}"


def _paramiko() -> Any:
    try:
        if "paramiko" not in sys.modules and "invoke" not in sys.modules:
            # paramiko imports invoke (which imports unittest.mock), a third of its import time,
            # only for "Match exec" lines of an SSH config: resolve_ssh_target brings it then
            sys.modules["invoke"] = None  # type: ignore[assignment]
            try:
                import paramiko
            finally:
                del sys.modules["invoke"]
        import paramiko
        _stackops_logger()  # main()'s handlers (its quiet one for paramiko's log) set by now
    except ImportError as exc:
        raise DependencyError("SSH needs paramiko, which is not installed",
                              hint="pip install paramiko (or: pip install stackops)") from exc
    return paramiko


_TARGET = _LazyPattern(r"(?:(?P<user>[^@\s/:]+)@)?"
                       r"(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:@\s\[\]/]+))"
                       r"(?::(?P<port>\d+))?\Z")


def _check_port(port: Any, where: str) -> int:
    try:
        value = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"port {port!r} of {where} is not a number") from None
    if not 1 <= value <= 65535:
        raise ConfigError(f"port {value} of {where} is outside 1..65535")
    return value


def parse_ssh_target(text: str) -> tuple[str | None, str, int | None]:
    """(user, host, port) of ``user@host[:port]``, ``[v6]:port`` or an alias; refuses the rest."""
    match = _TARGET.match(text or "")
    if not match:
        raise ConfigError(f"{text!r} is not an SSH target",
                          hint="use an alias from ~/.ssh/config or user@host[:port]")
    port = _check_port(match["port"], text) if match["port"] else None
    return match["user"], match["v6"] or match["host"], port


@_model
class SSHTarget:
    """Where and how to connect, resolved the way OpenSSH resolves ``ssh <host>``."""

    alias: str
    hostname: str
    user: str
    port: int = 22
    identity_files: list[str] = _field(default_factory=list)
    proxy_jump: str | None = None
    proxy_command: str | None = None
    known_hosts: list[str] = _field(default_factory=lambda: ["~/.ssh/known_hosts"])
    strict_host_key_checking: str = "yes"

    def __str__(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def resolve_ssh_target(host: str) -> SSHTarget:
    """Resolve an alias of ~/.ssh/config (or ``user@host[:port]``) into an SSHTarget."""
    import getpass

    user, name, port = parse_ssh_target(host)
    path = expand_home(os.environ.get("STACKOPS_SSH_CONFIG") or "~/.ssh/config")
    paramiko = _paramiko()
    try:
        config = paramiko.SSHConfig.from_path(str(path)) if path.exists() else paramiko.SSHConfig()
        try:
            entry = config.lookup(name)
        except ImportError:  # a "Match exec" line: paramiko runs it with invoke (see _paramiko)
            import invoke

            paramiko.config.invoke = invoke
            entry = config.lookup(name)
    except Exception as exc:  # paramiko raises assorted errors for a bad config
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    def option(key: str) -> str | None:  # OpenSSH's "none" switches a proxy off
        value = entry.get(key)
        return None if value is None or str(value).lower() == "none" else str(value)

    return SSHTarget(alias=host, hostname=entry.get("hostname", name),
                     user=user or entry.get("user") or getpass.getuser(),
                     port=port or _check_port(entry.get("port", 22), host),
                     identity_files=[os.path.expanduser(f) for f in entry.get("identityfile", [])],
                     proxy_jump=option("proxyjump"), proxy_command=option("proxycommand"),
                     known_hosts=str(entry.get("userknownhostsfile", "~/.ssh/known_hosts")).split(),
                     strict_host_key_checking=str(entry.get("stricthostkeychecking",
                                                            "yes")).lower())


_LOGIN_SHELL_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ" b"abcdefghijklmnopqrstuvwxyz"
                              b"0123456789 ,._+:@%/=-")


def _bash_line(command: str) -> str:
    """``command`` (bash) as one line that every login shell runs the same way: bash, sh, csh,
    tcsh, fish. Each byte outside a plain set becomes ``\\xHH`` for bash's printf, so the single-
    quoted word holds no newline, quote, ``!`` or ``\\\\`` that csh or fish would read otherwise."""
    text = "".join(chr(b) if b in _LOGIN_SHELL_SAFE else f"\\x{b:02x}" for b in command.encode())
    return f"exec bash --norc -c 'printf -v _so_c %b \"{text}\" && eval \"$_so_c\"'"


@_model
class Response:
    """What a remote command did: its output, its exit status, where and what it was."""

    stdout: str
    stderr: str
    returncode: int
    command: str = ""
    host: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


_QUICKACK_SOCKET: Any = None


def _quickack_socket() -> Any:
    """A socket class that acknowledges every segment at once (TCP_QUICKACK, re-armed after each
    read: the kernel drops it). sshd holds the reply to our first channel open until its
    host-keys notice is acknowledged (Nagle: TCP_NODELAY only for terminals), which our kernel
    delays 40 ms: the first command took 43 ms, and takes 2 ms this way."""
    global _QUICKACK_SOCKET
    if _QUICKACK_SOCKET is None:
        import socket

        class _QuickAckSocket(socket.socket):
            __slots__ = ()  # the same layout as socket.socket, so a connected socket can become one

            def recv(self, *args: Any) -> bytes:
                data = super().recv(*args)
                self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                return data

        _QUICKACK_SOCKET = _QuickAckSocket
    return _QUICKACK_SOCKET


def _fingerprint(key: Any) -> str:
    """A host key's fingerprint as OpenSSH shows it: ``SHA256:`` and unpadded base64."""
    import base64
    import hashlib

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _gcm_first_transport(sock: Any, **kwargs: Any) -> Any:
    """A paramiko Transport preferring AES-GCM (fastest here; the others stay offered)."""
    transport = _paramiko().Transport(sock, **kwargs)
    preferred = transport._preferred_ciphers
    gcm = tuple(c for c in preferred if "gcm" in c)
    transport._preferred_ciphers = gcm + tuple(c for c in preferred if "gcm" not in c)
    return transport


# Adds a public key to the host's authorized_keys once. Present = the same key blob on any line,
# with or without options (from=...); a last line without its newline gets one first, or the new
# key would be glued to it and both break.
SEND_KEY_TEMPLATE = r"""umask 077; A="$HOME/.ssh/authorized_keys"; K=@@key; B=@@blob
mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh" && touch "$A" && chmod 600 "$A" || exit 1
if awk -v b="$B" '{for (i = 1; i <= NF; i++) if ($i == b) f = 1} END {exit !f}' "$A"
then echo present
else { [ -z "$(tail -c 1 "$A")" ] || printf "\n" >> "$A"; } && printf "%s\n" "$K" >> "$A" \
    && echo added
fi"""


class SSH:
    """One SSH connection (paramiko) that behaves like OpenSSH: config aliases, ProxyJump,
    ProxyCommand, host keys checked against known_hosts, timeouts everywhere."""

    def __init__(self, host: str | None = None, username: str | None = None,
                 hostname: str | None = None, ssh_key_path: str | None = None,
                 password: str | None = None, port: int | None = None,
                 enable_compression: bool = False, accept_new_host_key: bool = False,
                 timeout: float = 15.0, _hop: int = 0) -> None:
        if host is None and hostname is None:
            raise ConfigError("SSH needs a host alias or a hostname")
        target = resolve_ssh_target(host or hostname or "")
        if hostname and host:
            target.hostname = hostname
        if username:
            target.user = username
        if port is not None:
            target.port = _check_port(port, host or hostname or "")
        if ssh_key_path:
            key = expand_home(ssh_key_path)
            if not key.is_file():
                raise ConfigError(f"SSH key file not found: {ssh_key_path}")
            target.identity_files = [str(key)]
        self.target, self.timeout, self.compress = target, timeout, enable_compression
        self.accept_new = accept_new_host_key or target.strict_host_key_checking in ("accept-new",
                                                                                     "no", "off")
        self._password = password
        self._jumps: list[SSH] = []
        self._specs: dict[str, Any] | None = None
        self._revoked: set[str] = set()
        if _hop > 8:
            raise ConfigError(f"ProxyJump chain to {target} is longer than 8 hops (a loop?)")
        try:
            self.client = self._connect(_hop)
        except BaseException:  # a failure behind a jump host closes the jump connections it opened
            for jump in reversed(self._jumps):
                jump.close()
            raise

    def __repr__(self) -> str:  # never the password
        return f"SSH({self.target})"

    @classmethod
    def from_config_file(cls, host: str, **kwargs: Any) -> SSH:
        """Connect to an alias of ~/.ssh/config, or to ``user@host[:port]``."""
        return cls(host=host, **kwargs)

    def __enter__(self) -> SSH:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with _suppress(Exception):
            self.client.close()
        for jump in reversed(self._jumps):
            jump.close()

    # -- connecting ------------------------------------------------------------------------------

    def _channel_to(self, hostname: str, port: int) -> Any:
        transport = self.client.get_transport()
        try:
            return transport.open_channel("direct-tcpip", (hostname, port), ("127.0.0.1", 0),
                                          timeout=self.timeout)
        except Exception as exc:
            raise StackopsConnectionError(f"jump host {self.target} cannot reach "
                                          f"{hostname}:{port}: {exc}") from exc

    def _jump_to(self, jump: str, hop: int) -> SSH:
        """The next hop of a ProxyJump chain, tunnelled through this connection."""
        nxt = SSH.__new__(SSH)
        nxt.target = resolve_ssh_target(jump)
        nxt.target.proxy_jump = nxt.target.proxy_command = None
        nxt.timeout, nxt.compress, nxt.accept_new = self.timeout, False, self.accept_new
        nxt._password = None
        nxt._jumps, nxt._specs = [], None
        nxt.client = nxt._connect(hop, sock=self._channel_to(nxt.target.hostname, nxt.target.port))
        return nxt

    def _credentials(self) -> dict[str, Any]:
        keys = [f for f in self.target.identity_files if os.path.exists(f)]
        if self.target.identity_files and not keys and not self._password:
            raise ConfigError(f"no identity file of {self.target.alias} exists: "
                              f"{', '.join(self.target.identity_files)}")
        for key in keys:
            info = os.stat(key)
            if info.st_mode & 0o077 and info.st_uid == os.getuid():
                raise ConfigError(f"private key {key} is readable by others (mode "
                                  f"{info.st_mode & 0o777:o}); OpenSSH refuses such a key, and so "
                                  "does stackops", hint=f"chmod 600 {key}")
        return {"key_filename": keys or None, "password": self._password,
                "allow_agent": not keys, "look_for_keys": not keys}

    def _connect(self, hop: int, sock: Any = None) -> Any:
        paramiko = _paramiko()
        client = paramiko.SSHClient()
        import inspect

        fast = {"transport_factory": _gcm_first_transport} \
            if "transport_factory" in inspect.signature(client.connect).parameters else {}
        record = _load_host_keys(self, client)
        client.set_missing_host_key_policy(_host_key_policy(self.accept_new, self._revoked, record))
        credentials = self._credentials()
        sock = sock if sock is not None else _ssh_socket(self, hop)
        target = self.target
        try:
            client.connect(target.hostname, target.port, username=target.user, sock=sock,
                           timeout=self.timeout, banner_timeout=self.timeout,
                           auth_timeout=self.timeout, compress=self.compress, **credentials, **fast)
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            offered = _fingerprint(exc.key)
            raise HostKeyError(f"host key of {target} CHANGED (it offers {offered}): it does not "
                               f"match {record}; refusing to connect",
                               hint="if the host was really reinstalled, remove its old line from "
                                    "known_hosts") from exc
        except paramiko.PasswordRequiredException as exc:
            client.close()
            raise ConfigError(f"the key for {target.user}@{target.hostname} is encrypted and no "
                              "passphrase was given",
                              hint="add it to ssh-agent (ssh-add), or pass password=... (used as "
                                   "the passphrase)") from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise StackopsConnectionError("authentication failed for "
                                          f"{target.user}@{target.hostname}:{target.port}",
                                          hint="check the user and the key (IdentityFile) for this "
                                               "host") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport = client.get_transport()
            client.close()
            if transport is not None:  # its thread logs the failure with a traceback: now, while
                transport.join(1.0)  # main()'s handler keeps paramiko quiet, not as we leave
            reason = _connect_reason(exc, self.timeout, self.target.port)
            raise StackopsConnectionError(f"cannot connect to {target}: {reason}",
                                          hint=self._connect_hint()) from exc
        client.get_transport().set_keepalive(30)
        return client

    def _connect_hint(self) -> str:
        return (f"is {self.target.alias} up, and its sshd answering on port {self.target.port}? "
                f"(the timeout was {self.timeout:g}s)")

    # -- commands --------------------------------------------------------------------------------

    def run_shell_cmd_on_remote(self, command: str, timeout: float | None = None,
                                strict: bool = True, stdin: bytes | None = None) -> Response:
        """Run ``command`` with bash on the host, whatever its login shell; read stdout and stderr
        together (no stall on large output). ``strict``: a non-zero exit raises CommandError."""
        channel = self._open_channel()
        try:
            channel.exec_command(_bash_line(command))
            if stdin is not None:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err, status = _drain(channel, timeout, command, str(self.target))
        finally:
            channel.close()
        response = Response(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), status,
                            command, str(self.target))
        if strict and status != 0:
            raise CommandError(str(self.target), command, status,
                               response.stderr or response.stdout)
        return response

    @property
    def is_alive(self) -> bool:
        """Whether the connection is still usable (a dropped one is never revived)."""
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def _lost(self) -> None:
        """Drop a connection that stopped answering, so that whoever holds it connects anew."""
        with _suppress(Exception):
            self.client.close()

    def _open_channel(self) -> Any:
        try:
            if not self.is_alive:
                raise EOFError("the connection was closed")
            return self.client.get_transport().open_session(timeout=self.timeout)
        except Exception as exc:
            self._lost()
            raise StackopsConnectionError(f"lost the connection to {self.target}: "
                                          f"{exc or type(exc).__name__}",
                                          hint=f"is {self.target.alias} reachable? (timeout "
                                               f"{self.timeout:g}s)") from exc

    def serve(self, requests: list[dict[str, Any]], python: str = "python3",
              talk: Callable[..., Any] | None = None, timeout: float | None = None) -> list[Any]:
        """Run the executing side's program on the host (serve(): this very version of stackops,
        kept in the host's snapshot store and sent only when it lacks it) in one command, and
        return each request's answer; an error the host reports is raised here as the same
        StackopsError. ``talk(write, readline)`` carries a hand-over's own conversation."""
        return _serve_remotely(self, requests, python, talk, timeout)

    def run_py_remotely(self, code: str, timeout: float | None = None, strict: bool = True,
                        python: str = "python3") -> Response:
        """Run Python ``code`` on the host, sent over stdin: nothing is written there."""
        return self.run_shell_cmd_on_remote(f"{shlex.quote(python)} -", timeout, strict,
                                            stdin=code.encode())

    @property
    def remote_specs(self) -> dict[str, Any]:
        """OS, python, home, cpu count and memory of the host, read once, standard library only."""
        if self._specs is None:
            self._specs = self.serve([{"action": "facts", "facts": ["specs"]}])[0]["specs"]
        return self._specs

    def simple_sftp_get(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        """One remote file over SFTP, with its mode (never setuid, setgid or sticky)."""
        try:
            with self.client.open_sftp() as sftp:
                mode = _kept_mode(f"{(sftp.stat(remote_path).st_mode or 0) & 0o7777:o}")
                fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    os.fchmod(fd, 0o600)  # private while it is written, then the source's mode
                    sftp.getfo(remote_path, handle)
                    os.fchmod(fd, mode)
        except OSError as exc:
            raise TransferError(f"sftp get {self.target.alias}:{remote_path} failed: "
                                f"{exc}") from exc

    # -- keys and power --------------------------------------------------------------------------

    def send_ssh_key(self, key_path: str | None = None) -> bool:
        """Add the local public key to the host's authorized_keys once; True when it was added."""
        candidates = [key_path] if key_path else ["~/.ssh/id_ed25519.pub", "~/.ssh/id_rsa.pub",
                                                  "~/.ssh/id_ecdsa.pub"]
        path = next((expand_home(c) for c in candidates if expand_home(c).is_file()), None)
        if path is None:
            raise ConfigError(f"no public key found (looked at {', '.join(candidates)})",
                              hint="create one with: ssh-keygen -t ed25519")
        key = path.read_text().strip()
        if not re.match(r"(ssh-|ecdsa-|sk-)[\w@.-]+ [A-Za-z0-9+/=]+( [^\n]*)?\Z", key):
            raise ConfigError(f"{path} does not hold one public key")
        blob = key.split()[1]
        script = render_template(SEND_KEY_TEMPLATE, key=shlex.quote(key), blob=shlex.quote(blob))
        return self.run_shell_cmd_on_remote(script, timeout=self.timeout).stdout.strip() == "added"

    def restart_computer(self) -> Response:
        """Reboot the host with non-interactive sudo; a host that wants a password says so."""
        response = self.run_shell_cmd_on_remote("sudo -n /sbin/reboot || sudo -n reboot",
                                                timeout=self.timeout, strict=False)
        if response.returncode != 0 and response.returncode != -1:
            raise CommandError(str(self.target), "sudo -n reboot", response.returncode,
                               response.stderr, hint="allow it without a password (sudoers "
                                                     "NOPASSWD for reboot), or reboot by hand")
        return response

    # -- copies (section 11) ------------------------------------------------------------------

    def copy_from_here(self, source_path: str | os.PathLike[str],
                       target_rel2home: str | None = None, compress_with_zip: bool = False,
                       recursive: bool = False, overwrite_existing: bool = False,
                       progress: Callable[[int], None] | None = None,
                       excludes: tuple[str, ...] = ()) -> str:
        """Upload a file or (with ``recursive``) a folder; ``None`` target: the same home-relative
        path on the host. It arrives whole under its name or not at all. Returns the remote path.
        ``progress`` is called with the bytes sent so far; one that also has ``begin(what,
        total)`` and ``end(done, ok)`` hears when the transfer starts and ends (see _Meter)."""
        return _upload(self, source_path, target_rel2home, compress_with_zip, recursive,
                       overwrite_existing, progress, excludes)

    def copy_to_here(self, source: str, target: str | os.PathLike[str] | None = None,
                     compress_with_zip: bool = False, recursive: bool = False,
                     overwrite: bool = False,
                     progress: Callable[[int], None] | None = None) -> Path:
        """Download a remote file or (with ``recursive``) folder; ``None`` target: the same
        home-relative path here. It appears whole under its name or not at all. ``progress``:
        as for copy_from_here (the bytes received)."""
        return _download(self, source, target, compress_with_zip, recursive, overwrite, progress)

    def stream_command(self, command: str,
                       produce: Callable[[Callable[[bytes], None], Callable[[], bytes]], None],
                       progress: Callable[[int], None] | None = None) -> Response:
        """Run ``command`` as a conversation: ``produce(write, readline)`` feeds its stdin and may
        read its answers line by line as it goes; then the rest of its output is read (not
        strict). A transfer that stops making progress drops the connection (see _Watchdog)."""
        return _stream_command(self, command, produce, progress)


def _ssh_socket(ssh: SSH, hop: int) -> Any:
    """The socket (or ProxyCommand, or jump channel) SSH._connect talks over."""
    import socket

    target = ssh.target
    if target.proxy_command:
        return _paramiko().ProxyCommand(target.proxy_command)
    if target.proxy_jump:
        first, *rest = [jump.strip() for jump in target.proxy_jump.split(",")]
        via = SSH(first, accept_new_host_key=ssh.accept_new, timeout=ssh.timeout, _hop=hop + 1)
        ssh._jumps.append(via)
        for jump in rest:
            via = via._jump_to(jump, hop + 1)
            ssh._jumps.append(via)
        return via._channel_to(target.hostname, target.port)
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=ssh.timeout)
    except socket.gaierror as exc:
        raise StackopsConnectionError(f"cannot resolve {target.hostname} (from "
                                      f"{target.alias}): {exc.strerror}",
                                      hint="check the alias in ~/.ssh/config") from exc
    except OSError as exc:
        reason = _connect_reason(exc, ssh.timeout, ssh.target.port)
        raise StackopsConnectionError(f"cannot connect to {target}: {reason}",
                                      hint=ssh._connect_hint()) from exc
    # paramiko waits on Nagle otherwise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_QUICKACK"):  # Linux: see _QuickAckSocket
        sock.__class__ = _quickack_socket()
    return sock


def _load_host_keys(ssh: SSH, client: Any) -> Path:
    """Load every known_hosts file (never rewritten: accepted keys are appended to the first);
    keys of ``@revoked`` lines are left out, so they are refused like unknown ones."""
    files = [expand_home(f) for f in ssh.target.known_hosts]
    lines: list[str] = []
    for path in files:
        with _suppress(OSError):
            lines += path.read_text(errors="replace").splitlines()
    ssh._revoked = {line.split()[3] for line in lines
                     if line.startswith("@revoked") and len(line.split()) > 3}
    host_keys = client.get_host_keys()
    for line in lines:
        entry = _known_hosts_entry(line)
        if entry is not None and entry.key.get_base64() not in ssh._revoked:
            for name in entry.hostnames:
                host_keys.add(name, entry.key.get_name(), entry.key)
    return files[0]


def _host_key_policy(accept: bool, revoked: set[str], record: Path) -> Any:
    """paramiko's policy for a host key known_hosts lacks: refused when revoked, or unless
    ``accept`` (then appended to ``record``, as OpenSSH's accept-new does)."""
    paramiko = _paramiko()

    class _Policy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc,name-defined]
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            if key.get_base64() in revoked:
                raise HostKeyError(f"host key of {hostname} ({key.get_name()} {_fingerprint(key)}) "
                                   "is REVOKED in known_hosts; refusing to connect",
                                   hint="ask the host's administrator for its new key")
            if not accept:
                raise HostKeyError(
                    f"host key of {hostname} is unknown ({key.get_name()} {_fingerprint(key)})",
                    hint=f"if you trust it: pass "
                         f"{_option('accept_new_host_key=True', '--accept-new')}, or set "
                         "StrictHostKeyChecking accept-new for it in ~/.ssh/config",
                    unknown_key=True)
            client.get_host_keys().add(hostname, key.get_name(), key)
            _append_known_host(record, f"{hostname} {key.get_name()} {key.get_base64()}")
            log.warning("recorded the host key of %s in %s", hostname, record)

    return _Policy()


def _connect_reason(exc: BaseException, timeout: float, port: int) -> str:
    """What went wrong while connecting, in words, not paramiko's internals."""
    import socket

    text = str(exc)
    if "banner" in text or "No existing session" in text:
        return (f"no SSH greeting within {timeout:g}s (the host is hung or overloaded, "
                "or that port is not an SSH server)")
    if isinstance(exc, (socket.timeout, TimeoutError)) or "timed out" in text.lower():
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused (nothing listens on port {port})"
    if isinstance(exc, (EOFError, ConnectionResetError)) or not text:
        return "the other side closed the connection"
    strerror = getattr(exc, "strerror", None)
    return _last_line(strerror or text)


def _drain(channel: Any, timeout: float | None, command: str,
           host: str) -> tuple[bytes, bytes, int]:
    """A command's stdout, stderr and exit status, read together (no stall on large output);
    past ``timeout`` the host is asked to kill it and CommandError is raised."""
    import select

    out, err = bytearray(), bytearray()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        got = False
        while channel.recv_ready():
            out += channel.recv(1 << 20)
            got = True
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(1 << 20)
            got = True
        # the exit status can come before the last output
        ended = channel.eof_received or channel.closed
        if ended and not channel.recv_ready() and not channel.recv_stderr_ready():
            break
        if deadline is not None and time.monotonic() > deadline:
            killed = _signal_channel(channel, "KILL")
            fate = "the host was asked to kill it (its process group)" if killed \
                else "it may still run on the host"
            raise CommandError(host, command, None, f"timed out after {timeout}s; {fate}")
        if not got:
            select.select([channel], [], [], 0.5)
    return bytes(out), bytes(err), channel.recv_exit_status()


def simple_sftp_get(remote_path: str, local_path: str | os.PathLike[str], host: str | SSH) -> None:
    """One remote file over SFTP, as is (see SSH.simple_sftp_get); ``host``: an alias or an SSH."""
    if isinstance(host, SSH):
        host.simple_sftp_get(remote_path, local_path)
        return
    with SSH.from_config_file(host) as ssh:
        ssh.simple_sftp_get(remote_path, local_path)


def _known_hosts_entry(line: str) -> Any:
    """The paramiko entry of a plain known_hosts line; None for comments, markers (``@revoked``,
    ``@cert-authority``) and key types paramiko lacks (``sk-``): OpenSSH accepts them all."""
    if not line.strip() or line.lstrip().startswith(("#", "@")):
        return None
    try:
        return _paramiko().hostkeys.HostKeyEntry.from_line(line)
    except Exception as exc:  # paramiko raises assorted errors for keys it cannot read
        log.debug("known_hosts line skipped (%s): %.60s", exc, line)
        return None


def _append_known_host(path: Path, line: str) -> None:
    """Append one line to known_hosts under a lock, as OpenSSH does: the file is never rewritten,
    and hosts accepted at once by several connections are all recorded, each once."""
    _mkdir_private(path.parent)
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(str(path), "rb") as handle:
            text = handle.read()
        if line.encode() not in (old.strip() for old in text.splitlines()):
            gap = b"\n" if text and not text.endswith(b"\n") else b""
            os.write(fd, gap + line.encode() + b"\n")
    finally:
        os.close(fd)  # releases the lock


def _signal_channel(channel: Any, name: str) -> bool:
    """Ask the server to send signal ``name`` to a channel's command (RFC 4254 6.9): OpenSSH
    signals its whole process group, so a command that timed out does not run on unseen.
    paramiko has no public call for this request; False when it could not be sent."""
    paramiko = _paramiko()
    try:
        message = paramiko.Message()
        message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        message.add_int(channel.remote_chanid)
        message.add_string("signal")
        message.add_boolean(False)
        message.add_string(name)
        channel.transport._send_user_message(message)
    except Exception as exc:  # an old paramiko, a closed transport: the caller says it may run on
        log.debug("could not signal the remote command: %s", exc)
        return False
    return True


# ============================================================================================
# 11. transfer: sftp and tar streams, rclone
# ============================================================================================

# The copy commands a host runs, each rendered by render_template with quoted values only.
# An upload: prepare (refuse the home, exit 18, and without overwrite an existing target, exit 17;
# remove stale staging folders; make a hidden staging folder beside the target), receive into it,
# then commit (move it under the target's name by rename only). Uploads of the same target racing
# each other (hosts sharing a home) each leave a whole copy, never one inside another.
UPLOAD_PREPARE_TEMPLATE = r"""T=@@target; S=@@staging
H=$(cd "$HOME" && pwd -P) && R=$(cd "$T" 2>/dev/null && pwd -P) && \
H=/${H#"${H%%[!/]*}"} && R=/${R#"${R%%[!/]*}"} && \
{ [ "$R" = / ] || [ "$R" = "$H" ] || case "$H" in "$R"/*) true;; *) false;; esac; } && \
{ echo "is $R (the home is $H)" >&2; exit 18; }
if [ @@overwrite != 1 ] && { [ -e "$T" ] || [ -L "$T" ]; }; then echo "exists: $T" >&2; exit 17; fi
if [ @@file = 1 ] && [ -d "$T" ] && [ ! -L "$T" ]; then exit 19; fi
for d in "$(dirname "$T")"/.stackops-partial.*; do
    [[ "${d##*/}" =~ ^\.stackops-partial\.[0-9a-f]{12}(\.old\.[0-9]+)?$ ]] || continue
    [ -z "$(find "$d" -mmin -1440 2>/dev/null | head -n 1)" ] && rm -rf -- "$d"
done
(umask 077 && mkdir -p "$(dirname "$T")" && mkdir "$S")"""
UPLOAD_TAR_TEMPLATE = "tar @@mode - -C @@staging"
# a single file is created private, then given the source's mode (as scp does)
UPLOAD_FILE_TEMPLATE = ('P=@@payload; (umask 077 && if [ @@gzip = 1 ]; then gzip -dc; else cat; fi '
                        '> "$P") && chmod @@mode "$P"')
UPLOAD_COMMIT_TEMPLATE = r"""T=@@target; A=@@arrived; O=@@old; N=@@size
[ "$N" = - ] || [ "$(wc -c < "$A")" -eq "$N" ] || exit 1
n=0; while ! mv -T -- "$A" "$T" 2>/dev/null; do n=$((n + 1))
    [ "$n" -le 20 ] || { echo "cannot put $T in place" >&2; exit 1; }
    mv -T -- "$T" "$O.$n" 2>/dev/null
done
rm -rf -- "$O".*; rmdir -- @@staging"""
DISCARD_TEMPLATE = "rm -rf -- @@staging"
# A download: what is there (and, when a progress callback wants it, how big a folder is),
# then the folder as a tar stream from inside it, or the file as it was when probed.
DOWNLOAD_PROBE_TEMPLATE = r"""S=@@source
if [ -d "$S" ]; then
    echo "dir $([ @@measure = 1 ] && cd -P -- "$S" && du -sb . 2>/dev/null | cut -f1)"
elif [ -e "$S" ]; then
    echo "file $(stat -Lc %a -- "$S" 2>/dev/null || stat -Lf %Lp -- "$S" 2>/dev/null || echo -) \
$(wc -c < "$S")"
else echo missing; fi"""
DOWNLOAD_TAR_TEMPLATE = "cd -P -- @@source && tar @@mode - -- ."
DOWNLOAD_FILE_TEMPLATE = "head -c @@size -- @@source"
DOWNLOAD_FILE_GZIP_TEMPLATE = "head -c @@size -- @@source | gzip -c"


def _copy_command(template: str, **values: str | int | bool) -> str:
    """One copy command: paths (``~/...`` too) and every other value quoted for the shell."""
    quoted = {}
    for name, value in values.items():
        text = str(int(value) if isinstance(value, bool) else value)
        quoted[name] = _sh_path(text) if name in _COPY_PATHS else shlex.quote(text)
    return render_template(template, **quoted)


_COPY_PATHS = ("target", "staging", "payload", "arrived", "old", "source")


# Transfers under way, and a Ctrl-C they have yet to act on: while bytes move, Ctrl-C is taken
# between two chunks (a KeyboardInterrupt raised inside paramiko's locks breaks them, and the
# clean-up that follows then hangs or fails), see _interrupted.
_CALM: list[Any] = [0, False]


class _Meter:
    """One transfer as a progress callback sees it: ``progress(done)`` as bytes go by (any
    callable taking one int will do); a callback that has them also gets ``begin(what, total)``
    before the first bytes (``total`` None when unknown) and ``end(done, ok)`` after the last.
    Within ``with meter:`` a Ctrl-C is raised at the next chunk (see _CALM)."""

    def __init__(self, progress: Callable[[int], None] | None, what: str) -> None:
        self.progress, self.what, self.done, self.begun = progress, what, 0, False

    def begin(self, total: int | None) -> None:
        self.begun = True
        begin = getattr(self.progress, "begin", None)
        if begin is not None:
            begin(self.what, total)

    def __call__(self, done: int) -> None:
        self.done = done
        if _CALM[1]:
            _CALM[1] = False
            raise KeyboardInterrupt
        if self.progress is not None:
            if not self.begun:
                self.begin(None)
            self.progress(done)

    def __enter__(self) -> _Meter:
        _CALM[0] += 1
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        _CALM[0] -= 1
        interrupted = _CALM[1] and not _CALM[0]
        end = getattr(self.progress, "end", None)
        if end is not None and self.begun:
            end(self.done, kind is None and not interrupted)
        if interrupted and kind is None:
            _CALM[1] = False
            raise KeyboardInterrupt


def _tar_size(folder: Path, excludes: tuple[str, ...]) -> int:
    """About how many bytes ``tar c`` makes of ``folder``: a header per member, data padded."""
    import fnmatch

    total = 1024
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, e) for e in excludes)]
        total += 512 * (1 + len(dirs))
        for name in files:
            if any(fnmatch.fnmatch(name, e) for e in excludes):
                continue
            with _suppress(OSError):
                total += 512 + -(-os.lstat(os.path.join(root, name)).st_size // 512) * 512
    return total


def _upload(ssh: SSH, source_path: str | os.PathLike[str], target_rel2home: str | None,
            compress: bool, recursive: bool, overwrite: bool,
            progress: Callable[[int], None] | None, excludes: tuple[str, ...]) -> str:
    """SSH.copy_from_here: a file or folder arrives whole under its name or not at all."""
    source = expand_home(source_path)
    if not source.exists():
        raise ConfigError(f"nothing to copy at {source_path}")
    if source.is_dir() and not recursive:
        raise ConfigError(f"{collapse_home(source)} is a folder: pass "
                          f"{_option('recursive=True', '-r')} to copy folders")
    relative = target_rel2home if target_rel2home is not None else _home_relative(source)
    target = _remote_target(relative)
    staging = _prepare_target(ssh, target, overwrite, not source.is_dir())
    try:
        _upload_into(ssh, source, target, staging, compress, progress, excludes)
    except BaseException:  # Ctrl-C at any moment (measuring the folder, starting the stream)
        _discard(ssh, staging)
        raise
    return target


def _upload_into(ssh: SSH, source: Path, target: str, staging: str, compress: bool,
                 progress: Callable[[int], None] | None, excludes: tuple[str, ...]) -> None:
    """_upload's transfer into the hidden ``staging`` folder, and the commit to ``target``."""
    meter = _Meter(progress, f"upload to {ssh.target.alias}:{target}")
    z = "z" if compress else ""
    if source.is_dir():
        folder = Path(os.path.realpath(source))  # ~/data -> /big/data travels as the folder
        command = _copy_command(UPLOAD_TAR_TEMPLATE, mode=f"x{z}f", staging=staging)
        producer: list[str] | None = [
            "tar", f"c{z}f", "-", "-C", str(folder.parent),
            *[f"--exclude={e}" for e in excludes], "--", folder.name]
        arrived = f"{staging}/{folder.name}"
        total = None if compress or progress is None else _tar_size(folder, excludes)
        plain = None
    else:
        arrived = f"{staging}/payload"
        command = _copy_command(UPLOAD_FILE_TEMPLATE, payload=arrived, gzip=compress,
                                mode=f"{source.stat().st_mode & 0o777:o}")
        # gzip checks length and CRC itself, in place of the size check
        producer = ["gzip", "-c", "--", str(source)] if compress else None
        plain = None if compress else source
        total = None if compress else source.stat().st_size
    with meter:
        meter.begin(total)
        _upload_stream(ssh, command, producer, plain, meter)
    # only once everything went through does this second command put the upload under the
    # target's name (a broken connection can never trigger it), its size checked first
    commit = _copy_command(UPLOAD_COMMIT_TEMPLATE, target=target, arrived=arrived,
                           old=staging + ".old", staging=staging,
                           size=meter.done if plain is not None else "-")
    response = ssh.run_shell_cmd_on_remote(commit, timeout=ssh.timeout, strict=False)
    if response.returncode != 0:
        raise TransferError(f"{meter.what} could not be put in place: "
                            f"{_last_line(response.stderr) or 'size mismatch'}")


def _prepare_target(ssh: SSH, target: str, overwrite: bool, file: bool = False) -> str:
    """Refuse an existing target unless asked (a folder, to a ``file``: never); make a hidden
    staging folder beside it, named here, so that an interruption at any moment knows what to
    remove."""
    staging = f"{posixpath.dirname(target)}/.stackops-partial.{random.getrandbits(48):012x}"
    script = _copy_command(UPLOAD_PREPARE_TEMPLATE, target=target, staging=staging,
                           overwrite=overwrite, file=file)
    try:
        response = ssh.run_shell_cmd_on_remote(script, timeout=ssh.timeout, strict=False)
    except BaseException:
        _discard(ssh, staging)
        raise
    where = f"{target} on {ssh.target.alias}"
    if response.returncode == 18:
        raise ConfigError(f"{where} {_last_line(response.stderr)}: a copy never replaces the home, "
                          "a folder holding it, or /", hint="name a folder inside it")
    if response.returncode == 19:
        raise ConfigError(f"{where} is a folder: a file never replaces one",
                          hint="end the target with / to copy the file into it")
    if response.returncode == 17:
        raise ConfigError(f"{target} already exists on {ssh.target.alias}",
                          hint=f"pass {_option('overwrite_existing=True', '--overwrite')} to "
                               "replace it")
    if response.returncode != 0:
        raise TransferError(f"cannot prepare {where}: {_last_line(response.stderr)}")
    return staging


def _upload_stream(ssh: SSH, command: str, producer: list[str] | None, source: Path | None,
                   meter: _Meter) -> None:
    """Stream ``producer``'s output (else the file ``source``) into ``command`` on the host."""
    def produce(write: Callable[[bytes], None], _readline: Any) -> None:
        proc = None
        if producer is not None:
            proc = subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stream: Any = proc.stdout if proc else open(str(source), "rb")  # noqa: SIM115
            with stream:
                for chunk in iter(lambda: stream.read(1 << 18), b""):
                    write(chunk)
            if proc is not None and proc.wait() != 0:
                why = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise TransferError(f"local {(producer or ['tar'])[0]} failed: {_last_line(why)}")
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    response = _stream_command(ssh, command, produce, meter, what=meter.what,
                               hint="nothing was left under the target's name; run the copy again")
    if response.returncode != 0:
        raise TransferError(f"{meter.what} failed (exit status {response.returncode}): "
                            f"{_reason(response.stderr)}")


def _discard(ssh: SSH, staging: str) -> None:
    if not ssh.is_alive:
        return
    with _suppress(Exception):
        ssh.run_shell_cmd_on_remote(_copy_command(DISCARD_TEMPLATE, staging=staging),
                                    timeout=ssh.timeout, strict=False)


def _stream_command(ssh: SSH, command: str,
                    produce: Callable[[Callable[[bytes], None], Callable[..., bytes]], None],
                    progress: Callable[[int], None] | None = None, timeout: float | None = None,
                    what: str = "",
                    hint: str = "nothing was left under the job's name; run it again") -> Response:
    """SSH.stream_command; silence both ways for ``timeout`` (default: the connection's) counts
    as a lost host. ``what`` and ``hint``: for the error when the host stops answering."""
    channel = _transfer_channel(ssh)
    if timeout is not None:
        channel.settimeout(timeout)
    watchdog = _Watchdog(ssh, timeout)
    sent, pending = [0, 0], bytearray()  # bytes sent, received

    def write(data: bytes) -> None:
        channel.sendall(data)
        watchdog.tick()
        sent[0] += len(data)
        if progress is not None:
            progress(sent[0])

    def readline(size: int | None = None) -> bytes:
        """A line of its output (b"" at the end); with ``size``, up to that many bytes."""
        while (b"\n" not in pending) if size is None else not pending:
            chunk = channel.recv(1 << 20)
            if not chunk:
                return b""
            pending.extend(chunk)
            sent[1] += len(chunk)
            watchdog.tick()
        end = pending.index(b"\n") + 1 if size is None else min(size, len(pending))
        line = bytes(pending[:end])
        del pending[:end]
        return line

    what = what or f"upload to {ssh.target.alias}"
    try:
        channel.exec_command(_bash_line(command))
        with watchdog:
            produce(write, readline)
        channel.shutdown_write()
        try:
            out, err, status = _drain(channel, max(60.0, 4 * ssh.timeout), command, str(ssh.target))
        except CommandError as exc:  # everything was sent, and then the host went quiet
            ssh._lost()
            raise TransferError(f"{what}: the host stopped answering after {sent[0]} bytes",
                                hint=hint) from exc
    except (OSError, EOFError, _paramiko().SSHException) as exc:
        raise _broke_off(ssh, what, sent[0] or sent[1], exc, channel, watchdog.fired) from exc
    finally:
        channel.close()
    return Response((bytes(pending) + out).decode("utf-8", "replace"),
                    err.decode("utf-8", "replace"), status, command, str(ssh.target))


def _serve_remotely(ssh: SSH, requests: list[dict[str, Any]], python: str = "python3",
                    talk: Callable[..., Any] | None = None,
                    timeout: float | None = None) -> list[Any]:
    """SSH.serve: the boot (see SERVE_BOOT_PY), then each request and its answer line in turn."""
    fence = f"--stackops-{random.getrandbits(64):016x}"
    answers: list[Any] = []
    said: list[str] = []

    def produce(write: Callable[[bytes], None], readline: Callable[[], bytes]) -> None:
        try:
            talk_to(write, readline)
        except (OSError, EOFError, _paramiko().SSHException):
            with _suppress(OSError, EOFError, _paramiko().SSHException):
                for line in iter(readline, b""):  # the host refused and left while we sent:
                    if "error" in _json_line(line):  # its word, rather than the broken pipe's
                        _answer_of(line, ssh.target.alias)
            raise

    def talk_to(write: Callable[[bytes], None], readline: Callable[[], bytes]) -> None:
        word = _boot_word(readline, fence)
        if word == "need":
            source = _own_source()
            write(b"%d\n" % len(source) + source)
            word = _boot_word(readline, fence)
        if word != "ready":
            said.append(word)
            return
        for request in requests:
            write(json.dumps(request).encode() + b"\n")
            line = talk(write, readline) if talk is not None and request.get("action") == \
                "handover" else readline()
            if not line:
                return
            answers.append(_answer_of(line, ssh.target.alias))
        write(b"\n")

    response = _stream_command(ssh, _serve_command(python, fence), produce,
                               timeout=max(timeout or 0.0, ssh.timeout))
    if len(answers) == len(requests):
        return answers
    if said and said[0].startswith("error "):  # the boot's own refusal: one line, said as it is
        hint = ("make it yours alone (chmod go-w), or set it elsewhere"
                if "refusing the store" in said[0] else None)
        raise ConfigError(f"on {ssh.target.alias}: {said[0][6:]}", hint=hint)
    why = _last_line(response.stderr) or f"exit status {response.returncode}"
    if response.returncode == 127 or "not found" in why and python in why:
        raise ConfigError(f"the interpreter {python!r} is not found on {ssh.target.alias}",
                          hint="install python3 (3.8+) there, or pass --python with one it has")
    raise CommandError(ssh.target.alias, "stackops (the executing side)", response.returncode,
                       why + ("\n" + _tail(response.stderr, 5) if response.stderr else ""))


def _boot_word(readline: Callable[[], bytes], fence: str) -> str:
    """What the boot said after the fence (``ready``, ``need``, ``error ...``); a login file's
    chatter before it is skipped; "" when the host said nothing of the kind."""
    while True:
        line = readline()
        if not line:
            return ""
        text = line.decode("utf-8", "replace")
        if text.startswith(fence + " "):
            return text[len(fence) + 1:].strip()


def _answer_of(line: bytes, host: str) -> Any:
    """The value of one answer line of serve(), or the StackopsError it reports, raised."""
    try:
        answer = json.loads(line)
    except ValueError:
        raise TransferError(f"{host} answered something unreadable: "
                            f"{_shorten(line.decode('utf-8', 'replace'), 200)}") from None
    if not isinstance(answer, dict) or ("ok" not in answer and "error" not in answer):
        raise TransferError(f"{host} answered something unexpected: {_shorten(repr(answer), 200)}")
    if "ok" in answer:
        return answer["ok"]
    record = answer["error"] if isinstance(answer["error"], dict) else {}
    error = _error_from_record(record, f"on {host}: ")
    if error is None:
        raise CommandError(host, "stackops (the executing side)", None,
                           str(record.get("evidence") or record.get("message") or record))
    raise error


def _download(ssh: SSH, source: str, target: str | os.PathLike[str] | None, compress: bool,
              recursive: bool, overwrite: bool, progress: Callable[[int], None] | None) -> Path:
    """SSH.copy_to_here: a file or folder appears whole under its name or not at all."""
    remote = _remote_path(source)
    probe = _copy_command(DOWNLOAD_PROBE_TEMPLATE, source=remote, measure=progress is not None)
    answer = ssh.run_shell_cmd_on_remote(probe, timeout=ssh.timeout).stdout.strip()
    kind, *fields = answer.split() or [""]
    size = fields[-1] if fields and (kind == "dir" or len(fields) == 2) else ""  # file MODE SIZE
    if kind == "missing":
        raise ConfigError(f"nothing to copy at {ssh.target.alias}:{remote}")
    if kind == "dir" and not recursive:
        raise ConfigError(f"{remote} is a folder: pass {_option('recursive=True', '-r')} to copy "
                          "folders")
    if target is None and not remote.startswith("~"):
        raise ConfigError(f"{remote} is outside the host's home, so it has no home-relative "
                          "place here", hint="give the target path explicitly")
    total = int(size) if size.strip().isdigit() else None
    if kind == "file" and total is None:  # wc could not read it
        raise TransferError(f"cannot read {ssh.target.alias}:{remote}",
                            hint="is it readable by the account you log in as there?")
    destination = _free_destination(expand_home(target if target is not None else remote),
                                    overwrite)
    if kind == "file" and destination.is_dir() and not destination.is_symlink():
        raise ConfigError(f"{collapse_home(destination)} is a folder: a file never replaces one",
                          hint="end the target with / to copy the file into it")
    _mkdir_private(destination.parent)
    _remove_stale_partials(destination.parent)
    with _Staged(destination, replace=True, folder=False) as made, \
            _Meter(progress, f"download from {ssh.target.alias}:{remote}") as meter:
        produced = Path(made)
        meter.begin(None if compress else total)  # the bytes on the wire, of a known total
        if kind == "dir":  # from inside: a results folder reached by a link comes as a folder
            command = _copy_command(DOWNLOAD_TAR_TEMPLATE, source=remote,
                                    mode=f"c{'z' if compress else ''}f")
            _download_tar(ssh, command, produced, compress, meter)
        else:  # a file growing meanwhile comes as it was then
            template = DOWNLOAD_FILE_GZIP_TEMPLATE if compress else DOWNLOAD_FILE_TEMPLATE
            command = _copy_command(template, source=remote, size=total or 0)
            _download_file(ssh, command, produced, total or 0, meter, remote, compress)
            os.chmod(produced, _kept_mode(fields[0]))
    return destination


def _kept_mode(octal: str) -> int:
    """The mode a downloaded file keeps: the source's permission bits (its exec bit too), never a
    setuid, setgid or sticky bit; private (0600) when the host could not say."""
    return int(octal, 8) & 0o777 if re.match(r"[0-7]{3,4}\Z", octal) else 0o600


def _download_file(ssh: SSH, command: str, path: Path, size: int, meter: _Meter,
                   remote: str, compressed: bool) -> None:
    import zlib

    unzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if compressed else None
    written = 0

    def receive(reader: _CountingReader) -> None:
        nonlocal written
        with open(path, "wb") as handle:
            while True:
                chunk = data = reader.read(1 << 20)
                if unzip is not None:  # an empty chunk (the end) flushes the rest
                    data = unzip.decompress(chunk) if chunk else unzip.flush()
                handle.write(data)
                written += len(data)
                if not chunk:
                    break

    try:
        status, err = _download_stream(ssh, command, meter, receive)
    except zlib.error as exc:
        raise TransferError(f"download from {ssh.target.alias}: the compressed stream is "
                            f"damaged: {exc}") from exc
    if status != 0 or written != size or (unzip is not None and not unzip.eof):
        why = _reason(err) or f"{remote} shrank while it was read (truncated or replaced?)"
        raise TransferError(f"download of {ssh.target.alias}:{remote} failed (exit status "
                            f"{status}, {written} of {size} bytes): {why}",
                            hint="run the copy again")


def _download_tar(ssh: SSH, command: str, staging: Path, compressed: bool, meter: _Meter) -> None:
    skipped: list[str] = []

    def receive(reader: _CountingReader) -> None:
        skipped.extend(_extract_tar(reader, staging, compressed))

    status, err = _download_stream(ssh, command, meter, receive)
    if status != 0:
        raise TransferError(f"download from {ssh.target.alias} failed (exit status {status}): "
                            f"{_reason(err)}")
    # tar itself leaves sockets out, and says so on its stderr
    skipped += [os.path.normpath(name)
                for name in re.findall(r"^tar: (.*): socket ignored$", err, re.MULTILINE)]
    _warn_left_out(f"download from {ssh.target.alias}", skipped)


def _warn_left_out(what: str, skipped: list[str]) -> None:
    """One warning naming what a copy of a folder left out (see _extract_tar)."""
    if skipped:
        log.warning("%s left out %d entr%s that cannot come safely (a link out of the folder, "
                    "a FIFO, a device, a socket): %s", what, len(skipped),
                    "y" if len(skipped) == 1 else "ies", _shorten(", ".join(sorted(skipped)), 600))


def _download_stream(ssh: SSH, command: str, meter: _Meter,
                     receive: Callable[[_CountingReader], None]) -> tuple[int, str]:
    """Run ``command`` on the host, ``receive`` its stdout; its exit status and stderr."""
    response = _stream_command(ssh, command,
                               lambda _write, read: receive(_CountingReader(read, meter)),
                               what=f"download from {ssh.target.alias}",
                               hint="nothing was left under the target's name; run the copy again")
    return response.returncode, response.stderr


def _transfer_channel(ssh: SSH) -> Any:
    """A channel whose reads and writes give up after the timeout: a stalled transfer has
    lost its host (a cut link sends no error, it just goes quiet)."""
    channel = ssh._open_channel()
    channel.settimeout(ssh.timeout)
    return channel


def _broke_off(ssh: SSH, what: str, done: int, exc: BaseException, channel: Any,
               stalled: bool = False) -> TransferError:
    """The error for a transfer that broke off, with what the remote side said (a full disk)."""
    import socket

    reason = _reason(_stderr_so_far(channel))
    if stalled or isinstance(exc, socket.timeout):
        ssh._lost()
        reason = reason or f"no progress for {ssh.timeout:g}s; the connection is dropped"
    return TransferError(f"{what} broke off after {done} bytes: "
                         f"{reason or exc or type(exc).__name__}",
                         hint="nothing was left under the target's name; run the copy again")


class _Watchdog:
    """Drops a connection whose upload made no progress for its timeout. paramiko's writes wait
    forever on a socket that stopped taking data (a cut link sends no error, it just goes quiet);
    closing the connection makes the stuck write fail at once."""

    def __init__(self, ssh: SSH, limit: float | None = None) -> None:
        import threading

        self.ssh, self.fired, self.last = ssh, False, time.monotonic()
        self.limit = limit or ssh.timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stackops-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self.last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def tick(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.limit / 4)):
            if time.monotonic() - self.last > self.limit:
                self.fired = True
                self.ssh._lost()
                return


def _stderr_so_far(channel: Any) -> str:
    data = b""
    with _suppress(Exception):
        while channel.recv_stderr_ready():
            data += channel.recv_stderr(65536)
    return data.decode("utf-8", "replace")


def _reason(stderr: str) -> str:
    """The line of a failed command's stderr that says why (tar's closing summary says nothing)."""
    lines = [line.strip() for line in stderr.splitlines()
             if line.strip() and "Exiting with failure status" not in line]
    return lines[0] if lines else ""


class _CountingReader:
    """A file-like view of a command's stdout (``read(size)``: _stream_command's) that reports
    how many bytes went by."""

    def __init__(self, read: Callable[..., bytes], progress: Callable[[int], None] | None) -> None:
        self.read_some, self.progress, self.count = read, progress, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.read_some(size if size > 0 else 1 << 20)
        self.count += len(chunk)
        if self.progress is not None and chunk:
            self.progress(self.count)
        return chunk


def _extract_tar(stream: Any, folder: Path, compressed: bool) -> list[str]:
    """Unpack a tar stream into ``folder``, refusing members named outside it. What cannot come
    safely is left out, and its names returned: a link out of the tree (absolute or through ..,
    never made: nothing may be written through it), a FIFO, a device. A hard link becomes a link
    to (or a copy of) a file unpacked before it, else it is left out too."""
    import tarfile

    files: set[str] = set()
    skipped: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|gz" if compressed else "r|") as archive:
            for member in archive:
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise TransferError(f"refusing archive member {member.name!r}")
                here = os.path.normpath(name)
                if member.islnk():
                    if not _hard_link(folder, here, member.linkname, files):
                        skipped.append(here)
                    continue
                if not (member.isfile() or member.isdir()
                        or member.issym() and _inside_link(member.linkname)):
                    skipped.append(here)
                    continue
                # as root, tarfile would chown to the host's owner: the files are ours, and no
                # setuid, setgid or sticky bit comes with them; a name already here (a hard link
                # to a file before it, a link) is replaced, never written through
                path = folder / here
                if not member.isdir() and (path.is_symlink() or path.is_file()):
                    path.unlink()
                member.uid, member.gid = os.getuid(), os.getgid()
                member.uname = member.gname = ""
                member.mode &= 0o777
                archive.extract(member, folder, set_attrs=not member.issym())
                if member.isfile():
                    files.add(here)
    except tarfile.TarError as exc:
        raise TransferError(f"the archive broke off: {exc}") from exc
    except OSError as exc:  # (a file's: a name too long here, a file where a folder is)
        if exc.filename is None:  # the stream's: _stream_command says the transfer broke off
            raise
        raise TransferError(f"cannot unpack {exc.filename}: {exc.strerror}") from exc
    return sorted(skipped)


def _inside_link(target: str) -> bool:
    """Whether a link's target stays in its tree: relative and never through .."""
    return bool(target) and not os.path.isabs(target) and ".." not in Path(target).parts


def _hard_link(folder: Path, name: str, target: str, files: set[str]) -> bool:
    """``name`` made the same file as ``target``, a file unpacked from the same archive before
    (a link to it, or a copy where the file system has none); False when there is none."""
    source = os.path.normpath(target) if _inside_link(target) else ""
    if source not in files:
        return False
    path = folder / name
    if path.is_dir() and not path.is_symlink():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        path.unlink()
    try:
        os.link(folder / source, path)
    except OSError:
        shutil.copy(folder / source, path)
    return True


def _free_destination(destination: Path, overwrite: bool) -> Path:
    """A local copy target that may be (re)placed: never the home or a folder holding it, and an
    existing one only with ``overwrite``."""
    real, home = os.path.realpath(destination), os.path.realpath(Path.home())
    if real in (home, os.sep) or home.startswith(real.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{destination} is your home, or holds it: a copy never replaces that",
                          hint="name a folder inside it")
    here = os.path.realpath(os.getcwd())
    if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{destination} is the folder you are in, or holds it: a copy never "
                          "replaces that", hint="name a folder inside it, or end it with / to "
                                                "copy into it")
    if (destination.exists() or destination.is_symlink()) and not overwrite:
        raise ConfigError(f"{collapse_home(destination)} already exists",
                          hint=f"pass {_option('overwrite=True', '--overwrite')} to replace it")
    return destination


def _make_temp_dir(parent: Path) -> str:
    import tempfile

    _remove_stale_partials(parent)
    return tempfile.mkdtemp(prefix=".stackops-partial.", dir=parent)


def _remove_stale_partials(parent: Path) -> None:
    """Remove the staging folders (_Staged's boxes, _make_temp_dir's) a dropped download left in
    ``parent`` (our names only) once nothing in them changed for a day (a live one writes)."""
    since = time.time() - 86400
    for folder in parent.glob(".stackops-partial.*"):
        if not re.match(r"\.stackops-partial\.[a-z0-9_]{8}\Z", folder.name) or folder.is_symlink():
            continue
        with _suppress(OSError):
            fresh = folder.lstat().st_mtime > since or any(
                os.lstat(os.path.join(root, name)).st_mtime > since
                for root, dirs, files in os.walk(folder) for name in dirs + files)
            if not fresh:
                shutil.rmtree(folder)


def _home_relative(path: Path) -> str:
    collapsed = collapse_home(path)
    if not collapsed.startswith("~"):
        raise ConfigError(f"{path} is outside your home, so it has no home-relative place on the "
                          "host", hint="give the target path explicitly")
    return collapsed


def _remote_path(path: str) -> str:
    """A remote path as given: ``~/...`` or absolute; a relative one is taken from the home."""
    if not path:
        raise ConfigError("empty remote path")
    return path if path.startswith(("~", "/")) else "~/" + path


def _remote_target(path: str) -> str:
    """A remote path a copy may (re)place: not the host's home, a folder above it, or with '..'."""
    path = _remote_path(path)
    if posixpath.normpath(path) in ("~", "/") or ".." in path.split("/"):
        raise ConfigError(f"{path!r} is the host's home, holds it, or climbs out of it with '..': "
                          "a copy never replaces such a folder",
                          hint="name a folder inside it, e.g. ~/backup")
    return path


# -- cloud transfer (rclone) ---------------------------------------------------------------------

def _rclone(*args: str, what: str, timeout: float = 3600,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run rclone here; a failure is a TransferError quoting rclone's own message."""
    binary = shutil.which("rclone")
    if binary is None:
        raise DependencyError("rclone is not installed on this machine",
                              hint="install it (e.g. apt-get install rclone) and configure a "
                                   "remote")
    try:
        done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise TransferError(f"rclone {what} did not finish within {timeout:g}s") from exc
    if done.returncode != 0:
        raise TransferError(f"rclone {what} failed (exit status {done.returncode}): "
                            f"{_tail(done.stderr or done.stdout, 3) or 'no message'}")
    return done


def cloud_base(cloud_name: str) -> str:
    """Where stackops keeps things on a cloud remote: ``name:stackops``; ``name:path`` as given."""
    return cloud_name if ":" in cloud_name else f"{cloud_name}:stackops"


_KNOWN_CLOUDS: set[str] = set()


def check_cloud_remote(cloud_name: str) -> None:
    """Refuse a cloud name rclone does not know here (before anything is sent); asked once."""
    name = cloud_name.split(":", 1)[0]
    # the same rclone config, the same answer
    key = f"{Path.home()}|{os.environ.get('RCLONE_CONFIG', '')}|{name}"
    if key in _KNOWN_CLOUDS:
        return
    known = _rclone("listremotes", what="listremotes", timeout=60).stdout.split()
    if f"{name}:" in known:
        _KNOWN_CLOUDS.add(key)
    else:
        raise ConfigError(f"rclone knows no remote called {name!r} here "
                          f"(it knows: {' '.join(known) or 'none'})",
                          hint="add it with: rclone config")


def _pack_unit(archive: Path, job_root: Path, data: list[str]) -> Path:
    """One tar of a cloud unit, as a worker unpacks it into the unit's own folder: ``job/`` (the
    job folder, its code inside with copy_repo) and ``home/<path>`` for each data path."""
    import tarfile

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(job_root), arcname="job")
        for item in data:
            tar.add(str(expand_home(item)), arcname="home/" + _home_relative(expand_home(item))[2:])
    return archive


def transfer_cloud(ssh: SSH | None, config: RemoteStackOpsConfig, job_params: JobParams,
                   file_manager: FileManager, data: list[str]) -> tuple[str, str]:
    """Upload the job folder and its data with rclone as one archive (rclone's per-file hash
    check runs once), which the host fetches when the job is fired. Returns (where it is, its
    SHA-256, checked before anything is unpacked). With ``ssh``, a job id the host has, a host
    whose rclone lacks the remote or without the job's interpreter, is refused before anything
    is uploaded."""
    cloud = config.cloud_name or ""
    check_cloud_remote(cloud)
    python = config.python or "python3"
    if ssh is not None:
        wanted = [f"exists:{file_manager.job_root_rh}", f"rclone:{cloud}", f"command:{python}"]
        facts = ssh.serve([{"action": "facts", "facts": wanted}])[0]
        if facts.get(f"exists:{file_manager.job_root_rh}"):
            raise ConfigError(f"job {file_manager.job_id!r} already exists on {ssh.target.alias} "
                              f"at {file_manager.job_root_rh}",
                              hint="choose another job_id, or leave it out for a fresh one")
        if not facts.get(f"rclone:{cloud}"):
            raise ConfigError(f"{ssh.target.alias} cannot reach cloud remote {cloud!r}",
                              hint="install rclone on the host and configure the same remote there")
        if not facts.get(f"command:{python}"):
            raise ConfigError(f"the interpreter {python!r} is not found on {ssh.target.alias}",
                              hint="install it there, or pass --python (python=) with one it has")
    archive = Path(_make_temp_dir(file_manager.job_root.parent)) / f"{file_manager.job_id}.tar"
    try:
        _pack_unit(archive, file_manager.job_root, data)
        digest = _sha256_file(archive)
        target = f"{cloud_base(cloud)}/jobs/{file_manager.job_id}.tar"
        _rclone("copyto", str(archive), target, what=f"upload to {target}")
    finally:
        shutil.rmtree(archive.parent, ignore_errors=True)
    return target, digest


# ============================================================================================
# 12. job hand-over: arguments, code snapshots, transfer to a host, the cloud queue
# ============================================================================================

def _check_kwargs(func_kwargs: Any) -> dict[str, Any]:
    if func_kwargs is None:
        return {}
    if not isinstance(func_kwargs, dict) or not all(isinstance(key, str) for key in func_kwargs):
        raise ConfigError("func_kwargs must be a dict with string keys, got "
                          f"{type(func_kwargs).__name__}")
    try:
        json.dumps(func_kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"func_kwargs must be JSON data (they travel as JSON): {exc}") from exc
    return func_kwargs


MAX_KWARGS_BYTES = 512 * 2**20  # a kwargs file is parsed in memory: bigger data travels with --data


def _read_kwargs_file(source: str) -> str:
    """The text of a kwargs file: a regular file (not a FIFO or a device, which may never end) of
    at most MAX_KWARGS_BYTES, read without blocking on what is not a regular file."""
    import stat

    path = expand_home(source)
    limit = f"{MAX_KWARGS_BYTES // 2**20} MiB"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot read kwargs file {source}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"kwargs file {source} is not a regular file",
                              hint="write the JSON object into a file and pass @that-file")
        if info.st_size > MAX_KWARGS_BYTES:
            size = f"{info.st_size / 2**20:.0f} MiB"
            raise ConfigError(f"kwargs file {source} is {size}, more than {limit}",
                              hint=f"send big inputs as {_option('data', '--data')} files; pass "
                                   "their paths as kwargs")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_KWARGS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read kwargs file {source}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_KWARGS_BYTES:  # it grew while we read it
        raise ConfigError(f"kwargs file {source} is more than {limit}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"kwargs file {source} is not UTF-8 text: {exc}") from exc


def parse_kwargs(text: str) -> dict[str, Any]:
    """Keyword arguments from the command line: a JSON object, or ``@file.json``."""
    source = "--kwargs"
    if text.startswith("@"):
        source = text[1:]
        text = _read_kwargs_file(source)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source} is not JSON: {exc}",
                          hint='e.g. --kwargs \'{"epochs": 3}\'') from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(value).__name__}")
    return value


def _job_params_for(func: Any) -> tuple[JobParams, bytes | None]:
    """JobParams for a script path, FILE.py:FUNC, function or bound method (+ pickled instance),
    or a command: a list (or tuple) of strings, run in this process's folder."""
    if isinstance(func, (list, tuple)):
        return JobParams.from_command(func), None
    if isinstance(func, (str, os.PathLike)):
        text = os.fspath(func)
        if re.search(r"\.py:[^/\\]+\Z", text):
            return JobParams.from_function_ref(text), None
        return JobParams.from_script(text), None
    if not callable(func):
        raise ConfigError("func must be a script path, a function or a bound method, got "
                          f"{type(func).__name__}")
    params = JobParams.from_callable(func)
    if params.kind != "method":
        return params, None
    import pickle

    try:
        return params, pickle.dumps(func.__self__, protocol=4)
    except Exception as exc:
        raise ConfigError(f"the instance of {params.func_class} cannot travel with the job: it "
                          "does not "
                          f"pickle ({exc})", hint="make the object picklable, or pass a plain "
                                                  "function") from exc


def _parameters(func: Any, params: JobParams) -> list[tuple[str, str, bool]] | None:
    """(name, kind, has a default) of each parameter the job's callable takes; None when that
    cannot be known. A function object is asked; a FILE.py:FUNC is read with ast, never imported."""
    if params.kind in ("script", "command"):
        return None
    if not isinstance(func, (str, os.PathLike)):
        import inspect

        try:
            found = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            return None
        return [(p.name, p.kind.name, p.default is not p.empty) for p in found]
    file = expand_home(params.file_path_rh)
    return _parameters_in_source(file, params.func_class, params.func_name or "")


def _parameters_in_source(file: Path, owner: str | None, name: str,
                          text: str | None = None) -> list[tuple[str, str, bool]] | None:
    import _ast as ast  # (see _top_level_names)

    try:
        source = file.read_text(encoding="utf-8") if text is None else text
        tree: Any = compile(source, "<unknown>", "exec", ast.PyCF_ONLY_AST)
        body = tree.body
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    for part in owner.split(".") if owner else []:
        holder = next((n for n in reversed(body)
                       if isinstance(n, ast.ClassDef) and n.name == part), None)
        if holder is None:
            return None
        body = holder.body
    node = next((n for n in reversed(body) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == name), None)
    decorators = [d.id for d in node.decorator_list if isinstance(d, ast.Name)] if node else []
    if node is None or len(decorators) != len(node.decorator_list) \
            or set(decorators) - {"staticmethod", "classmethod"}:
        return None  # defined some other way, or behind a decorator that may change what it takes
    spec = node.args
    positional = spec.posonlyargs + spec.args
    first_default = len(positional) - len(spec.defaults)
    found = [(arg.arg, "POSITIONAL_ONLY" if i < len(spec.posonlyargs) else "POSITIONAL_OR_KEYWORD",
              i >= first_default) for i, arg in enumerate(positional)]
    if owner and "staticmethod" not in decorators:
        found = found[1:]  # self or cls
    if spec.vararg:
        found.append((spec.vararg.arg, "VAR_POSITIONAL", True))
    for arg, default in zip(spec.kwonlyargs, spec.kw_defaults):
        found.append((arg.arg, "KEYWORD_ONLY", default is not None))
    if spec.kwarg:
        found.append((spec.kwarg.arg, "VAR_KEYWORD", True))
    return found


def _check_call(parameters: list[tuple[str, str, bool]] | None, kwargs: dict[str, Any],
                workload: bool, what: str) -> None:
    """Refuse now a call that can only fail once the job runs: a keyword the function does not
    take, or a parameter without a default that nothing gives."""
    if parameters is None:
        return
    names = [n for n, kind, _ in parameters if kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY")]
    given = set(kwargs) | ({"workload_params"} if workload else set())
    if not any(kind == "VAR_KEYWORD" for _, kind, _ in parameters):
        unknown = sorted(given - set(names))
        if unknown:
            raise ConfigError(f"{what} takes no parameter {', '.join(map(repr, unknown))} "
                              f"(it takes: {', '.join(names) or 'nothing'})",
                              hint="a function run with a workload must take workload_params"
                              if unknown == ["workload_params"] else "fix the names in the kwargs")
    missing = [n for n, kind, has_default in parameters
               if not has_default and not kind.startswith("VAR_") and n not in given]
    if missing:
        needed = ", ".join(map(repr, missing))
        example = f'{{"{missing[0]}": ...}}'
        raise ConfigError(f"{what} needs {needed}, which the kwargs do not give",
                          hint="e.g. " + _option(f"func_kwargs={example}", f"--kwargs '{example}'"))


REPO_EXCLUDES = (".git", ".venv", "venv", "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache",
                 ".ruff_cache", ".tox", "*.egg-info")


_EXCLUDED: list[Any] = []


def _excluded(relative: str) -> bool:
    """Whether a path has a part that REPO_EXCLUDES leaves out (one compiled pattern: fnmatch per
    part and pattern cost a third of a second for 500 files)."""
    if not _EXCLUDED:
        import fnmatch

        _EXCLUDED.append(re.compile("|".join(fnmatch.translate(p) for p in REPO_EXCLUDES)))
    return any(_EXCLUDED[0].match(part) for part in relative.split("/"))


def _repo_files(repo: Path, prefix: str = "") -> list[tuple[str, os.stat_result]]:
    """What copy_repo sends, relative to the repo, with each file's lstat: for a git work tree,
    the tracked and the untracked-not-ignored files (git ls-files -co --exclude-standard), and
    the same inside each submodule and each nested repo (their files as they are checked out
    here: git lists either as one folder); else every file; either way without .git, virtual
    environments and caches (REPO_EXCLUDES)."""
    names: list[str] | None = None
    if (repo / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard",
                                 "-z"],
                                capture_output=True, stdin=subprocess.DEVNULL)
        if listed.returncode == 0:
            names = [n.rstrip("/") for n in
                     listed.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
    if names is None:
        names = []
        for folder, dirs, files in os.walk(repo):
            here = os.path.relpath(folder, repo)
            start = "" if here == "." else here + "/"
            names += [start + name for name in files]
            names += [start + d for d in dirs if os.path.islink(Path(folder) / d)]
            dirs[:] = sorted(d for d in dirs if not _excluded(start + d))
    found = []
    root = str(repo) + "/"
    for name in sorted(set(names)):
        try:
            info = os.lstat(root + name)
        except OSError:  # tracked but deleted here
            continue
        if _excluded(name):
            continue
        if stat.S_ISDIR(info.st_mode):  # a submodule or a nested repo
            if os.path.lexists(f"{root}{name}/.git"):
                found += _repo_files(Path(root + name), f"{prefix}{name}/")
            else:
                log.warning("left out %s%s: a submodule that is not checked out here", prefix, name)
        elif stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
            found.append((prefix + name, info))
    return found if prefix else sorted(found, key=lambda item: item[0])


class _HashCache:
    """sha256 of local files, remembered in ~/.cache/stackops by path with the file's (size,
    mtime_ns, ctime_ns, inode, device), so that an unchanged tree is not read again at the next
    submit. Only a shortcut to a hash: a file is remembered only when its mtime and ctime were
    more than RACY_NS older than the moment it was hashed (a write that soon may leave both
    unchanged: git's racy rule), so a file that recent is hashed again at every use; and every
    copy is checked against the hash anyway."""

    def __init__(self) -> None:
        cache = expand_home(os.environ.get("XDG_CACHE_HOME") or "~/.cache")
        self.path = cache / "stackops" / "hashes.json"
        try:
            self.known: dict[str, list[Any]] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.known = {}
        if not isinstance(self.known, dict):
            self.known = {}
        self.changed = False
        self.now = time.time_ns()  # before any file is read

    def digest(self, path: str, info: os.stat_result, fresh: bool = False) -> str:
        """The sha256 of the file ``path``, lstat ``info`` (``fresh``: not from the cache)."""
        stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]
        cached = self.known.get(path)
        if not fresh and isinstance(cached, list) and cached[:5] == stamp:
            return str(cached[5])
        digest = _sha256_file(path)
        if max(info.st_mtime_ns, info.st_ctime_ns) + RACY_NS < self.now:
            self.known[path] = [*stamp, digest]
            self.changed = True
        elif self.known.pop(path, None) is not None:
            self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            with _suppress(OSError):
                _atomic_write_json(self.path, self.known)


def _link_entry(repo: Path, relative: str) -> str | None:
    """The target a link of the snapshot keeps: relative and inside the tree (an absolute link to
    a path inside the repo becomes relative), or None for a link out of the repo."""
    link = os.readlink(f"{repo}/{relative}")
    if os.path.isabs(link):
        target = posixpath.normpath(link)
        for root in dict.fromkeys((str(repo), os.path.realpath(repo))):
            if target.startswith(root.rstrip("/") + "/"):
                inner = target[len(root.rstrip("/")) + 1:]
                link = posixpath.relpath(inner, posixpath.dirname(relative) or ".")
                break
    if _link_inside(relative, link):
        return link
    log.warning("left out %s: a link out of the repo (%s)", relative, link)
    return None


def code_snapshot(repo: Path, fresh: set[str] | None = None
                  ) -> tuple[str, list[list[Any]], dict[str, Path]]:
    """The content-addressed snapshot of ``repo`` that copy_repo sends: (its id, its manifest of
    ``[path, kind, sha256 or link target]`` with kind ``f``, ``x`` (executable) or ``l`` (a link
    inside the tree), and the local file of each blob). The files in ``fresh`` are hashed anew."""
    import hashlib

    cache = _HashCache()
    entries: list[list[Any]] = []
    sources: dict[str, Path] = {}
    root = str(repo) + "/"
    for relative, info in _repo_files(repo):
        if stat.S_ISLNK(info.st_mode):
            try:
                link = _link_entry(repo, relative)
            except OSError:  # no longer a link
                continue
            if link is not None:
                entries.append([relative, "l", link])
            continue
        try:
            digest = cache.digest(root + relative, info, relative in (fresh or ()))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue  # gone since it was listed: the snapshot is the tree without it
        entries.append([relative, "x" if info.st_mode & 0o100 else "f", digest])
        if digest not in sources:
            sources[digest] = Path(root + relative)
    cache.save()
    identity = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()[:32]
    return identity, entries, sources


def _tree_sources(repo: Path, entries: list[list[Any]]) -> dict[str, list[str]]:
    """For each sha256 of a manifest, the files of the work tree ``repo`` that it names."""
    sources: dict[str, list[str]] = {}
    for relative, kind, value in entries:
        if kind != "l":
            sources.setdefault(value, []).append(f"{repo}/{relative}")
    return sources


def scm_version(repo: Path) -> str:
    """A PEP 440 version from ``git describe`` here, for setuptools-scm / hatch-vcs projects whose
    snapshot has no .git: ``1.2`` on a tag, ``1.2.post3+gabc1234`` after it, ``0.0.post5+g...``
    without tags (``.dirty`` added for uncommitted changes); empty outside git."""
    if not (repo / ".git").exists() or not shutil.which("git"):
        return ""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        return done.stdout.strip() if done.returncode == 0 else ""

    described = git("describe", "--tags", "--long", "--dirty", "--match", "*[0-9]*")
    match = re.match(r"v?(\d+(?:\.\d+)*)-(\d+)-g([0-9a-f]+)(-dirty)?\Z", described)
    if match:
        tag, distance, sha, dirty = match.groups()
    else:
        sha = git("rev-parse", "--short", "HEAD")
        if not sha:
            return ""
        tag, distance = "0.0", git("rev-list", "--count", "HEAD") or "0"
        dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no") else None
    if distance == "0" and not dirty:
        return tag
    return f"{tag}.post{distance}+g{sha}" + (".dirty" if dirty else "")


def _data_items(data: list[str]) -> list[dict[str, Any]]:
    """Each data path as it travels: its target (home-relative, or absolute outside the home),
    whether it is a folder, its files with size, mtime_ns and, for a file changed less than RACY_NS
    ago or outside the home, its sha256 (``stamps``, read by _data_plan), and each one's local
    path (``sources``). A file outside the home is never replaced there, so it is compared by its
    bytes: a host that sees the very file (a shared disk) cannot tell it from a copy by stamps."""
    items = []
    now = time.time_ns()
    hashes = _HashCache()
    for text in data:
        path = expand_home(text)
        outside = not collapse_home(path).startswith("~")
        stamps: list[list[Any]] = []
        sources: dict[str, Path] = {}
        found = [(path, "")] if path.is_file() else []
        if path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    full = Path(folder) / name
                    if full.is_file():
                        found.append((full, full.relative_to(path).as_posix()))
        for full, relative in found:
            info = full.stat()
            recent = max(info.st_mtime_ns, info.st_ctime_ns) + RACY_NS >= now
            stamps.append([relative, info.st_size, info.st_mtime_ns,
                           hashes.digest(str(full), info, recent) if recent or outside else ""])
            sources[relative] = full
        items.append({"target": collapse_home(path), "dir": path.is_dir(), "stamps": stamps,
                      "sources": sources})
    hashes.save()
    return items


def _data_in_repo(data: list[str], repo_rh: str) -> list[str]:
    """The data paths inside the repo, relative to it: the job's own copy of the repo shows each
    as a link to where the data is on the machine that runs it (JobContext)."""
    repo = expand_home(repo_rh)
    inside = []
    for text in data:
        path = expand_home(text)
        if path != repo and repo in path.parents:
            inside.append(path.relative_to(repo).as_posix())
    return inside


def transfer_sftp(ssh: SSH, config: RemoteStackOpsConfig, job_params: JobParams,
                  file_manager: FileManager,
                  data: list[str], progress: Callable[[int], None] | None = None,
                  snapshot: tuple[str, list[list[Any]], dict[str, Path]] | None = None) -> bool:
    """Hand the job over in one remote command (see _hand_over). True when the host sees our job
    folder (a shared home): nothing is sent, and folder, code and data are used in place."""
    if config.copy_repo and snapshot is None:
        snapshot = code_snapshot(expand_home(job_params.repo_path_rh))
    spec = _Handing(file_manager.job_root, file_manager.job_root_rh,
                    config.python or "python3", snapshot, list(data))
    return _hand_over(ssh, spec, progress).shared


@_model
class _Handing:
    """What one hand-over carries: a job folder here and its home-relative place there, the
    interpreter, the code snapshot, the data, the members of a sweep or an array (their own
    files), what the host must have (``need``: facts it answers, e.g. ``command:sbatch``), the
    e-mail config it must hold, and whether it fires the job(s) at once (once ``gate`` says go)."""

    root: Path
    root_rh: str
    python: str
    snapshot: tuple[str, list[list[Any]], dict[str, Path]] | None
    data: list[str]
    members: list[list[Any]] = _field(default_factory=list)
    need: list[str] = _field(default_factory=list)
    email: str | None = None
    fire: list[str] = _field(default_factory=list)  # the job folders to fire (~/...)
    gate: _Gate | None = None


@_model
class _HandOver:
    """What one hand-over did: whether the host sees this machine's job folder (a shared home),
    the host's node name, what it fired (and for a cloud transfer, the SHA-256 of the archive it
    uploaded)."""

    shared: bool
    node: str
    fired: dict[str, Any]
    sha256: str = ""


def _hand_over(ssh: SSH, spec: _Handing,
               progress: Callable[[int], None] | None = None) -> _HandOver:
    """Hand a job (or a sweep's or array's shared folder and members) over in ONE remote command,
    one shell start on the host (serve's ``handover``): ask what the host lacks (snapshot blobs,
    data files that differ, whether it sees this machine's folder), send only that with the job
    folder, and fire it there at once if asked. A refusal (the job exists there, data that would
    overwrite the host's own, a missing interpreter) sends nothing. Only stackops' own trees and
    the data files (each replaced whole) are written there."""
    items = _data_items(spec.data)
    cache: dict[str, bool] = getattr(ssh, "_sees", None) or {}
    ssh._sees = cache  # type: ignore[attr-defined]
    base_rh = spec.root_rh.rsplit("/", 1)[0]
    key, nonce = f"{spec.root.parent}|{base_rh}", f".stackops-nonce-{random.getrandbits(64):016x}"
    request = _hand_over_request(spec, items, [] if key in cache else [f"{base_rh}/{nonce}"])
    conversation = _HandOverTalk(ssh, spec, items, request, cache, key)
    if key not in cache:
        _write_plain(spec.root.parent / nonce, nonce)
    try:
        with _Meter(progress, f"hand-over to {ssh.target.alias}") as meter:
            conversation.meter = meter
            answer = ssh.serve([request], python="python3", talk=conversation.talk)[0]
    finally:
        with _suppress(FileNotFoundError):
            os.unlink(spec.root.parent / nonce)
    if conversation.refusal is not None:
        raise conversation.refusal
    shared = cache.get(key, False)
    if shared:
        log.info("%s sees this machine's %s: the job is used in place", ssh.target.alias, base_rh)
    plan = conversation.plan or {}
    return _HandOver(shared, str(plan.get("node", "")), answer.get("fired") or {})


def _hand_over_request(spec: _Handing, items: list[dict[str, Any]],
                       nonces: list[str]) -> dict[str, Any]:
    """The hand-over's request: what the host is asked it lacks and what it does after."""
    ident, _entries, blobs = spec.snapshot or ("", [], {})
    base_rh = spec.root_rh.rsplit("/", 1)[0]
    need = list(spec.need) + [f"command:{spec.python}"]
    return {"action": "handover", "job_root": spec.root_rh, "snapshot": ident,
            "roots": [spec.root_rh] + [f"{base_rh}/{job_id}" for job_id, _ in spec.members],
            "blobs": sorted(blobs), "folder_blobs": sorted({d for d, _ in
                                                           _folder_blobs(spec.root).values()}),
            "nonces": nonces, "facts": need, "email": spec.email, "fire": spec.fire,
            "gate": spec.gate is not None,
            "data": [{k: item[k] for k in ("target", "dir", "stamps")} for item in items]}


class _HandOverTalk:
    """This machine's side of a hand-over (see _act_handover): read the plan, refuse or send what
    the host lacks (nothing to a host that sees our files), send again blobs the host found damaged,
    say go once the gate opens; returns the final answer line."""

    def __init__(self, ssh: SSH, spec: _Handing, items: list[dict[str, Any]],
                 request: dict[str, Any], cache: dict[str, bool], key: str) -> None:
        self.ssh, self.spec, self.items, self.request = ssh, spec, items, request
        self.cache, self.key = cache, key
        self.plan: dict[str, Any] | None = None
        self.refusal: StackopsError | None = None
        self.meter: _Meter | None = None

    def talk(self, write: Callable[[bytes], None], readline: Callable[[], bytes]) -> bytes:
        line = readline()
        message = _json_line(line)
        if "plan" not in message:
            return line  # refused before planning: the answer says why
        self.plan = plan = message["plan"]
        self.cache.setdefault(self.key, bool(plan["seen"]))
        self.refusal = _plan_refusal(self.ssh.target.alias, self.spec, self.items, plan)
        if self.refusal is not None:
            write(b'{"abort": true}\n')
        elif self.cache[self.key]:
            if self.spec.snapshot is not None and not (self.spec.root / CODE_DIR).exists():
                _ident, entries, sources = self.spec.snapshot  # the host runs it from here
                _materialize(entries, {d: str(p) for d, p in sources.items()},
                             self.spec.root / CODE_DIR)
                _link_members_code(self.spec.root, self.spec.members)
            roots = self.request["roots"]
            write(json.dumps({"shared": True, "roots": roots}).encode() + b"\n")
        else:
            self._send(write, plan["missing"], plan["data"], whole=True)
        while True:
            line = readline()
            message = _json_line(line)
            if "resend" in message:
                self._send(write, message["resend"], [], whole=False)
            elif "placed" in message:
                go = self.spec.gate(write) if self.spec.gate is not None else True
                write(json.dumps({"go": go}).encode() + b"\n")
            else:
                return line

    def _send(self, write: Callable[[bytes], None], blobs: list[str],
              data: list[dict[str, Any]], whole: bool) -> None:
        """The header (``whole``: with the job folder), the parts, the end line; metered."""
        meter, plain = self.meter, write
        if meter is not None:
            def write(data: bytes) -> None:
                plain(data)
                meter(meter.done + len(data))
        by_blob = _folder_blobs(self.spec.root)
        sources = dict((self.spec.snapshot or ("", [], {}))[2])
        sources.update((digest, path) for digest, path in by_blob.values())
        missing = [digest for digest in blobs if digest not in sources]
        if missing:
            raise StackopsError(f"the host asks for a file this snapshot no longer has "
                                f"(sha256 {missing[0][:12]})", hint="submit again: a fresh "
                                "snapshot of the repo is taken")
        parts: list[tuple[str, Path | str | None]] = [(f"b/{d}", sources[d]) for d in blobs]
        for index, (item, answer) in enumerate(zip(self.items, data)):
            parts += [(f"d/{index}/{rel}" if rel else f"d/{index}", item["sources"][rel])
                      for rel in answer["need"]]
        if whole:
            parts += _folder_parts(self.spec.root, by_blob)
            header = {"manifest": (self.spec.snapshot or ("", None, {}))[1],
                      "members": self.spec.members}
            write(json.dumps(header).encode() + b"\n")
        sizes = [path.stat().st_size for _name, path in parts if isinstance(path, Path)]
        if meter is not None:
            meter.begin(meter.done + sum(sizes))
        for name, path in parts:
            _send_part(write, name, path)
        write(b'{"end": true}\n')


def _link_members_code(shared: Path, members: list[list[Any]]) -> None:
    """The members of a sweep or array, written here before the shared folder had its code (a
    host's job carries none until the host turns out to share this home), link to it now."""
    for job_id, _files in members:
        link = shared.parent / job_id / CODE_DIR
        if not os.path.lexists(link):
            os.symlink(f"../{shared.name}/{CODE_DIR}", link)


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _plan_refusal(host: str, spec: _Handing, items: list[dict[str, Any]],
                  plan: dict[str, Any]) -> StackopsError | None:
    """Why the job cannot go to the host as planned (nothing is sent then), or None."""
    facts = plan.get("facts") or {}
    if facts.get(f"command:{spec.python}") is False:
        return ConfigError(f"the interpreter {spec.python!r} is not found on {host}",
                           hint="install it there, or pass --python (python=) with one it has")
    for need in spec.need:
        if need.startswith("exists:") and facts.get(need) is False:
            return ConfigError(f"{need[7:]} is not on {host}, and the job needs it",
                               hint="pass --copy-repo (copy_repo=True) to send the repo along")
    if plan.get("exists") and not plan.get("seen"):
        name = plan["exists"][0].rsplit("/", 1)[-1]
        return ConfigError(f"job {name!r} already exists on {host}",
                           hint="choose another job_id, or leave it out for a fresh one")
    for item, answer in zip(items, plan.get("data") or []):
        if "conflict" in answer:
            return ConfigError(f"cannot sync {item['target']} to {host}: {answer['conflict']}",
                               hint="nothing was sent; move the host's copy aside or rename "
                                    "the data")
    return None


class _Together:
    """Hosts that start their jobs together or not at all (Cluster.run): each one, its job in
    place, waits until every host has its job in place (go) or one failed (stop), and keeps its
    link busy meanwhile (a silent upload counts as stalled)."""

    def __init__(self, count: int) -> None:
        import threading

        self.waiting, self.failed = count, False
        self._changed = threading.Condition()

    def arrive(self, write: Callable[[bytes], None]) -> bool:
        with self._changed:
            self.waiting -= 1
            self._changed.notify_all()
        while True:
            with self._changed:
                if self.failed or self.waiting <= 0:
                    return not self.failed
                self._changed.wait(1.0)
            write(b'{"wait": true}\n')

    def fail(self) -> None:
        with self._changed:
            self.failed = True
            self._changed.notify_all()


def _folder_blobs(root: Path) -> dict[str, tuple[str, Path]]:
    """The big files of a job folder that every job shares (stackops itself and its bytecode,
    under ``python/``), by path in the folder: (SHA-256, path here). They travel as blobs of the
    host's snapshot store, so a host that has them gets only their names."""
    import hashlib

    found = {}
    folder = root / "python"
    for path in sorted(folder.rglob("*")) if not folder.is_symlink() else []:
        if path.is_file() and not path.is_symlink() and path.stat().st_size >= FOLDER_BLOB_MIN:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[path.relative_to(root).as_posix()] = (digest, path)
    return found


def _folder_parts(root: Path, by_blob: dict[str, tuple[str, Path]]
                  ) -> list[tuple[str, Path | str | None]]:
    """The job folder as parts: folders (None), links (``->target``), files the host's store
    holds (their digest), and plain files."""
    parts: list[tuple[str, Path | str | None]] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        here = Path(folder)
        if here != root:
            parts.append((f"j/{here.relative_to(root).as_posix()}", None))
        for name in sorted(files) + sorted(d for d in dirs if (here / d).is_symlink()):
            relative = (here / name).relative_to(root).as_posix()
            stored = by_blob.get(relative)
            if (here / name).is_symlink():
                parts.append((f"j/{relative}", "->" + os.readlink(here / name)))
            else:
                parts.append((f"j/{relative}", stored[0] if stored else here / name))
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
    return parts


def _send_part(write: Callable[[bytes], None], name: str, path: Path | str | None) -> None:
    """One part of a hand-over: a line (name, size, mode, mtime), then exactly size bytes; a folder
    (None), a link (``->target``) or a blob the host has (its digest) is the line alone."""
    if path is None:
        write(json.dumps({"name": name, "dir": True}).encode() + b"\n")
        return
    if isinstance(path, str):
        key = "link" if path.startswith("->") else "blob"
        value = path[2:] if key == "link" else path
        write(json.dumps({"name": name, key: value, "mode": 0o600}).encode() + b"\n")
        return
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        write(json.dumps({"name": name, "size": info.st_size, "mode": info.st_mode & 0o777,
                          "mtime_ns": info.st_mtime_ns}).encode() + b"\n")
        left = info.st_size
        while left:
            chunk = handle.read(min(left, 1 << 20))
            if not chunk:
                raise TransferError(f"{path} shrank while it was sent",
                                    hint="run it again once it is written")
            write(chunk)
            left -= len(chunk)


CLOUD_SETTLE = 1.0   # seconds a claim waits before it looks who else claimed
CLOUD_LEASE = 60.0   # a claim not refreshed for this long is dead: its unit returns to the queue


def _rclone_time(text: str) -> float:
    """Seconds since the epoch of rclone's ModTime (RFC 3339, up to nanoseconds)."""
    match = re.match(r"(.*?T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)\Z", text)
    if not match:
        return 0.0
    zone = "+00:00" if match[3] == "Z" else match[3]
    moment = _dt.datetime.fromisoformat(match[1] + zone).timestamp()
    return moment + float("0" + (match[2] or ".0"))


class CloudQueue:
    """Work units on a cloud remote, claimed without any atomic operation of the storage.

    A claim is a new file ``claims/<time_ns>-<worker>``; after ``settle`` seconds its writer lists
    the claims again and the earliest live one wins, the others withdraw. The winner refreshes its
    claim while the unit runs; one not refreshed for ``lease`` seconds is dead and the unit is free
    again. ``status.json``, written last, marks a unit done.
    """

    def __init__(self, cloud_name: str, settle: float = CLOUD_SETTLE,
                 lease: float = CLOUD_LEASE) -> None:
        self.base = cloud_base(cloud_name) + "/units"
        self.settle, self.lease = settle, lease
        self._meta: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, str] = {}  # unit: this worker's claim, neither confirmed nor gone

    def _put(self, path: str, text: str) -> None:
        _rclone("rcat", f"{self.base}/{path}", what=f"write of {path}", stdin=text)

    def _list(self, path: str = "") -> list[dict[str, Any]]:
        try:
            done = _rclone("lsjson", "-R", "--files-only", f"{self.base}/{path}".rstrip("/"),
                           what="listing")
        except TransferError as exc:
            if "not found" in str(exc):
                return []
            raise
        return json.loads(done.stdout or "[]")

    def listing(self) -> dict[str, dict[str, Any]]:
        """Every unit: whether it is complete and done, and its claims (name, age in seconds)."""
        units: dict[str, dict[str, Any]] = {}
        now = time.time()
        for row in self._list():
            unit, _, rest = row["Path"].partition("/")
            info = units.setdefault(unit, {"ready": False, "done": False, "claims": [],
                                           "cancelled": False})
            if rest == "unit.json":
                info["ready"] = True
            elif rest == "status.json":
                info["done"] = True
            elif rest == "cancel.json":
                info["cancelled"] = True
            elif rest.startswith("claims/"):
                info["claims"].append((rest[7:], now - _rclone_time(row["ModTime"])))
        return units

    def live_claims(self, claims: list[tuple[str, float]]) -> list[str]:
        return sorted(name for name, age in claims if age < self.lease)

    def add(self, unit_id: str, archive: Path, meta: dict[str, Any]) -> None:
        _rclone("copyto", str(archive), f"{self.base}/{unit_id}/unit.tar",
                what=f"upload of unit {unit_id}")
        self._put(f"{unit_id}/unit.json", json.dumps(meta))

    def remove(self, unit_id: str) -> None:
        _rclone("purge", f"{self.base}/{check_safe_name(unit_id, 'unit id')}",
                what=f"removal of unit {unit_id}")

    def meta(self, unit_id: str) -> dict[str, Any]:
        if unit_id not in self._meta:
            text = _rclone("cat", f"{self.base}/{unit_id}/unit.json",
                           what=f"read of unit {unit_id}").stdout
            try:
                meta = json.loads(text)
            except ValueError as exc:
                raise TransferError(f"unit {unit_id}'s unit.json is not JSON: {exc}") from exc
            if not isinstance(meta, dict):
                raise TransferError(f"unit {unit_id}'s unit.json is not a JSON object")
            self._meta[unit_id] = meta
        return self._meta[unit_id]

    def claim(self, unit_id: str, worker: str) -> str | None:
        """Try to own a unit: the claim's name when this worker won, None when another did. A
        claim whose outcome cannot be read (the listing fails twice) is withdrawn and the error
        raised; one that cannot even be withdrawn is remembered (``pending``), so that this
        worker takes it up at its next look instead of leaving its own unit blocked a lease."""
        name = f"{time.time_ns():019d}-{worker}"
        self.heartbeat(unit_id, name, worker)  # the claim's first beat
        time.sleep(self.settle)
        try:
            live = self._live_again(unit_id)
        except StackopsError:
            if not self._withdraw(unit_id, name):
                self.pending[unit_id] = name
            raise
        if live and live[0] == name:
            return name
        self._withdraw(unit_id, name)
        return None

    def _live_again(self, unit_id: str) -> list[str]:
        """_live, tried once more after a failed listing."""
        try:
            return self._live(unit_id)
        except StackopsError as exc:
            log.warning("could not list the claims of unit %s (%s); trying again", unit_id, exc)
            time.sleep(min(self.settle, 1.0))
            return self._live(unit_id)

    def _withdraw(self, unit_id: str, claim: str) -> bool:
        """Delete this worker's claim; False when that failed."""
        try:
            _rclone("deletefile", f"{self.base}/{unit_id}/claims/{claim}",
                    what="withdrawal of a claim")
        except StackopsError as exc:
            log.warning("could not withdraw the claim on unit %s: %s", unit_id, exc)
            return False
        return True

    def _take_pending(self, unit_id: str, claims: list[tuple[str, float]]) -> str | None:
        """A claim this worker made but could not confirm nor withdraw (claim), now confirmed by
        the fresh listing ``claims`` of the unit: the earliest live one. None otherwise."""
        name = self.pending.pop(unit_id, None)
        live = self.live_claims(claims)
        return name if name is not None and live and live[0] == name else None

    def cancel(self, unit_id: str) -> None:
        """Mark a unit cancelled: no worker claims it any more, and the one running it stops it
        at its next heartbeat."""
        self._put(f"{check_safe_name(unit_id, 'unit id')}/cancel.json",
                  json.dumps({"at": _iso(_utcnow())}))

    def look(self, unit_id: str, claim: str) -> tuple[bool, bool]:
        """(the unit is still ours, it was cancelled), from one listing of the unit."""
        now, claims, cancelled = time.time(), [], False
        for row in self._list(unit_id):
            if row["Path"].startswith("claims/"):
                claims.append((row["Path"][7:], now - _rclone_time(row["ModTime"])))
            cancelled = cancelled or row["Path"] == "cancel.json"
        live = self.live_claims(claims)
        return bool(live) and live[0] == claim, cancelled

    def heartbeat(self, unit_id: str, claim: str, worker: str) -> None:
        self._put(f"{unit_id}/claims/{claim}", json.dumps({"worker": worker,
                                                           "host": os.uname().nodename}))

    def _live(self, unit_id: str) -> list[str]:
        now = time.time()
        return self.live_claims([(row["Path"], now - _rclone_time(row["ModTime"]))
                                 for row in self._list(f"{unit_id}/claims")])

    def still_ours(self, unit_id: str, claim: str) -> bool:
        live = self._live(unit_id)
        return bool(live) and live[0] == claim

    def finish(self, unit_id: str, results: Path | None, status: dict[str, Any],
               held: Callable[[], bool] | None = None) -> bool:
        """Upload the results, then ``status.json`` only if ``held()`` still says the unit is
        ours after the upload. Returns whether the status was written."""
        if results is not None and results.exists():
            verb = "copy" if results.is_dir() else "copyto"
            _rclone(verb, str(results),
                    f"{self.base}/{unit_id}/results"
                    + ("" if results.is_dir() else f"/{results.name}"),
                    what=f"upload of unit {unit_id}'s results")
        if held is not None and not held():
            return False
        self._put(f"{unit_id}/status.json", json.dumps(status))
        return True

    def report(self, only: list[str] | None = None) -> list[dict[str, Any]]:
        """One row per unit (``only`` these): queued, running on a worker, stale (its worker went
        quiet), done, or ``unreadable`` (its status.json, with why in ``error``). The bucket is
        written by anyone who may: every text in a row is made safe for a terminal
        (_terminal_safe)."""
        rows = []
        for unit_id, info in sorted(self.listing().items()):
            if only is not None and unit_id not in only:
                continue
            row: dict[str, Any] = {"unit": _terminal_safe(unit_id), "state": "queued",
                                   "worker": None}
            if not info["ready"]:
                row["state"] = "incomplete"
            elif info["done"]:
                row.update(self._done_row(unit_id))
            elif (info["claims"] and self.live_claims(info["claims"])
                  or info["claims"] and not info["cancelled"]):
                name, age = min(info["claims"],
                                key=lambda c: c[0] if c[1] < self.lease else "~" + c[0])
                row.update(state="running" if age < self.lease else "stale",
                           worker=_terminal_safe(name.partition("-")[2]),
                           last_seen_seconds=round(age, 1))
            elif info["cancelled"]:
                row["state"] = "cancelled"
            rows.append(row)
        return rows

    def _done_row(self, unit_id: str) -> dict[str, Any]:
        """The fields of a done unit's row, from its status.json as plain, checked data."""
        try:
            status = json.loads(_rclone("cat", f"{self.base}/{unit_id}/status.json",
                                        what="read of a status").stdout)
            if not isinstance(status, dict) or not isinstance(status.get("status"), str):
                raise ValueError("not a JSON object with a status")
        except (StackopsError, ValueError) as exc:
            return {"state": "unreadable", "error": _terminal_safe(f"status.json: {exc}")}
        duration = status.get("duration_seconds")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)):
            duration = None
        texts = {key: status.get(key) for key in ("worker", "host")}
        return {"state": _terminal_safe(status["status"]), "duration_seconds": duration,
                "error": _terminal_safe(status.get("error") or "", lines=True),
                **{key: None if value is None else _terminal_safe(value)
                   for key, value in texts.items()}}


# ============================================================================================
# 13. places and launchers: where a job's files and commands go, and how the job starts there
# ============================================================================================
#
# One small class per back end, in the manner of bottle's server adapters. A *place* moves a
# job's files where it executes and asks the executing side there (serve's actions: in this
# process here, through SSH on a host): _Here, _OverSSH, _ThroughCloud (the job goes up to an
# rclone remote and the host fetches it). A *launcher* says how the job starts there and what
# follows from that: _SlotLauncher (a detached process that takes a slot), _TmuxLauncher (the
# same, in a tmux session), _CloudQueueLauncher (work units any worker runs), _SlurmLauncher
# (sbatch). The start itself is the executing side's one fire (fire_jobs), which reads the job's
# own config. RemoteMachine picks a place and a launcher once (_place_for, _launcher_for); each
# is told a _Job, the fields it uses (as bottle's adapter is handed the one app it serves).

def _place_for(config: RemoteStackOpsConfig) -> _Place:
    """The place a job with ``config`` runs: here, over SSH, or over SSH with its files through
    the cloud (``transfer_method='cloud'``), or on a cloud queue's worker (its record is here, its
    results in the bucket). Decided once, when a RemoteMachine gets its config."""
    if config.launch_method == "cloud_manager":
        return _InQueue(config)
    if config.ssh_host is None:
        return _Here(config)
    if config.transfer_method == "cloud":
        return _ThroughCloud(config)
    return _OverSSH(config)


def _launcher_for(config: RemoteStackOpsConfig) -> _Launcher:
    """How a job with ``config`` starts (``launch_method``, ``interactive``), decided once."""
    if config.launch_method == "slurm":
        return _SlurmLauncher()
    if config.launch_method == "cloud_manager":
        return _CloudQueueLauncher()
    return _TmuxLauncher() if config.interactive else _SlotLauncher()


@_model(frozen=True)
class _Job:
    """What a place or a launcher is told of a job (_seen): never the job itself, so none calls
    back into it or changes it; what they find out, they return."""

    config: RemoteStackOpsConfig  # the job's own (a sweep's members share one place)
    files: FileManager  # its folder here
    there: str  # its folder as the executing side is told it (``~/...`` on a host)
    python: str
    params: JobParams
    submitted: bool  # it reached its host
    shared: bool  # its host sees this folder (a shared home): used in place
    tasks: list[str] | None  # an array's tasks, once some were rerun (else <id>-0, ...)
    sha256: str  # of the archive a cloud transfer uploaded

    @property
    def job_id(self) -> str:
        return self.config.job_id


def _code_here(machine: RemoteMachine, folder: Path) -> None:
    """Put the job's own copy of its snapshot into ``folder`` (a job folder on this machine, or
    the one packed for the cloud), each file checked against the manifest (_materialize): taken
    from the snapshot's own sources (for a rerun, the older job's copy), else the work tree."""
    recorded = machine.snapshot is None  # a job loaded from its folder: the manifest it recorded
    snapshot = machine.snapshot or _recorded_snapshot(machine)
    sources: dict[str, Any] = {digest: [str(path)] for digest, path in snapshot[2].items()}
    tree = _tree_sources(expand_home(machine.job_params.repo_path_rh), snapshot[1])
    for digest, paths in tree.items():
        sources[digest] = list(dict.fromkeys(sources.get(digest, []) + paths))
    try:
        _materialize(snapshot[1], sources, folder / CODE_DIR)
    except _SnapshotMismatchError as exc:
        if not recorded:
            raise
        raise StackopsError(f"the repo of job {machine.job_id} changed since the job was "
                            f"generated ({exc.path})",
                            hint="submit it again under a new job_id") from exc


def _recorded_snapshot(machine: RemoteMachine) -> tuple[str, list[list[Any]], dict[str, Path]]:
    """The snapshot a job generated earlier names: the manifest in its folder, checked against
    its id (a job folder from before manifests were kept: the repo's snapshot now, if it is the
    same); its sources are the work tree's files."""
    import hashlib

    identity = machine.job_params.code_snapshot
    path = machine.file_manager.path(CODE_MANIFEST_JSON)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        taken = code_snapshot(expand_home(machine.job_params.repo_path_rh))
        if taken[0] != identity:
            raise StackopsError(f"the repo of job {machine.job_id} changed since the job was "
                                "generated", hint="submit it again under a new job_id") from None
        return taken
    if hashlib.sha256(text).hexdigest()[:32] != identity:
        raise StackopsError(f"{path} is not the manifest of snapshot {identity}",
                            hint="the job folder was damaged; submit the job again")
    return identity, json.loads(text), {}


class _Place:
    """Where a job runs, seen from here: how its folder, code and data get there, and how the
    executing side there is asked (status, fire, cancel, delete, logs, its facts)."""

    remote = False
    code_in_folder = True  # with copy_repo, the job folder carries its own code

    def __init__(self, config: RemoteStackOpsConfig) -> None:
        self.config = config
        self.connection: SSH | None = None  # the one SSH connection, opened on first use

    @property
    def host_name(self) -> str:
        return "localhost"

    @property
    def default_python(self) -> str:
        return "python3"

    @property
    def ssh(self) -> SSH:
        raise StackopsError(f"job {self.config.job_id} runs on this machine; "
                            "it has no SSH connection")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def call(self, requests: list[dict[str, Any]]) -> list[Any]:
        """Ask the executing side where the job runs (serve's actions): each request's answer."""
        raise NotImplementedError

    def facts(self, wanted: list[str]) -> dict[str, Any]:
        return dict(self.call([{"action": "facts", "facts": wanted}])[0])

    def there(self, manager: FileManager) -> str:
        """A job folder as the executing side is told it (here: its path)."""
        return str(manager.job_root)

    def preflight(self) -> None:
        """What can be checked before anything is written or sent."""

    def adopt_state_dir(self, manager: FileManager) -> None:
        """Settle the job's slot state folder for the machine it runs on."""

    def check_job_root(self, root: Path) -> None:
        """Refuse a job folder that has no place where the job runs."""

    def account(self) -> str:
        """Who runs the job where: ``user@host:port`` or ``user@node``."""
        raise NotImplementedError

    def check_where_it_runs(self, job: _Job) -> None:
        """Refuse now what would fail only after launch (interpreter, the job's file), unless
        the hand-over checks them in its own round trip."""

    def hand_over(self, job: _Job, spec: _Handing,
                  progress: Callable[[int], None] | None) -> _HandOver | None:
        """Put the generated job where it runs (``spec``: what goes); what the hand-over did,
        None when nothing had to move. With ``spec.fire`` the place may start it in the same
        round trip (fire() then reads the answer), once ``spec.gate`` says go (see _Together)."""
        return None

    def fire_requests(self, job: _Job) -> list[dict[str, Any]]:
        """What the executing side is asked before it fires the job."""
        return []

    def mirror(self, job: _Job, state: dict[str, Any]) -> None:
        """Keep the job's state record, as read where it runs, in the job folder here."""

    def reports(self, jobs: list[_Job], log_lines: int) -> list[JobStatus]:
        """The status of jobs of this place, all asked in one go (one round trip on a host)."""
        request = {"action": "status", "lines": log_lines, "roots": [job.there for job in jobs],
                   "tasks": [job.tasks for job in jobs]}
        answers = self.call([request])[0]
        reports = []
        for job, answer in zip(jobs, answers):
            self.mirror(job, answer["state"])
            reports.append(report_from(answer))
        return reports

    def check_gpus(self, job: _Job) -> None:
        """A job that asks for more GPUs than the machine has could only wait forever: refused."""
        found = self.facts(["gpus"])["gpus"] if job.config.gpus else []
        if len(found) < job.config.gpus:
            raise ConfigError(f"job {job.job_id} asks for {job.config.gpus} GPU(s) and "
                              f"{self.host_name} has {len(found)}"
                              + (f" ({', '.join(found)})" if found else ""),
                              hint="STACKOPS_GPUS=0,1,... declares them where nvidia-smi "
                                   "cannot list them")

    def results_path(self, text: str) -> Path:
        """The results folder a report names, as a path for this machine's bookkeeping."""
        return Path(text)

    def results_target(self, job: _Job, results: Path) -> Path | None:
        """Where wait() downloads the results folder; None: it is usable here where it is."""
        return None

    def fetch_results(self, job: _Job, results: Path, target: str | os.PathLike[str] | None,
                      overwrite: bool, progress: Callable[[int], None] | None) -> Path:
        """The results folder here (download_results())."""
        raise NotImplementedError


class _Here(_Place):
    """The job runs on this machine: its folder already is where it runs, and the executing
    side's actions run in this very process."""

    @property
    def default_python(self) -> str:
        return sys.executable or "python3"

    def call(self, requests: list[dict[str, Any]]) -> list[Any]:
        return [_ACTIONS[request["action"]](request, (None, None)) for request in requests]

    def adopt_state_dir(self, manager: FileManager) -> None:
        # a relative STACKOPS_STATE_DIR is made absolute once, here: the wrapper uses the same queue
        if os.environ.get("STACKOPS_STATE_DIR"):
            manager.state_dir = str(expand_home(os.environ["STACKOPS_STATE_DIR"]))

    def account(self) -> str:
        """``user@node`` of this machine: the user as getpass.getuser() finds it (importing getpass
        costs termios, 2 ms of every run)."""
        names = ("LOGNAME", "USER", "LNAME", "USERNAME")
        user = next((os.environ[name] for name in names if os.environ.get(name)), "")
        if not user:
            import pwd

            try:
                user = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:  # no USER and no passwd entry
                user = str(os.getuid())
        return f"{user}@{os.uname().nodename}"

    def check_where_it_runs(self, job: _Job) -> None:
        if shutil.which(os.path.expanduser(job.python)) is None:
            raise ConfigError(f"the interpreter {job.python!r} is not found on this machine",
                              hint=f"pass {_option('python=', '--python')} with an installed "
                                   "interpreter")
        if job.config.notify_upon_completion:
            load_email_config(job.config.email_config_name or "")

    def results_path(self, text: str) -> Path:
        return expand_home(text)

    def fetch_results(self, job: _Job, results: Path, target: str | os.PathLike[str] | None,
                      overwrite: bool, progress: Callable[[int], None] | None) -> Path:
        if not results.exists():
            raise ConfigError(f"the results folder of job {job.job_id}, "
                              f"{collapse_home(results)}, no longer exists")
        if target is None or _same_place(results, expand_home(target)):
            return results  # never copied onto itself
        return _copy_local(results, expand_home(target), overwrite)


class _InQueue(_Here):
    """A work unit of a cloud queue: made here, run by whichever worker claims it; what it did is
    the queue's word, and its results are in the bucket (``units/<unit>/results``)."""

    def results_path(self, text: str) -> Path:
        return Path(text)  # REMOTE:path in the bucket

    def results_target(self, job: _Job, results: Path) -> Path | None:
        return expand_home(f"{DEFAULT_RESULTS_DIR}/{job.job_id}")

    def fetch_results(self, job: _Job, results: Path, target: str | os.PathLike[str] | None,
                      overwrite: bool, progress: Callable[[int], None] | None) -> Path:
        return _rclone_down(str(results), expand_home(target or f"{DEFAULT_RESULTS_DIR}/"
                                                              f"{job.job_id}"), overwrite)


class _OverSSH(_Place):
    """The job runs on ``config.ssh_host``, reached over one SSH connection reused for every
    step; its folder, code and data go over it (a hand-over), and the executing side there is
    this very version of stackops, run by serve()."""

    remote = True
    code_in_folder = False  # the code snapshot goes to the host's own store

    def __init__(self, config: RemoteStackOpsConfig) -> None:
        parse_ssh_target(config.ssh_host or "")
        super().__init__(config)

    @property
    def host_name(self) -> str:
        return self.config.ssh_host or ""

    @property
    def ssh(self) -> SSH:
        """The one connection to the host, opened on first use; its timeout is the job's, or
        less while wait looks (_within)."""
        if self.connection is not None and not self.connection.is_alive:  # the host went away
            self.connection.close()
            self.connection = None
        timeout = _bounded(self.config.ssh_timeout)
        if self.connection is None:
            accept = self.config.accept_new_host_key
            self.connection = SSH.from_config_file(self.host_name, timeout=timeout,
                                                   accept_new_host_key=accept)
        self.connection.timeout = timeout
        return self.connection

    def call(self, requests: list[dict[str, Any]]) -> list[Any]:
        """The executing side's answers, each waited for 60 s (or what is left of wait's look);
        a host that goes quiet meanwhile is lost, as one never reached (no copy broke off)."""
        ssh = self.ssh
        try:
            return ssh.serve(requests, timeout=_bounded(max(self.config.ssh_timeout, 60.0)))
        except TransferError as exc:
            if ssh.is_alive:  # the host's own word (an archive refused), not its silence
                raise
            raise StackopsConnectionError(f"{self.host_name} stopped answering: {exc}",
                                          hint=f"is {self.host_name} overloaded?") from exc

    def there(self, manager: FileManager) -> str:
        return manager.job_root_rh  # home-relative: the host's home may be elsewhere

    def preflight(self) -> None:
        _ = self.ssh  # connects: an unknown, untrusted or unreachable host stops us here

    def check_job_root(self, root: Path) -> None:
        _home_relative(root)

    def account(self) -> str:
        """``user@host:port`` the job is sent to (its SSH target)."""
        if self.connection is not None:
            return str(self.connection.target)
        return str(resolve_ssh_target(self.host_name))

    def hand_over(self, job: _Job, spec: _Handing,
                  progress: Callable[[int], None] | None) -> _HandOver | None:
        """The job folder, the repo (``copy_repo``) and the data go to their home-relative places on
        the host, in one remote command (which may also fire the job there); a host that shares
        this home uses them in place."""
        return _hand_over(self.ssh, spec, progress)

    def mirror(self, job: _Job, state: dict[str, Any]) -> None:
        root = job.files.job_root
        if not job.shared and root.is_dir() and state:  # a shared home has it already
            _write_plain(root / STATE_JSON, json.dumps(dict(state, mirrored=_iso(_utcnow()))))

    def reports(self, jobs: list[_Job], log_lines: int) -> list[JobStatus]:
        sent = [job for job in jobs if job.submitted]
        try:
            found = dict(zip([job.job_id for job in sent], super().reports(sent, log_lines))) \
                if sent else {}
        except StackopsConnectionError:
            if not all(_ended(read_state(job.files.job_root)) for job in sent):
                raise
            found = {}  # each ended, as its record kept here says: an end stands, host or not
        return [found.get(job.job_id) or _status_of(job.job_id, read_state(job.files.job_root))
                for job in jobs]  # one never handed over: prepared here

    def results_target(self, job: _Job, results: Path) -> Path | None:
        """download_results()'s default target (the job's own folder here, if the host named a
        folder elsewhere)."""
        try:
            return self.own_results_here(job, results.as_posix())
        except ConfigError:
            return expand_home(f"{DEFAULT_RESULTS_DIR}/{job.job_id}")

    def own_results_here(self, job: _Job, results: str) -> Path:
        """Where results named by the host go without a target: the same home-relative path here,
        only inside the job's own results folder or job folder. The host's word is data: a path
        it names elsewhere (``~/.local/bin/ls``) is refused, never written."""
        own = (f"{DEFAULT_RESULTS_DIR}/{job.job_id}", job.files.job_root_rh)
        inside = any(results == folder or results.startswith(folder + "/") for folder in own)
        if results.startswith("~/") and ".." not in results.split("/") and inside:
            return expand_home(results)
        raise ConfigError(f"the results of job {job.job_id} are at {self.host_name}:{results}, "
                          f"outside the job's own results folder ({own[0]}); stackops writes "
                          "there only when you say so",
                          hint="give the target: " + _option(
                              "download_results(target)", f"download {job.job_id} --to DIR"))

    def fetch_results(self, job: _Job, results: Path, target: str | os.PathLike[str] | None,
                      overwrite: bool, progress: Callable[[int], None] | None) -> Path:
        if target is None:
            target = self.own_results_here(job, results.as_posix())
        if job.shared:  # the host wrote them into the home this machine sees
            local = expand_home(results.as_posix())
            if not local.exists():
                raise ConfigError(f"the results folder of job {job.job_id}, "
                                  f"{collapse_home(local)}, no longer exists")
            if not _same_place(local, expand_home(target)):
                local = _copy_local(local, expand_home(target), overwrite)
            return local
        return self.fetch(job, results, target, overwrite, progress)

    def fetch(self, job: _Job, results: Path, target: str | os.PathLike[str],
              overwrite: bool, progress: Callable[[int], None] | None) -> Path:
        return self.ssh.copy_to_here(results.as_posix(), target, recursive=True,
                                     overwrite=overwrite, progress=progress)


def _handing(machine: RemoteMachine, launch: bool, gate: _Gate | None) -> _Handing:
    """What the hand-over of ``machine`` carries (see _Handing)."""
    params = machine.job_params
    need = ["command:sbatch"] if machine.uses_slurm else []
    if not machine.config.copy_repo and params.kind != "command":  # the job's file, there
        need.append(f"exists:{params.repo_path_rh.rstrip('/') or '/'}/{params.file_path_r}")
    email = machine.config.email_config_name if machine.config.notify_upon_completion else None
    return _Handing(machine.file_manager.job_root, machine.file_manager.job_root_rh,
                    machine.python, machine.snapshot, list(machine.data),
                    members=machine.members, need=need, email=email,
                    fire=[machine.root_there] if launch else [], gate=gate)


class _ThroughCloud(_OverSSH):
    """The job runs on ``config.ssh_host``, but its files travel through the rclone remote
    ``config.cloud_name``: one archive up at submit, fetched (checked against its SHA-256) by the
    host when the job is fired; its results come back the same way."""

    code_in_folder = True  # the archive carries the job folder with its code

    def preflight(self) -> None:
        super().preflight()
        check_cloud_remote(self.config.cloud_name or "")

    def hand_over(self, job: _Job, spec: _Handing,
                  progress: Callable[[int], None] | None) -> _HandOver | None:
        """Up to the cloud: nothing is on the host before the job is fired (the archive's SHA-256
        is what the hand-over returns)."""
        _, digest = transfer_cloud(self.ssh, job.config, job.params, job.files, spec.data)
        return _HandOver(False, "", {}, sha256=digest)

    def fire_requests(self, job: _Job) -> list[dict[str, Any]]:
        """The host fetches the job (checked), checks its e-mail config, then fires it."""
        email = job.config.email_config_name if job.config.notify_upon_completion else ""
        return [{"action": "cloud_fetch", "cloud": self.config.cloud_name,
                 "root": job.files.job_root_rh, "sha256": job.sha256, "email": email}]

    def fetch(self, job: _Job, results: Path, target: str | os.PathLike[str],
              overwrite: bool, progress: Callable[[int], None] | None) -> Path:
        """The host uploads the results with its rclone under a fresh prefix of this download's own
        (a later job with the same id never mixes in); they come down here the same way, and the
        prefix is removed from the bucket afterwards, whatever happened."""
        _free_destination(expand_home(target), overwrite)
        prefix = (f"{cloud_base(self.config.cloud_name or '')}/results/{job.job_id}/"
                  f"{random.getrandbits(64):016x}")
        try:
            answer = self.call([{"action": "cloud_results", "results": results.as_posix(),
                                 "target": prefix}])[0]
            local = _rclone_down(prefix, expand_home(target), overwrite)
            left_out = answer.get("left_out") if isinstance(answer, dict) else None
            _warn_left_out(f"download from {self.ssh.target.alias} through the cloud",
                           [str(name) for name in left_out or []])
            return local
        finally:
            with _suppress(StackopsError):
                _rclone("purge", prefix, what="removal of the downloaded results from the bucket")


def _rclone_down(source: str, target: Path, overwrite: bool) -> Path:
    """Results in the bucket (``source``) to ``target`` here, whole under its name or not at all."""
    destination = _free_destination(target, overwrite)
    _mkdir_private(destination.parent)
    with _Staged(destination, replace=True, folder=False) as payload:
        _rclone("copy", source, payload, what="download of the results")
        _make_private(Path(payload))
    return destination


def _make_private(folder: Path) -> None:
    """rclone writes as the umask says (0755/0644) and carries no modes: a download's folders are
    0700 and its files 0600 (an SSH download keeps the host's bits, and the results are private
    there), before the folder is moved into place."""
    for parent, _folders, files in os.walk(folder):  # (each folder is a parent once)
        os.chmod(parent, 0o700)
        for name in files:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), 0o600)


def _submit_job(machine: RemoteMachine, progress: Callable[[int], None] | None = None,
                launch: bool = False, gate: _Gate | None = None) -> RemoteMachine:
    """RemoteMachine.submit(); with ``launch`` (run()) the host also starts the job in the same
    round trip once ``gate`` says go, and the fire() that follows reads its answer. A host that
    shares this home uses the job folder in place (its code copied in by the hand-over)."""
    if not machine.scripts_generated:
        machine.generate_scripts()
    job = _seen(machine)
    try:
        machine.place.check_where_it_runs(job)
        handed = machine.place.hand_over(job, _handing(machine, launch, gate), progress)
        if handed is not None:
            machine.handed = handed
            machine.shared = handed.shared
            machine.cloud_sha256 = handed.sha256
    except BaseException:
        _withdraw(machine)
        raise
    machine.submitted = True
    for task in machine.array_tasks() if machine.array_parts else []:
        task.submitted = True
        task.shared = machine.shared
        _save_job(task)
    _save_job(machine, sync=not launch)  # (the fire that follows saves it again)
    return machine


class _Launcher:
    """How a job starts where it runs, and what follows from that: whether it holds a slot, an
    array's parts, the files it needs in its folder, a queue's own word on it. The start itself
    is the executing side's one fire (_fire_job), the same for every launcher."""

    takes_slot = True  # the job holds one of the machine's stackops slots while it runs
    queues = False  # run() puts the job in a queue whose workers start it (_run_job)

    def preflight(self, place: _Place) -> None:
        """What this launcher needs where the job runs, checked before anything is written."""

    def array_parts(self, whole: WorkloadParams | None) -> list[WorkloadParams]:
        return []

    def write_extras(self, job: _Job, folder: Path, after: list[str]) -> None:
        """Files this launcher needs in the job folder besides the wrapper (``after``: the Slurm
        jobs it waits for)."""

    def queued_status(self, job: _Job) -> JobStatus | None:
        """The status of a job its queue still holds, as the queue says it; None: ask the job."""
        return None

    def cancel_queued(self, job: _Job) -> JobStatus | None:
        """Cancel a job its queue still holds (the status after); None: cancel it where it runs."""
        return None


class _SlotLauncher(_Launcher):
    """A detached process (its own session, output to logs/) that waits for one of the
    machine's slots, first come first served, and survives the connection closing."""


class _TmuxLauncher(_SlotLauncher):
    """Like _SlotLauncher, inside a tmux session named after the job, so a person can attach."""


class _CloudQueueLauncher(_SlotLauncher):
    """The job goes, as one work unit, to the queue on ``config.cloud_name``; any worker runs it.
    Where a worker runs the unit, it starts as a detached process with a slot (fire)."""

    queues = True

    @staticmethod
    def _in_queue(job: _Job) -> bool:
        """Whether this is the submitter's record of a unit (a worker's copy of it was fired)."""
        fired = read_state(job.files.job_root).get("fired")
        return bool(job.config.cloud_name) and not fired

    def queued_status(self, job: _Job) -> JobStatus | None:
        """A unit's status is the queue's view of it (the record here, until it is queued); the
        worker running it judges its own copy, as any job."""
        queue = CloudQueue(job.config.cloud_name or "")
        rows = queue.report([job.job_id]) if self._in_queue(job) else []
        return _unit_status(rows[0], queue.base) if rows else None

    def cancel_queued(self, job: _Job) -> JobStatus | None:
        """A unit of a cloud queue: marked cancelled in the bucket (workers skip it; the one running
        it stops it at its next heartbeat). The status is the queue's view of it."""
        if not self._in_queue(job):
            return None
        queue = CloudQueue(job.config.cloud_name or "")
        rows = {row["unit"]: row for row in queue.report()}
        row = rows.get(job.job_id)
        if row is None:
            raise ConfigError(f"unit {job.job_id} is not in the queue on {job.config.cloud_name}")
        if row["state"] in TERMINAL_STATUSES:
            return JobStatus(job_id=job.job_id, status=row["state"],
                             host=str(row.get("host") or "?"), reason=f"was {row['state']}")
        queue.cancel(job.job_id)
        state = "cancelled" if row["state"] in ("queued", "stale") else "running"
        reason = "was queued" if state == "cancelled" else "cancel asked: the worker stops it"
        return JobStatus(job_id=job.job_id, status=state, host=str(row.get("worker") or "?"),
                         reason=reason)


def _unit_status(row: dict[str, Any], base: str) -> JobStatus:
    """A JobStatus from a unit's row of CloudQueue.report."""
    state = {"incomplete": "queued", "stale": "running", "unreadable": "failed"}.get(
        row["state"], row["state"])
    reason = {"incomplete": "its upload is incomplete",
              "stale": f"its worker went quiet {row.get('last_seen_seconds')}s ago: it returns "
                       "to the queue"}.get(row["state"], "")
    return JobStatus(job_id=row["unit"], status=state if state in STATUSES else "failed",
                     host=str(row.get("host") or row.get("worker") or "?"), reason=reason,
                     error_message=row.get("error") or "",
                     results_path=f"{base}/{row['unit']}/results" if state == "completed"
                     else None)


class _SlurmLauncher(_Launcher):
    """Slurm's ``sbatch`` where the job is submitted (a login node): Slurm queues and starts it,
    so no stackops slot is taken. A workload of K > 1 parts runs as a job array of K tasks, the
    tasks' folders beside the array's, sharing its code (as a sweep's jobs do)."""

    takes_slot = False

    def preflight(self, place: _Place) -> None:
        """A Slurm job needs sbatch where it is submitted: refused before anything is written
        (on a host, its hand-over checks it in the same round trip)."""
        if not place.remote and shutil.which("sbatch") is None:
            slurm = _option("launch_method='slurm'", "--slurm")
            raise ConfigError(f"{slurm} needs sbatch on {place.host_name}, and there is none",
                              hint=f"submit from a Slurm login node "
                                   f"({_option('ssh_host', '--host')}), or leave out {slurm}")

    def array_parts(self, whole: WorkloadParams | None) -> list[WorkloadParams]:
        if whole is None or whole.jobs < 2:
            return []
        return [dataclasses.replace(part, jobs=1) for part in whole.split_to_jobs()]

    def write_extras(self, job: _Job, folder: Path, after: list[str]) -> None:
        config = job.config
        throttle = config.max_simultaneous_jobs if config.max_simultaneous_jobs > 1 else 0
        tasks = len(self.array_parts(config.workload_params))
        script = render_sbatch_script(job.job_id, config.slurm_options, tasks, throttle,
                                      after=after, python=job.python)
        _write_new(folder / SBATCH_SH, script, 0o700)


def _same_place(one: Path, other: Path) -> bool:
    """Whether two paths name the same file or folder (links and spellings resolved); the home,
    or a folder holding it, is refused as a target here too (see _free_destination)."""
    try:
        same = os.path.samefile(one, other)
    except OSError:
        same = os.path.realpath(one) == os.path.realpath(other)
    if same:
        _free_destination(other, overwrite=True)
    return same


def _copy_local(source: Path, destination: Path, overwrite: bool) -> Path:
    _free_destination(destination, overwrite)
    _mkdir_private(destination.parent)
    with _Staged(destination, replace=True, folder=False) as staging:
        if source.is_dir():
            shutil.copytree(source, staging, symlinks=True)
        else:
            shutil.copy2(source, staging)
    return destination


# ============================================================================================
# 14. remote machine: one job, its place and its launcher; the list of jobs
# ============================================================================================

# -- the job folder, written here ------------------------------------------------------------------

def _generate_job_folder(machine: RemoteMachine) -> None:
    """Write the whole job folder here at once: complete under its name, or not at all. An
    array's tasks are members beside it (see sweep_links), written after it."""
    root = machine.file_manager.job_root
    if root.exists():
        raise _exists_error(machine)
    machine.place.check_job_root(root)
    parts = machine.array_parts
    if parts:
        taken = [p for p in (f"{machine.job_id}-{k}" for k in range(len(parts)))
                 if os.path.lexists(root.parent / p)]
        if taken:
            raise ConfigError(f"the array's task folder {taken[0]} exists already",
                              hint="choose another job_id")
        machine.tasks = [_new_array_task(machine, k, part) for k, part in enumerate(parts)]
    _put_folder_in_place(machine, "job")  # its record in it, as it stands now
    machine.scripts_generated = True
    if parts:
        _write_members(machine, machine.tasks or [])
        _save_job(machine)
    log.info("job %s generated at %s", machine.job_id, collapse_home(root))


def _put_folder_in_place(machine: RemoteMachine, what: str,
                         finish: Callable[[Path], None] | None = None) -> None:
    """Write ``machine``'s folder into a staging folder beside its place (then ``finish`` it)
    and rename it there: complete under its name or not at all; a folder there is refused. With
    copy_repo, the snapshot is taken first, the job's function checked against its bytes, and
    the folder's copy of the code checked against it: a file that changed meanwhile makes the
    snapshot be taken again, SNAPSHOT_TRIES times at most."""
    source = _own_file()
    if not source.is_file():
        raise StackopsError(f"cannot find stackops.py to ship with the {what} (looked at {source})")
    fresh: set[str] = set()
    for _attempt in range(SNAPSHOT_TRIES):
        try:
            if machine.config.copy_repo and not machine.pinned:
                _take_snapshot(machine, fresh)
            _stage_folder(machine, source, finish)
            return
        except _SnapshotMismatchError as exc:
            if machine.pinned:
                raise StackopsError(f"the code of job {machine.job_id} is no longer here whole: "
                                    f"{exc.path} changed since it ran",
                                    hint="rerun --fresh takes the code as it is now") from exc
            fresh.add(exc.path)
            changed = exc
    raise StackopsError(f"the repo changed while it was being sent ({changed.path}, "
                        f"{SNAPSHOT_TRIES} times)",
                        hint="submit again once its files are written") from changed


def _stage_folder(machine: RemoteMachine, source: Path,
                  finish: Callable[[Path], None] | None) -> None:
    """_put_folder_in_place's one attempt: the folder staged, finished, renamed into place."""
    root = machine.file_manager.job_root
    _trusted_dir(root.parent, "base folder")
    with _Staged(root, exists=lambda: _exists_error(machine)) as made:
        staging = Path(made)
        _write_job_folder(machine, staging, source)
        if finish is not None:
            finish(staging)


def _new_array_task(machine: RemoteMachine, k: int, part: WorkloadParams) -> RemoteMachine:
    """Task k of a Slurm array: a job of its own with slice ``part`` of the workload, a member of
    the array's folder (its code and wrapper are the array's)."""
    data = machine.config.to_dict()
    data.update(job_id=f"{machine.job_id}-{k}", workload_params=part.to_dict())
    task = RemoteMachine._blank(RemoteStackOpsConfig.from_dict(data), machine)
    task.file_manager = FileManager(task.job_id, "Linux", False, 1, task.config.base_dir,
                                    submission_time=machine.file_manager.submission_time)
    task.file_manager.python = machine.file_manager.python
    task.scripts_generated = True
    task.shared_folder = machine.job_id
    return task


def _take_snapshot(machine: RemoteMachine, fresh: set[str] | None = None) -> None:
    """The content-addressed snapshot of the repo this job will run (``fresh``: files hashed anew
    whatever the cache says), then the job's function checked against the snapshot's own bytes
    (and, for install_repo, the version git describe gives here: the snapshot has no .git)."""
    repo = expand_home(machine.job_params.repo_path_rh)
    machine.snapshot = code_snapshot(repo, fresh)
    machine.job_params.code_snapshot = machine.snapshot[0]
    _check_snapshot_call(machine, repo)
    if machine.config.install_repo:
        machine.job_params.scm_version = scm_version(repo)


def _check_snapshot_call(machine: RemoteMachine, repo: Path) -> None:
    """The job's function as its snapshot holds it: its file read and checked against the sha256
    the snapshot names (else _SnapshotMismatchError), then it must define the function at its top
    level and take the kwargs (what the submit checked in the file as it was then)."""
    params = machine.job_params
    entry = next((e for e in machine.snapshot[1] if e[0] == params.file_path_r and e[1] != "l"),
                 None) if machine.snapshot and params.kind != "script" else None
    if entry is None:
        return
    import hashlib

    data = _read_bytes(repo / params.file_path_r)
    if data is None or hashlib.sha256(data).hexdigest() != entry[2]:
        raise _SnapshotMismatchError(params.file_path_r, entry[2])
    text = data.decode("utf-8", "replace")
    head = (params.func_class or params.func_name or "").split(".")[0]
    if head not in _top_level_names(repo / params.file_path_r, text):
        raise ConfigError(f"{params.file_path_r} defines no top-level {head!r} in the snapshot "
                          "taken of it", hint="save the file, then submit again")
    found = _parameters_in_source(repo / params.file_path_r, params.func_class,
                                  params.func_name or "", text)
    _check_call(found, machine.kwargs, machine.config.workload_params is not None,
                f"{params.func_name}()")


def _read_bytes(path: Path | str) -> bytes | None:
    """A file's bytes, or None when it cannot be read (missing)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _exists_error(machine: RemoteMachine) -> ConfigError:
    root = machine.file_manager.job_root
    try:
        unfinished = not _read_json(root / REMOTE_MACHINE_JSON).get("submitted", True)
    except (StackopsError, AttributeError):
        unfinished = False
    why = " (its submission was interrupted; nothing of it runs)" if unfinished else ""
    return ConfigError(f"job {machine.job_id!r} already exists at {collapse_home(root)}{why}",
                       hint="choose another job_id, or leave it out for a fresh one")


def _write_job_folder(machine: RemoteMachine, folder: Path, source: Path) -> None:
    """Everything the job needs, into ``folder``: a staging folder renamed into place after, so
    its files are written plainly (the rename makes the whole folder appear at once)."""
    for sub in ("data", "python", "shell", "logs"):
        _mkdir_private(folder / sub)
    os.chmod(folder, 0o700)
    config = machine.config
    machine.job_params.description = config.description
    machine.job_params.session_name = machine.job_params.tab_name = machine.job_id
    machine.job_params.ssh_repr = machine.host_name
    machine.job_params.ssh_repr_remote = machine.place.account()
    machine.file_manager.python = machine.python
    line = machine.job_params.get_execution_line(config.workload_params, config.parallelize,
                                                 config.wrap_in_try_except)
    _write_new_json(folder / JOB_PARAMS_JSON, machine.job_params.to_dict())
    if config.copy_repo and machine.snapshot is not None:
        _write_new(folder / CODE_MANIFEST_JSON,
                   json.dumps(machine.snapshot[1], separators=(",", ":")))
    _write_new_json(folder / KWARGS_JSON, machine.kwargs)
    _write_new_json(folder / FILE_MANAGER_JSON, machine.file_manager.to_dict())
    _write_new_json(folder / CONFIG_JSON, config.to_dict())
    if machine.pickled_instance is not None:
        (folder / INSTANCE_PICKLE).write_bytes(machine.pickled_instance)
    _write_new(folder / WRAPPER_PY, render_execution_script(line))
    machine.launcher.write_extras(_seen(machine), folder, machine.parent_slurm_ids)
    shutil.copyfile(source, folder / STACKOPS_COPY)
    os.chmod(folder / STACKOPS_COPY, 0o600)
    _ship_bytecode(source, folder / "python")  # the job's start skips compiling it (~40 ms of CPU)
    _write_new(folder / STATE_JSON, json.dumps(_first_state(machine)))
    if config.copy_repo and machine.place.code_in_folder and machine.snapshot is not None:
        _code_here(machine, folder)  # here, or in the cloud archive: the folder carries its code
    machine.scripts_generated = True
    _write_new_json(folder / REMOTE_MACHINE_JSON, machine.to_dict())


def _first_state(machine: RemoteMachine) -> dict[str, Any]:
    """A job's state record as it is written: prepared (an array's, with its tasks)."""
    state: dict[str, Any] = {"schema": STATE_SCHEMA, "status": "prepared",
                             "submitted": _iso(machine.file_manager.submission_time),
                             "attempts": machine.config.retries + 1}
    if machine.array_parts:
        state["tasks"] = [f"{machine.job_id}-{k}" for k in range(len(machine.array_parts))]
    return state


def _member_files(job: RemoteMachine, manager: dict[str, Any],
                  config: dict[str, Any] | None = None) -> dict[str, str]:
    """The files of a sweep's job or an array's task that are its own (the rest are links to
    the shared folder): its kwargs, its file_manager.json (``manager`` with its id), its state
    record, and (an array's task: its slice) its config."""
    files = {KWARGS_JSON: json.dumps(job.kwargs, ensure_ascii=False),
             FILE_MANAGER_JSON: json.dumps(dict(manager, job_id=job.job_id)),
             STATE_JSON: json.dumps(_first_state(job))}
    if config is not None:
        files[CONFIG_JSON] = json.dumps(config)
    return files


def _write_members(template: RemoteMachine, jobs: list[RemoteMachine],
                   per_job_config: bool = True) -> None:
    """The members of a sweep or an array beside the shared folder, here, each with its record;
    the same files travel to a host (``template.members``)."""
    queued = template.file_manager.job_root.parent
    links = sweep_links(queued, template.job_id)
    manager = template.file_manager.to_dict()
    members = []
    for job in jobs:
        files = _member_files(job, manager, job.config.to_dict() if per_job_config else None)
        members.append([job.job_id, files])
        job.members, job.shared_folder = [], template.job_id
        record = dict(files, **{REMOTE_MACHINE_JSON: json.dumps(job.to_dict())})
        write_sweep_job(queued, job.job_id, record, links)
    template.members = members


# -- a new job's arguments and files, an array's tasks, waiting for the results --------------------

def _wait_for_results(machine: RemoteMachine, timeout: float | None, poll: float) -> Path:
    """The results folder once the job completed (RemoteMachine.wait): JobFailedError if it
    failed, StackopsError once ``timeout`` seconds passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        report = _within(timeout, deadline, machine.get_status, 0)
        results = _settle(machine, report)
        if results is not None:
            return results
        if deadline is not None and time.monotonic() > deadline:
            raise StackopsError(f"job {machine.job_id} still {report.status} after {timeout}s")
        time.sleep(poll)


def _array_tasks(machine: RemoteMachine) -> list[RemoteMachine]:
    """RemoteMachine.array_tasks: loaded once, each given the array's connection."""
    if machine.tasks is None:
        ids = machine.task_ids or [f"{machine.job_id}-{k}" for k in range(len(machine.array_parts))]
        machine.tasks = [RemoteMachine.load(task_id, machine.config.base_dir) for task_id in ids]
    for task in machine.tasks:
        task.place.connection = machine.place.connection
    return machine.tasks


def _download_array(machine: RemoteMachine, target: str | os.PathLike[str] | None, overwrite: bool,
                    progress: Callable[[int], None] | None) -> Path:
    """Each task's results into one folder, a sub-folder per task (``{job_id}-{k}``)."""
    own = f"{DEFAULT_RESULTS_DIR}/{machine.job_id}"
    folder = expand_home(target if target is not None else own)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"{collapse_home(folder)} already exists",
                          hint="pass overwrite=True (--overwrite)")
    _mkdir_private(folder)
    for task in machine.array_tasks():
        task.download_results(folder / task.job_id, overwrite, progress)
    machine.results_downloaded = True
    _save_job(machine)
    return folder


def _check_arguments(func: Any, machine: RemoteMachine, config: RemoteStackOpsConfig) -> None:
    """The callable takes the kwargs (and workload_params once) and has an execution line."""
    if machine.job_params.kind == "command" and machine.kwargs:
        raise ConfigError("a command takes no kwargs: its arguments are in the command",
                          hint="a sweep's lines fill {name} placeholders of the command")
    if config.workload_params is not None and "workload_params" in machine.kwargs:
        raise ConfigError("workload_params given both in config and in func_kwargs")
    _check_call(_parameters(func, machine.job_params), machine.kwargs,
                config.workload_params is not None, f"{machine.job_params.func_name}()")
    machine.job_params.get_execution_line(config.workload_params, config.parallelize,
                                          config.wrap_in_try_except)


def _check_job_files(data: list[str], copy_repo: bool, job_params: JobParams) -> None:
    """Refuse data that is missing or would sync the whole home, and a repo that is the home."""
    for item in data:
        if not isinstance(item, str) or not expand_home(item).exists():
            raise ConfigError(f"data path not found: {item!r}")
        whole = posixpath.normpath(collapse_home(item)) in ("~", "/")
        if whole or expand_home(item) in Path.home().parents:
            raise ConfigError(f"data {item!r} is your home or holds it: it would be synced whole",
                              hint="name the folder the job needs")
    if copy_repo:
        repo = expand_home(job_params.repo_path_rh)
        if repo == Path.home() or repo in Path.home().parents or str(repo) == "/":
            raise ConfigError(f"copy_repo would send {collapse_home(repo)}, your whole home: "
                              f"{job_params.file_path_rh} is in no repo",
                              hint="put the code in a folder of its own (a git repo, ideally)")


# -- a job's record here (remote_machine.json); rerun, withdraw, delete ----------------------------

@_model
class _JobRecord:
    """A job's record here, ``remote_machine.json`` (RemoteMachine.to_dict, from_dict): what it
    is and how far it got, named as RemoteMachine names them. Its kwargs are a file of their own
    (an older record holds them); a key it does not know is left aside."""

    config: RemoteStackOpsConfig
    job_params: JobParams
    file_manager: FileManager
    data: list[str]
    scripts_generated: bool
    submitted: bool
    results_downloaded: bool
    launcher_pid: int | None = None
    shared: bool = False
    slurm_job_id: str | None = None
    task_ids: list[str] = _field(default_factory=list)
    results_path: Path | None = None
    cloud_sha256: str = ""
    shared_folder: str | None = None
    downloaded_to: Path | None = None
    kwargs: dict[str, Any] | None = None  # None: in their own file, read when asked

    @classmethod
    def of(cls, machine: RemoteMachine) -> _JobRecord:
        return cls(**{name: getattr(machine, name) for name in cls.__dataclass_fields__
                      if name != "kwargs"})

    def to_json(self) -> dict[str, Any]:
        data = dict(vars(self))  # (in the fields' order)
        del data["kwargs"]
        data.update(config=self.config.to_dict(), job_params=self.job_params.to_dict(),
                    file_manager=self.file_manager.to_dict())
        data["results_path"] = self.results_path.as_posix() if self.results_path else None
        data["downloaded_to"] = str(self.downloaded_to) if self.downloaded_to else None
        return data

    @classmethod
    def from_json(cls, data: Any, job_root: Path | None) -> _JobRecord:
        if not isinstance(data, dict):
            raise ConfigError("remote_machine.json: expected a JSON object")
        path = data.get("results_path")
        downloaded = data.get("downloaded_to")
        inline = data.get("kwargs")
        try:
            return cls(RemoteStackOpsConfig.from_dict(data["config"]),
                       JobParams.from_dict(data["job_params"]),
                       FileManager.from_dict(data["file_manager"], job_root), list(data["data"]),
                       bool(data["scripts_generated"]), bool(data["submitted"]),
                       bool(data["results_downloaded"]), data.get("launcher_pid"),
                       bool(data.get("shared", False)), data.get("slurm_job_id"),
                       list(data.get("task_ids") or []), Path(path) if path else None,
                       str(data.get("cloud_sha256") or ""), data.get("shared_folder"),
                       Path(downloaded) if isinstance(downloaded, str) else None,
                       _check_kwargs(inline) if inline is not None else None)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"remote_machine.json is incomplete: {exc}") from exc

    def restore(self, machine: RemoteMachine) -> RemoteMachine:
        """``machine``, a blank job with this record's config, as the record has it."""
        for name in self.__dataclass_fields__:
            setattr(machine, name, getattr(self, name))
        machine.pickled_instance = None
        machine.parent_slurm_ids = []
        return machine


def _save_job(machine: RemoteMachine, sync: bool = True) -> None:
    """The job's record, whole or not at all; fsynced unless ``sync`` is False: a record that
    another save follows at once, or one no more lasting than the folder beside it."""
    path = machine.file_manager.path(REMOTE_MACHINE_JSON)
    _mkdir_private(path.parent)
    text = json.dumps(machine.to_dict(), indent=2, ensure_ascii=False) + "\n"
    _write_plain(path, text, sync=sync)


def _settle(machine: RemoteMachine, report: JobStatus) -> Path | None:
    """The results folder of a completed job (kept in its record); JobFailedError if it failed
    or was cancelled; None while it has not ended."""
    if report.status in ("failed", "cancelled"):
        raise JobFailedError(machine.job_id, report.error_message)
    if report.status != "completed" or not report.results_path:
        return None
    machine.results_path = machine.place.results_path(report.results_path)
    _save_job(machine)
    return machine.results_path


# -- what a place and a launcher are told; run, fire, status and cancel through them ---------------

def _seen(machine: RemoteMachine) -> _Job:
    """What the job's place and launcher are told of it (see _Job)."""
    return _Job(machine.config, machine.file_manager, machine.root_there, machine.python,
                machine.job_params, machine.submitted, machine.shared, machine.task_ids or None,
                machine.cloud_sha256)


def _reports(place: _Place, machines: list[RemoteMachine], log_lines: int = 0) -> list[JobStatus]:
    """The status of jobs of ``place``, all asked in one go."""
    return place.reports([_seen(machine) for machine in machines], log_lines)


def _run_job(machine: RemoteMachine, run: bool, show_scripts: bool,
             progress: Callable[[int], None] | None) -> None:
    """RemoteMachine.run(): preflight, generate_scripts, optionally show_scripts, submit,
    fire(run); a queue's job goes to the queue as one unit (its workers start it)."""
    if machine.launcher.queues:
        if not run:
            raise ConfigError("a cloud_manager job is started by a worker as soon as it is queued: "
                              f"{_option('run=False', '--no-launch')} has no meaning for it")
        machine.units = _submit_units(machine, 1)
        log.info("job %s queued on %s as unit %s", machine.job_id,
                 cloud_base(machine.config.cloud_name or ""), ", ".join(machine.units))
        return
    machine.preflight()
    machine.generate_scripts()
    if show_scripts:
        machine.show_scripts()
    _submit_job(machine, progress, launch=run)
    machine.fire(run)


def _fire_job(machine: RemoteMachine, run: bool) -> tuple[int | None, str]:
    """Start the job where it is (the executing side's fire_jobs, or the answer of the
    hand-over that fired it already); ``run=False`` starts nothing and says how to."""
    machine.launch_command = f"{_prog()} start {machine.job_id}"
    if not run:
        log.info("job %s is ready on %s and was not started; start it with: %s",
                 machine.job_id, machine.host_name, machine.launch_command)
        return None, machine.launch_command
    if machine.launcher_pid is not None or machine.slurm_job_id is not None:
        raise StackopsError(f"job {machine.job_id} was already started",
                            hint=f"{_prog()} rerun {machine.job_id} runs it again")
    fired = machine.handed.fired if machine.handed is not None else {}
    if not fired:
        requests = machine.place.fire_requests(_seen(machine))
        requests.append({"action": "fire", "roots": [machine.root_there]})
        fired = machine.place.call(requests)[-1]
    machine.launcher_pid = fired.get("pid")
    machine.slurm_job_id = fired.get("slurm_id")
    # a job here: its folder, queue entry and state record are written unsynced (one fsync
    # costs 3-15 ms of every run); its record synced would not let it outlive a crash
    _save_job(machine, sync=machine.is_remote)
    if fired.get("warning"):
        log.warning("job %s on %s: %s", machine.job_id, machine.host_name, fired["warning"])
    for k, task in enumerate(machine.array_tasks() if machine.array_parts else []):
        task.slurm_job_id = f"{machine.slurm_job_id}_{k}"
        _save_job(task)
    log.info("job %s fired on %s (%s)", machine.job_id, machine.host_name,
             f"Slurm job {machine.slurm_job_id}" if machine.slurm_job_id
             else f"pid {machine.launcher_pid}")
    return machine.launcher_pid, machine.launch_command


def _get_status(machine: RemoteMachine, log_lines: int) -> JobStatus:
    """RemoteMachine.get_status(): its queue's word while a queue holds it, else judged where it
    runs; a job whose hand-over to its host broke off has none there (nothing of it runs), and
    is never shown as ready to start."""
    queued = machine.launcher.queued_status(_seen(machine))
    if queued is not None:
        return queued
    if machine.is_remote and not machine.submitted:
        raise StackopsError(f"job {machine.job_id} was never completely submitted to "
                            f"{machine.host_name}, so nothing of it runs there (was the "
                            "submission interrupted?)", hint="run it again under a new job_id")
    return _reports(machine.place, [machine], log_lines)[0]


def _cancel_job(machine: RemoteMachine, grace: float) -> JobStatus:
    """RemoteMachine.cancel(): where the job runs (cancel_job); the status after, ``reason``
    saying what it was before (an ended job is left as it was). An array's tasks are then read
    where they run, in one round trip, so the records kept here say what they say there."""
    queued = machine.launcher.cancel_queued(_seen(machine))
    if queued is not None:
        return queued
    if not machine.submitted and machine.is_remote:
        raise StackopsError(f"job {machine.job_id} never reached {machine.host_name}: "
                            "nothing to cancel")
    report = _cancel_at(machine.place, [machine], grace)[machine.job_id]
    if machine.array_parts:
        _reports(machine.place, machine.array_tasks())
    return report


def _after(machine: RemoteMachine, parent_id: str) -> str:
    """A job ``machine`` runs after: submitted from here to the same place, started the same
    way. Under Slurm it is judged from stackops' own record of it: one that failed or was
    cancelled refuses the child now, one that completed needs no dependency, and one still to
    end is a Slurm dependency (its id is returned; else "")."""
    after = _option("after", "--after")
    try:
        parent = RemoteMachine.load(parent_id, machine.config.base_dir)
    except ConfigError:
        raise ConfigError(f"{after} {parent_id}: no such job here",
                          hint=f"{_prog()} list shows the jobs") from None
    if parent.host_name != machine.host_name or parent.uses_slurm != machine.uses_slurm:
        raise ConfigError(f"{after} {parent.job_id}: that job runs on {parent.host_name}"
                          f"{' under Slurm' if parent.uses_slurm else ''}; "
                          "this one must run in the same place")
    if not machine.uses_slurm:
        return ""
    if parent.slurm_job_id is None:
        raise ConfigError(f"{after} {parent.job_id}: that job was never handed to Slurm")
    status = parent.get_status(0).status
    if status in ("failed", "cancelled"):
        raise ConfigError(f"{after} {parent.job_id}: that job {status}, so this one would never "
                          "run", hint=f"{_prog()} rerun {parent.job_id} first")
    return "" if status == "completed" else parent.slurm_job_id


def _results_here(machine: RemoteMachine, results: Path) -> Path:
    """wait()'s results folder as a path here: where it is, or downloaded (once) to its place's
    default target."""
    target = machine.place.results_target(_seen(machine), results)
    done = machine.downloaded_to
    if target is None:
        return results
    if machine.results_downloaded and done is not None and done.exists():
        return done
    return machine.download_results(target, overwrite=True)


def _submit_units(machine: RemoteMachine, split: int) -> list[str]:
    """RemoteMachine.submit_to_cloud(): the job as ``split`` work units, each with its slice of
    the workload, in the queue on ``config.cloud_name``: all of them, or none."""
    config = machine.config
    if not config.cloud_name:
        raise ConfigError("submit_to_cloud needs cloud_name (an rclone remote)")
    if split < 1 or (split > 1 and machine.job_params.kind == "script"):
        why = ": a script cannot be split" if split > 1 else ""
        raise ConfigError(f"cannot split into {split} units{why}")
    check_cloud_remote(config.cloud_name)
    whole = config.workload_params or WorkloadParams(jobs=1)
    parts = whole.split_to_jobs(split) if split > 1 or config.workload_params else [None]
    queue = CloudQueue(config.cloud_name)
    unit_ids = _check_unit_ids(machine, queue, len(parts))
    staging = Path(_make_temp_dir(_mkdir_private(expand_home(config.base_dir))))
    units: list[RemoteMachine] = []
    try:
        for unit_id, part in zip(unit_ids, parts):
            unit = _unit_of(machine, unit_id, part)
            units.append(unit)
            archive = _pack_unit(staging / f"{unit_id}.tar", unit.file_manager.job_root,
                                 unit.data)  # with copy_repo the unit's folder carries its code
            queue.add(unit_id, archive, {"unit": unit_id, "submitted_at": _iso(_utcnow()),
                                         "allowed_remotes": config.allowed_remotes})
    except BaseException:  # all units or none: what went up comes down, what was made here goes
        for unit in units:
            with _suppress(StackopsError):
                queue.remove(unit.job_id)
            shutil.rmtree(unit.file_manager.job_root, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return unit_ids


def _check_unit_ids(machine: RemoteMachine, queue: CloudQueue, count: int) -> list[str]:
    """Each unit's id, checked first: a safe name, no job here, no unit queued by it."""
    unit_ids = [f"{machine.job_id}-{k}-{count}" for k in range(count)]
    for unit_id in unit_ids:
        if not _SAFE_NAME.match(unit_id):  # the job_id is safe: only the length can fail
            raise ConfigError(f"unit id {unit_id!r} is {len(unit_id)} characters, over 128",
                              hint=f"choose a shorter job_id for {count} units")
        root = FileManager(unit_id, base=machine.config.base_dir).job_root
        if root.exists():
            raise ConfigError(f"unit {unit_id!r} already exists at {collapse_home(root)}",
                              hint="choose another job_id, or leave it out for a fresh one")
    taken = sorted(set(unit_ids) & set(queue.listing()))
    if taken:
        raise ConfigError(f"the queue on {queue.base} already holds unit(s) {', '.join(taken)}",
                          hint="choose another job_id, or leave it out for a fresh one")
    return unit_ids


def _unit_of(machine: RemoteMachine, unit_id: str, part: WorkloadParams | None) -> RemoteMachine:
    data = machine.config.to_dict()
    data.update(job_id=unit_id, ssh_host=None, launch_method="cloud_manager",
                workload_params=part.to_dict() if part else None,
                python=machine.config.python or "python3")
    unit = RemoteMachine._blank(RemoteStackOpsConfig.from_dict(data), machine)
    unit.file_manager = FileManager(unit_id, "Linux", unit.config.lock_resources,
                                    unit.config.max_simultaneous_jobs, unit.config.base_dir)
    unit.generate_scripts()
    unit.submitted = True
    _save_job(unit)
    return unit


def _rerun_copy(machine: RemoteMachine, fresh: bool = False) -> RemoteMachine:
    """A new job ``<id>-rN`` (the first N free) with the same callable, kwargs, data and options,
    and with copy_repo the same snapshot (``fresh``: the code as it is now)."""
    stem = re.sub(r"-r\d+\Z", "", machine.job_id)
    number = 1
    while (machine.file_manager.job_root.parent / f"{stem}-r{number}").exists():
        number += 1
    data = machine.config.to_dict()
    data["job_id"] = check_safe_name(f"{stem}-r{number}")
    again = RemoteMachine._blank(RemoteStackOpsConfig.from_dict(data))
    again.job_params = JobParams.from_dict(machine.job_params.to_dict())
    again.kwargs, again.data = dict(machine.kwargs), list(machine.data)
    pickled = machine.file_manager.path(INSTANCE_PICKLE)
    again.pickled_instance = pickled.read_bytes() if pickled.exists() else None
    again.file_manager = FileManager(again.job_id, "Linux", machine.file_manager.lock_resources,
                                     again.config.max_simultaneous_jobs, again.config.base_dir,
                                     pool=machine.file_manager.pool, gpus=machine.file_manager.gpus)
    again.parent_slurm_ids = [_after(again, p) for p in again.config.after]
    if machine.config.copy_repo and not fresh:
        _pin_snapshot(again, machine)
    return again


def _pin_snapshot(again: RemoteMachine, machine: RemoteMachine) -> None:
    """Give rerun ``again`` the snapshot ``machine`` ran, from the manifest its folder here keeps:
    its bytes come from its copy of the code here (each file checked), else from the files of
    the work tree that still hold them, else (a host's job) from the host's store, which keeps a
    snapshot while a job folder there names it. A job from before manifests were kept reruns
    the code as it is now."""
    path = machine.file_manager.path(CODE_MANIFEST_JSON)
    if not path.exists():
        log.warning("job %s kept no manifest of its code: its rerun takes the code as it is now",
                    machine.job_id)
        return
    identity, entries, _none = _recorded_snapshot(machine)
    code = machine.file_manager.path(CODE_DIR)
    sources: dict[str, Path] = {}
    if code.is_dir():
        for relative, kind, value in entries:
            if kind != "l":
                sources.setdefault(value, code / relative)
    else:  # its copy is on the host: the tree's files that still hold the same bytes
        now = code_snapshot(expand_home(machine.job_params.repo_path_rh))
        sources = {digest: now[2][digest] for _r, kind, digest in entries
                   if kind != "l" and digest in now[2]}
    again.snapshot = (identity, entries, sources)
    again.pinned = True


def _rerun_failed_tasks(machine: RemoteMachine, fresh: bool = False) -> list[str]:
    """RemoteMachine.rerun_failed_tasks: each failed or cancelled task of an array, run again."""
    if not machine.array_parts or machine.slurm_job_id is None:
        raise ConfigError(f"job {machine.job_id} is not a Slurm array: rerun it whole")
    tasks = machine.array_tasks()
    reports = _reports(machine.place, tasks)  # one round trip for them all
    failed = [k for k, report in enumerate(reports) if report.status in ("failed", "cancelled")]
    if not failed:
        raise ConfigError(f"array {machine.job_id} has no failed task to rerun")
    for k in failed:
        tasks[k] = tasks[k].rerun(fresh=fresh)
    machine.task_ids = [task.job_id for task in tasks]
    _save_job(machine)
    if not machine.is_remote:  # every view of the array here follows the new tasks (a host's
        _record(machine.file_manager.job_root, tasks=machine.task_ids)  # are told them: reports)
    return [tasks[k].job_id for k in failed]


def _withdraw(machine: RemoteMachine) -> None:
    """A submission refused or broken off before launch leaves no job behind here (a refused
    hand-over sends nothing), so the same job_id works again."""
    if machine.submitted or machine.launcher_pid is not None or machine.slurm_job_id is not None:
        return
    for task in machine.tasks or []:
        shutil.rmtree(task.file_manager.job_root, ignore_errors=True)
    shutil.rmtree(machine.file_manager.job_root, ignore_errors=True)
    machine.scripts_generated = False
    log.info("job %s was not submitted; its id is free again", machine.job_id)


def _scripts_text(machine: RemoteMachine) -> str:
    """The generated wrapper (and Slurm's batch script), each under a title line (show_scripts)."""
    if not machine.scripts_generated:
        raise StackopsError("no scripts yet", hint="call generate_scripts() first")
    text = ""
    for title, relative in (("Python script", WRAPPER_PY), ("Batch script", SBATCH_SH)):
        path = machine.file_manager.path(relative)
        if not path.exists():
            continue
        text += f"---- {title}: {collapse_home(path)}\n{path.read_text(encoding='utf-8')}\n"
    return text


def _delete_job(machine: RemoteMachine, results: bool) -> None:
    """RemoteMachine.delete: where the job ran (judged there: refused while it has not ended; its
    own results folder too with ``results``), then its record here, unless that was the same
    folder (a shared home)."""
    root = machine.file_manager.job_root
    if root.is_symlink() or not (root / FILE_MANAGER_JSON).is_file():
        raise ConfigError(f"{collapse_home(root)} is not a stackops job folder; nothing deleted")
    tasks = machine.array_tasks() if machine.array_parts else []
    place: _Place = machine.place if machine.submitted or not machine.is_remote \
        else _Here(machine.config)
    roots = [task.root_there if place is machine.place else str(task.file_manager.job_root)
             for task in tasks]
    there = machine.root_there if place is machine.place else str(root)
    place.call([{"action": "delete", "roots": [*roots, there], "results": results}])
    for folder in [task.file_manager.job_root for task in tasks] + [root]:
        if folder.is_dir() and not folder.is_symlink():  # the record here of a job on a host
            _remove_job_folder(folder)
    log.info("job %s deleted", machine.job_id)


def _delete_recordless(root: Path, results: bool) -> str:
    """Delete a job folder here whose record is gone (removed by hand: _record_gone) as the
    executing side deletes one: only a job folder by its layout, refused while its job has not
    ended (with ``results``, its own results folder too); it leaves its sweep. Where it ran, if
    on a host, is not known without its record: a folder there stays, and the copy here of its
    state (ended) goes alone, never judged as a job here. A folder whose record is damaged
    (_record_gone's ``unreadable``) goes the same way. Returns what went."""
    if not _record_gone(root, unreadable=True):
        raise ConfigError(f"{collapse_home(root)} is not a stackops job folder whose record is "
                          "gone; nothing deleted")
    _not_on_a_host(root, "deleted")
    if read_state(root).get("mirrored"):  # a host's job, ended: only its copy here goes
        _remove_job_folder(root)
        return collapse_home(root)
    return _act_delete({"roots": [str(root)], "results": results}, None)[0]


def _cancel_recordless(root: Path, grace: float) -> JobStatus:
    """Cancel a job whose folder is here and whose record is gone (_record_gone) as the
    executing side cancels one (refused when another machine runs it); the status after, its
    ``reason`` saying what it was (as _Launcher.cancel's). Its processes are stopped only while
    they hold its lock (_stop); a folder whose record is damaged is cancelled the same way."""
    if not _record_gone(root, unreadable=True):
        raise ConfigError(f"{collapse_home(root)} is not a stackops job folder whose record is "
                          "gone; nothing cancelled")
    _not_on_a_host(root, "cancelled")
    state = _act_cancel({"roots": [str(root)], "grace": grace}, None)[0]
    report = _status_of(root.name, state)
    report.reason = f"was {state.get('was')}"
    return report


def _not_on_a_host(root: Path, verb: str) -> None:
    """Refuse to act here on a job that runs on a host, its record gone (the folder here holds the
    copy of its state last read there, and has not ended): its record said how to reach it."""
    state = read_state(root)
    if state.get("mirrored") and not _ended(state):
        raise StackopsError(f"job {root.name} was {state.get('status')} on {state.get('node')} "
                            f"when last read there ({state['mirrored'][:19]}), and its record, "
                            f"which says how to reach it, is gone; nothing {verb}",
                            hint=f"cancel it on its host ({_prog()} list --host HOST shows it "
                                 "there), then delete it here")


class RemoteMachine:
    """One job: generate its folder, submit it, fire it detached, follow it, fetch its results.

    ``func`` is what the job runs: a function or bound method, ``"path/to/file.py:func"``, a
    script's path, or any command as a list of strings (``["make", "train"]``, run without a
    shell, in the folder this process is in, inside its repo: see JobParams.from_command). A
    command takes no ``func_kwargs``; it gets its workload's slice, its id, attempt and slot in
    ``STACKOPS_*`` environment variables.

    With ``config.ssh_host=None`` (the embedded default) the job runs on this machine; otherwise on
    that host, over one SSH connection reused for every step (``close()`` ends it). Where it runs
    (a place) and how it starts there (a launcher) are chosen once, from the config (section 13).
    """

    _kwargs: dict[str, Any] | None = None

    def __init__(self, func: Any, config: RemoteStackOpsConfig,
                 func_kwargs: dict[str, Any] | None = None, data: list[str] | None = None) -> None:
        if not isinstance(config, RemoteStackOpsConfig):
            raise ConfigError("config must be a RemoteStackOpsConfig")
        self._use(config)
        self.job_params, self.pickled_instance = _job_params_for(func)
        self.kwargs = _check_kwargs(func_kwargs)
        _check_arguments(func, self, config)
        self.data = list(config.data) + list(data or [])
        _check_job_files(self.data, config.copy_repo, self.job_params)
        if config.copy_repo:
            self.job_params.data_r = _data_in_repo(self.data, self.job_params.repo_path_rh)
        slots = config.lock_resources and self.launcher.takes_slot
        self.file_manager = FileManager(config.job_id, "Linux", slots, config.max_simultaneous_jobs,
                                        config.base_dir, pool=config.pool, gpus=config.gpus)
        self.place.adopt_state_dir(self.file_manager)
        self.parent_slurm_ids = [_after(self, parent) for parent in config.after]

    @classmethod
    def _blank(cls, config: RemoteStackOpsConfig, like: RemoteMachine | None = None,
               ) -> RemoteMachine:
        """A job with ``config``, not checked (loaded from its record, a rerun, an array's task,
        a cloud unit): with ``like``'s callable, kwargs, data and pickled instance, if given."""
        job = cls.__new__(cls)
        if like is not None:
            job.__dict__.update(like.__dict__)
            job.job_params = JobParams.from_dict(like.job_params.to_dict())
        job._use(config)
        return job

    def _use(self, config: RemoteStackOpsConfig) -> None:
        """Take ``config``, with it the place the job runs and the launcher that starts it, and
        the state of a job not generated yet."""
        self.config = config
        self.place = _place_for(config)
        self.launcher = _launcher_for(config)
        self.scripts_generated = self.submitted = self.results_downloaded = False
        self.results_path: Path | None = None
        self.launcher_pid: int | None = None
        self.slurm_job_id: str | None = None
        self.task_ids: list[str] = []  # an array's tasks when some were rerun (else <id>-0, ...)
        self.tasks: list[RemoteMachine] | None = None
        self.launch_command = ""
        self.shared = False  # the host sees our job folder (a shared home): used in place
        self.snapshot: tuple[str, list[list[Any]], dict[str, Path]] | None = None
        self.pinned = False  # the snapshot is an older job's (rerun): never taken again
        self.cloud_sha256 = ""  # the SHA-256 of the archive a cloud transfer uploaded
        self.units: list[str] = []  # the work units a cloud_manager run queued
        self.downloaded_to: Path | None = None  # where download_results() put the results here
        self.handed: _HandOver | None = None  # what the hand-over to the host did
        self.members: list[list[Any]] = []  # a sweep's or array's members: their own files
        self.shared_folder: str | None = None  # the shared folder of its sweep or array

    def __repr__(self) -> str:
        return f"RemoteMachine({self.config.job_id!r} @ {self.host_name})"

    @property
    def kwargs(self) -> dict[str, Any]:
        """The job's keyword arguments. They are stored once, in the job folder's KWARGS_JSON (a big
        one is not rewritten by every save), and a loaded job reads them only when asked."""
        if self._kwargs is None:
            self._kwargs = _check_kwargs(_read_json(self.file_manager.path(KWARGS_JSON)))
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value: dict[str, Any] | None) -> None:  # None: read from the folder
        self._kwargs = value

    @property
    def job_id(self) -> str:
        return self.config.job_id

    @property
    def is_remote(self) -> bool:
        return self.place.remote

    @property
    def host_name(self) -> str:
        return self.place.host_name

    @property
    def uses_slurm(self) -> bool:
        """Slurm starts and queues the job (``launch_method='slurm'``); it takes no slot."""
        return isinstance(self.launcher, _SlurmLauncher)

    @property
    def array_parts(self) -> list[WorkloadParams]:
        """The slices of a Slurm job array: a workload of K > 1 parts runs as K array tasks, task k
        a job of its own (``{job_id}-{k}``) with slice k; empty for any other job."""
        return self.launcher.array_parts(self.config.workload_params)

    def array_tasks(self) -> list[RemoteMachine]:
        """The jobs of the array's tasks, in index order, sharing this job's connection."""
        return _array_tasks(self)

    @property
    def python(self) -> str:
        return self.config.python or self.place.default_python

    @property
    def ssh(self) -> SSH:
        """The one connection to the host, opened on first use."""
        return self.place.ssh

    @property
    def root_there(self) -> str:
        """The job folder where it runs, as the executing side is told it (``~/...`` on a host)."""
        return self.place.there(self.file_manager)

    def close(self) -> None:
        self.place.close()

    def __enter__(self) -> RemoteMachine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- persistence ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return _JobRecord.of(self).to_json()

    @classmethod
    def from_dict(cls, data: Any, job_root: Path | None = None) -> RemoteMachine:
        record = _JobRecord.from_json(data, job_root)
        return record.restore(cls._blank(record.config))

    @classmethod
    def from_job_dir(cls, job_dir: str | os.PathLike[str]) -> RemoteMachine:
        root = expand_home(job_dir)
        return cls.from_dict(_read_json(root / REMOTE_MACHINE_JSON), job_root=root)

    @classmethod
    def load(cls, job_id: str, base_dir: str | None = None) -> RemoteMachine:
        """The job ``job_id`` submitted earlier from this machine (by this or another process)."""
        root = expand_home(f"{base_dir or DEFAULT_BASE_DIR}/queued/{check_safe_name(job_id)}")
        if not (root / REMOTE_MACHINE_JSON).exists():
            if _record_gone(root):  # (the one rule of a job folder without its record)
                raise _RecordMissingError(f"job {job_id!r} cannot be read: {_gone(root)}",
                                          hint=f"{_prog()} list shows the jobs")
            raise ConfigError(f"no job {job_id!r} under {collapse_home(root.parent.parent)}",
                              hint=f"{_prog()} list shows the jobs")
        return cls.from_job_dir(root)

    # -- the lifecycle --------------------------------------------------------------------------

    def generate_scripts(self) -> RemoteMachine:
        """Write the whole job folder here at once: complete under its name, or not at all."""
        _generate_job_folder(self)
        return self

    def show_scripts(self) -> str:
        """Print the generated wrapper (and a Slurm job's batch script; return the same text)."""
        text = _scripts_text(self)
        print(text, end="")
        return text

    def submit(self, progress: Callable[[int], None] | None = None) -> RemoteMachine:
        """Put the job where it runs: over SSH, the job folder, the repo (``copy_repo``) and the
        data go to their home-relative places on the host; here, the folder already is there."""
        return _submit_job(self, progress)

    def fire(self, run: bool = True) -> tuple[int | None, str]:
        """Start the job detached and return (its wrapper's pid, launch command) at once; the job
        survives the connection closing. With ``run=False`` nothing starts: the pid is None and
        the command is what starts it later (``stackops start ID``)."""
        if not self.submitted:
            raise StackopsError(f"job {self.job_id} is not submitted yet",
                                hint="call submit() first")
        return _fire_job(self, run)

    def cancel(self, grace: float = 10.0) -> JobStatus:
        """Stop the job where it runs and return the status that holds after: ``cancelled``, or
        how it had already ended. A running job gets SIGTERM on its whole process group and
        SIGKILL after ``grace`` seconds; a waiting one leaves the queue and never starts; its
        slot is free at once. A Slurm job is cancelled with ``scancel``."""
        if not isinstance(grace, (int, float)) or isinstance(grace, bool) or not 0 <= grace <= 3600:
            raise ConfigError(f"grace must be 0 to 3600 seconds, got {grace!r}")
        return _cancel_job(self, grace)

    def delete(self, results: bool = False) -> None:
        """Remove the job's folder where it ran and its record here (with ``results``, also its
        own results folder). A job started and not ended is refused: cancel it first."""
        _delete_job(self, results)

    def rerun(self, run: bool = True, fresh: bool = False) -> RemoteMachine:
        """The same function or script, kwargs, data and options as a new job ``<id>-r1`` (a rerun
        of ``x-r1`` is ``x-r2``), run now; refused while this job has not ended. With copy_repo
        it runs this job's own snapshot (``fresh``: the code as it is now)."""
        started = self.launcher_pid is not None or self.slurm_job_id is not None
        report = self.get_status(0) if started else None
        if report is None or not report.finished:
            state = report.status if report is not None else "never started"
            raise ConfigError(f"job {self.job_id} is {state}: only an ended job can be rerun",
                              hint=f"{'cancel it first' if report is not None else 'start it'}")
        again = _rerun_copy(self, fresh)
        again.place.connection = self.place.connection
        self.place.connection = None  # the connection goes on with the new job
        return again.run(run)

    def rerun_failed_tasks(self, fresh: bool = False) -> list[str]:
        """Run again, each as a Slurm job of its own, every task of this array that failed or was
        cancelled (with its own snapshot; ``fresh``: the code as it is now); the array follows
        the new tasks from then on. Returns their ids."""
        return _rerun_failed_tasks(self, fresh)

    def preflight(self) -> RemoteMachine:
        """Check what can be checked before anything is written or sent: the host answers and is
        trusted, the cloud remote is known, the launcher's tools and the GPUs asked for are there.
        run() starts with it."""
        self.place.preflight()
        self.launcher.preflight(self.place)
        self.place.check_gpus(_seen(self))
        return self

    def run(self, run: bool = True, show_scripts: bool = False,
            progress: Callable[[int], None] | None = None) -> RemoteMachine:
        """Launch the job the way its launcher does (``config.launch_method``). ``remotely``:
        preflight, generate_scripts, optionally show_scripts, submit, fire(run): a detached
        process that takes a slot where it runs. ``slurm``: the same, handed to sbatch.
        ``cloud_manager``: the job goes, as one work unit, to the queue on ``config.cloud_name``;
        any worker runs it (submit_to_cloud)."""
        _run_job(self, run, show_scripts, progress)
        return self

    def get_status(self, log_lines: int = 20) -> JobStatus:
        """The job's full status, judged where it runs (see _judge). Over SSH this is one round
        trip, and the host's record of the job is kept in the local job folder (shown "as of"
        when the host cannot be reached)."""
        return _get_status(self, log_lines)

    def check_job_status(self) -> Path | None:
        """The results folder once the job completed (on the host, for a remote job); None while
        it is queued, waiting or running. A failed job raises JobFailedError with its error."""
        return _settle(self, self.get_status(0))

    def wait(self, timeout: float | None = None, poll: float = 0.2, download: bool = True) -> Path:
        """Block until the job ends (raises JobFailedError if it failed) and return its results
        folder as a path usable on this machine: a local job's folder itself; a remote job's
        folder downloaded here first (download_results() with its default target; only once).
        ``download=False`` returns the folder's path on the host as the host recorded it."""
        results = _wait_for_results(self, timeout, poll)
        return _results_here(self, results) if download else results

    def results(self) -> Path:
        """The results folder, or an error saying why there is none yet."""
        results = self.results_path or self.check_job_status()
        if results is None:
            status = self.get_status(0).status
            raise StackopsError(f"job {self.job_id} has no results yet ({status})",
                                hint="wait until it completes")
        return results

    def download_results(self, target: str | os.PathLike[str] | None = None,
                         overwrite: bool = False,
                         progress: Callable[[int], None] | None = None) -> Path:
        """The results folder on this machine. From a host it is downloaded (``None``: to the same
        home-relative path here, only when that is the job's own results folder); here it is
        already local, and ``target`` makes a copy. Either way the copy appears whole under its
        name or not at all."""
        results = self.results()
        if self.array_parts:
            return _download_array(self, target, overwrite, progress)
        local = self.place.fetch_results(_seen(self), results, target, overwrite, progress)
        self.results_downloaded = True
        self.downloaded_to = local
        _save_job(self)
        return local

    def submit_to_cloud(self, split: int) -> list[str]:
        """Expand this job into ``split`` work units, each with its slice of the workload, and put
        them in the queue on ``config.cloud_name``; any ``worker`` (among ``allowed_remotes``)
        runs them."""
        return _submit_units(self, split)

    def delete_remote_results(self) -> RemoteMachine:
        """Delete the job's results folder where it ran, only if it is the job's own (its default
        results folder or inside its job folder); a path it returned from elsewhere is refused."""
        self.results()
        self.place.call([{"action": "delete_results", "roots": [self.root_there]}])
        return self


def _ship_bytecode(source: Path, folder: Path) -> None:
    """Put ``source`` compiled for this Python into ``folder/__pycache__``, validated by the hash of
    the source rather than its mtime, so it stays valid beside a copy of the source wherever both
    land (an interpreter of another version ignores it). Compiled once per version of the file and
    kept in ~/.cache/stackops, named by the hash its bytecode is checked by (importlib's
    source_hash: hashlib, with OpenSSL, costs an import of some 5 ms); any trouble just means the
    job compiles the file itself. A cache folder others could write to is refused; a cached file
    you did not write is compiled anew."""
    try:
        import _frozen_importlib_external as bootstrap
        import _imp
    except ImportError:
        return
    tag, source_hash = sys.implementation.cache_tag, getattr(_imp, "source_hash", None)
    if tag is None or source_hash is None:  # (CPython's own: another Python ships none)
        return
    key = int.from_bytes(bootstrap.MAGIC_NUMBER, "little")  # importlib.util.source_hash's
    digest = source_hash(key, source.read_bytes()).hex()
    cache = expand_home(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "stackops"
    compiled = cache / f"{source.stem}-{digest}.{tag}.pyc"
    partial = cache / f".{compiled.name}.{os.getpid()}"
    try:
        _mkdir_private(cache)
        reason = _untrusted_reason(cache)
    except OSError as exc:
        log.debug("no bytecode cache: %s", exc)
        return
    if reason is not None:  # a .pyc planted there would run in every later job
        raise ConfigError(f"refusing bytecode cache {cache}: {reason}",
                          hint="remove that folder, or set XDG_CACHE_HOME to a folder of your own")
    try:
        if not _is_own_private_file(compiled):
            _compile_checked(source, partial)
            os.replace(partial, compiled)
        shipped = _mkdir_private(folder / "__pycache__") / f"{source.stem}.{tag}.pyc"
        shutil.copyfile(compiled, shipped)
        os.chmod(shipped, 0o600)
    except OSError as exc:
        log.debug("no bytecode shipped with the job: %s", exc)
        with _suppress(OSError):
            os.unlink(partial)


def _compile_checked(source: Path, target: Path) -> None:
    """``source`` compiled into ``target``, valid by the source's hash (see _ship_bytecode);
    py_compile (and the traceback machinery it brings) imported only when a file is compiled."""
    import py_compile

    try:
        py_compile.compile(str(source), cfile=str(target), dfile=f"python/{source.name}",
                           doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    except py_compile.PyCompileError as exc:
        raise OSError(f"{source.name} does not compile: {exc.msg}") from exc


def _is_own_private_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) that you wrote and nobody else may change."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def list_jobs(base_dir: str | None = None, timeout: float = 10.0) -> list[JobStatus]:
    """Every job under ``base_dir`` on this machine and the parts of the clusters beside it, newest
    first, each as its host reports it now (list_job_rows says which could not be refreshed)."""
    return [row["report"] for row in list_job_rows(base_dir, timeout)]


def _job_folders(base_dir: str | None,
                 checked: bool = True) -> list[tuple[Path | str, str | None]]:
    """(job folder, cluster id or None): the jobs under ``base_dir`` and the clusters' parts (a
    staging folder, hidden, is no job; ``checked=False``: nor is one without its record, but
    the caller looks, and a folder here is given as text: list reads 10,000, and a Path each
    is a tenth of its time)."""
    base = expand_home(base_dir or DEFAULT_BASE_DIR)
    found: list[tuple[Path | str, str | None]] = []
    queued = base / "queued"
    with _suppress(FileNotFoundError), os.scandir(queued) as entries:
        for entry in entries:  # (a link is no job folder: one to a job's would list it twice)
            name = entry.name
            if not (name.startswith(".") or entry.is_symlink()) and (not checked or os.path.exists(
                    f"{queued}/{name}/{REMOTE_MACHINE_JSON}")):
                found.append((queued / name if checked else f"{queued}/{name}", None))
    for cluster_json in sorted(base.parent.glob("job_id__*/cluster.json")):
        try:
            data = _read_json(cluster_json)
            parts = data["machines"].values()
            found += [(expand_home(path), str(data["job_id"])) for path in parts]
        except (StackopsError, KeyError, TypeError, AttributeError) as exc:
            log.warning("skipping cluster %s: %s", collapse_home(cluster_json.parent), exc)
    return found


def list_job_rows(base_dir: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """One row per job (see list_jobs): ``job_id``, ``host`` (the alias it was submitted to),
    ``cluster``, ``sweep`` (the sweep or array it is a member of), ``report`` (a JobStatus),
    ``as_of`` (None when current; else when its record was last read where it runs, because its
    host could not be asked within ``timeout`` seconds) and ``error`` (why not). Every job is
    judged where it runs (here: this machine's; a host's, all in one round trip per host);
    a job's state record is read once and kept while its file stays the same (_RecordCache).
    A job folder whose record is gone has no row: it is warned of, naming it."""
    cache = _RecordCache(expand_home(base_dir or DEFAULT_BASE_DIR))
    rows: list[dict[str, Any]] = []
    here: list[dict[str, Any]] = []
    remote: dict[str, list[dict[str, Any]]] = {}
    for root, cluster in _job_folders(base_dir, checked=False):
        row = cache.identity(root, cluster)  # (None: a sweep's shared folder, one being made)
        if row is None:
            continue
        if row.pop("asked_there"):
            row["root"] = Path(row["root"])  # (_take_answer writes into it)
            remote.setdefault(row["host"], []).append(row)
        else:
            here.append(row)
        rows.append(row)
    for row, answer in zip(here, _reports_of([row["root"] for row in here], 0,
                                             [row.get("tasks") for row in here], cache)):
        row["report"] = cache.report(answer, row["root"])
        row["as_of"] = answer["state"].get("as_of")
    for host, answers in _ask_hosts(remote, timeout).items():
        for row in remote[host]:
            _take_answer(row, answers.get(row["job_id"], answers.get("*")))
    for row in rows:
        del row["root"]
    cache.save()
    return sorted(rows, key=lambda r: (r["report"].submission_time or "", r["job_id"]),
                  reverse=True)


def _record_gone(root: Path, unreadable: bool = False) -> bool:
    """Whether ``root`` is a job folder without its job record: the one rule of a record-less
    job folder (RemoteMachine.load, list, a sweep's members, cancel, delete and prune follow it).
    A stackops job folder by its layout (its file manager's record; not a link: a sweep's own
    folder is none) whose record was removed (by hand); with ``unreadable``, also one whose
    record is there but is no job's (damaged: not JSON, cut short)."""
    if not os.path.isfile(root / FILE_MANAGER_JSON) or os.path.islink(root):
        return False  # (a sweep's folder: one stat)
    if not os.path.lexists(root / REMOTE_MACHINE_JSON):
        return True
    if not unreadable:
        return False
    try:
        RemoteMachine.from_job_dir(root)
    except (StackopsError, ValueError, TypeError, KeyError, AttributeError):
        return True
    except OSError:  # (not readable by us: not damaged, and not ours to remove)
        return False
    return False


def _recordless_why(root: Path, cluster: str | None = None) -> str:
    """What list says of a job folder whose record is gone (as status says it), and how it goes
    (a job whose process lives is cancelled first: delete refuses it)."""
    how = f"{_prog()} delete {root.name} removes it"
    if _alive(root):
        how = f"{_prog()} cancel {root.name} stops it, then {how}"
    return _record_missing(root) + ("" if cluster else f" ({how})")


def _take_answer(row: dict[str, Any], answer: Any) -> None:
    """A remote row from its host's answer, or (none: the host could not be asked) from the
    record last mirrored here, as of when it was read there."""
    if isinstance(answer, dict):
        row["report"] = report_from(answer)
        if not row["shared"] and row["root"].is_dir():
            state = dict(answer["state"], mirrored=_iso(_utcnow()))
            _write_plain(row["root"] / STATE_JSON, json.dumps(state))
        return
    row["report"] = _as_last_read(row["job_id"], row["root"])
    row["as_of"] = row["report"].as_of
    row["error"] = str(answer) if answer is not None else "not asked"


def _as_last_read(job_id: str, root: Path) -> JobStatus:
    """A job whose host could not be asked, as ``list`` and ``status`` show it: its record as
    last mirrored here, as of when it was read there."""
    state = read_state(root)
    return _status_of(job_id, dict(state, as_of=state.get("mirrored") or state.get("at")))


def _who_of(machine: RemoteMachine) -> dict[str, Any]:
    """Who a job is, as a list row needs it (its record, read whole: _RecordCache keeps it)."""
    return {"job_id": machine.job_id, "host": machine.host_name, "remote": machine.is_remote,
            "sweep": machine.shared_folder, "shared": machine.shared,
            "there": machine.root_there, "tasks": machine.task_ids or None,
            "asked_there": machine.is_remote and machine.submitted}


_WHO_KEYS = {"job_id", "host", "remote", "sweep", "shared", "there", "tasks", "asked_there"}
_CACHE_VERSION = [__version__, 3, list(sys.version_info[:2])]  # (marshal's format is Python's)


def _is_who(who: Any) -> bool:
    """Whether a cached ``who`` is one _who_of makes (of each field, the type: a cache file
    crafted by hand could hold a list that takes ages to walk, or an id that is no text)."""
    return isinstance(who, dict) and who.keys() == _WHO_KEYS and all(
        type(who[k]) is bool for k in ("remote", "shared", "asked_there")) and all(
        who[k] is None or type(who[k]) is str for k in ("job_id", "host", "sweep", "there")) \
        and (who["tasks"] is None or type(who["tasks"]) is list
             and all(type(task) is str for task in who["tasks"]))


class _RecordCache:
    """What the last ``list`` read, in ``<base>/.list-cache`` (marshal: read 2x, written 6x as
    fast as JSON; only this Python's, from your own private file, is believed): per
    job folder, who it is (host, sweep, whether its host is asked: from its record) and its state
    record, each kept with the stamps (inode, mtime, ctime, size) of the file it was read from and
    used only while that file's stamps stay the same. Records are replaced whole (a new inode), so
    a change, a deleted folder or an id used again shows in the stamps; a file is kept only once
    its stamps are RACY_NS old (a write within the same clock tick may leave them as they were:
    git's racy rule), and a state record only when no other machine writes it (an end, or a job
    this machine judges). So 10,000 jobs list with a stat each, not a read; anything odd about the
    file just means the jobs are read in full. On NFS a stat may answer from the client's
    attribute cache (up to acregmax, 60 s) where an open would look again: there a row can show a
    record that another machine replaced up to that long ago, until the next list."""

    def __init__(self, base: Path) -> None:
        self.path = base / ".list-cache"
        self.old: dict[str, Any] = {}
        self.new: dict[str, Any] = {}
        self.whos: list[Any] = []  # who the jobs are, each once (a sweep's members share one)
        self.changed = False
        self.since = time.time_ns() - RACY_NS  # a file older than this is stamped for good
        self.inside = f"{base}/queued/"  # the job folders, stat'ed from an fd of it (_folder)
        self.fd: int | None = None
        with _suppress(OSError, ValueError, EOFError, TypeError, RecursionError, MemoryError):
            if not _is_own_private_file(self.path):  # a FIFO would hang, another's file lie
                return
            with open(self.path, "rb") as handle:  # (at most 16 KiB a job folder: a row is ~1)
                size = os.fstat(handle.fileno()).st_size
                if size > 1 << 20 and size > (len(os.listdir(self.inside)) + 1) << 14:
                    return
                data = marshal.loads(handle.read())
            if isinstance(data, dict) and data.get("version") == _CACHE_VERSION:
                rows, whos = data.get("rows"), data.get("whos")
                if isinstance(rows, dict) and isinstance(whos, list):  # (checked once here)
                    self.old = rows
                    self.whos = [who if _is_who(who) else None for who in whos]

    def key(self, path: str) -> list[int] | None:
        """The stamps of the file at ``path``; [] when too recent to stand for its bytes."""
        try:
            fd = self._folder() if path.startswith(self.inside) else -1
            info = os.stat(path[len(self.inside):], dir_fd=fd) if fd >= 0 else os.stat(path)
        except OSError:
            return None
        if info.st_mtime_ns >= self.since or info.st_ctime_ns >= self.since:
            return []
        return [info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size]

    def _folder(self) -> int:
        """An fd of the job folders' folder, opened once (save closes it): a stat from it does
        not walk the path again, which halves the cost of 20,000 stats; -1 where it cannot be."""
        if self.fd is None:
            self.fd = -1
            if os.stat in os.supports_dir_fd:
                with _suppress(OSError):
                    self.fd = os.open(self.inside, os.O_RDONLY | os.O_DIRECTORY)
        return self.fd

    def close(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = None

    __del__ = close

    def entry(self, root: str) -> dict[str, Any]:
        entry = self.new.get(root)
        if entry is None:
            old = self.old.get(root)  # (taken over as it is: old is only read for root's key)
            entry = self.new[root] = old if isinstance(old, dict) else {}
        return entry

    def state(self, root: Path | str) -> dict[str, Any]:
        """The job's state record (read_state), from the cache while its file is unchanged."""
        path = str(root)
        entry = self.entry(path)
        key = self.key(f"{path}/{STATE_JSON}")
        state = entry.get("state")
        if key and entry.get("state_key") == key and isinstance(state, dict):
            return state
        state = read_state(root)  # (stamped before it is read: a later write changes them)
        kept = _ended(state) or state.get("machine") == machine_key() and not state.get("slurm")
        for name in ("state", "state_key", "checked"):
            self.changed |= entry.pop(name, None) is not None
        if key and kept:
            entry.update(state_key=key, state=state)
            self.changed = True
        return state

    def identity(self, root: Path | str, cluster: str | None,
                 warn: bool = True) -> dict[str, Any] | None:
        """A job's row before its status: who it is, from its record (or from the cache); None
        when it has no record (or, saying so unless not ``warn``, an unreadable one, or a job
        folder whose record is gone)."""
        path = str(root)
        entry = self.entry(path)
        key = self.key(f"{path}/{REMOTE_MACHINE_JSON}")
        if key is None:
            if warn and _record_gone(Path(root)):  # (a sweep's shared folder is none)
                log.warning("skipping %s: %s", collapse_home(root),
                            _recordless_why(Path(root), cluster))
            return None
        who = self.who(path, entry)
        if not key or entry.get("key") != key or who is None:
            try:
                machine = RemoteMachine.from_job_dir(Path(root))
            except StackopsError as exc:
                if warn:
                    log.warning("skipping %s: %s", collapse_home(root), exc)
                return None
            who = _who_of(machine)
            self.keep(entry, key, dict(who))
        who.update(cluster=cluster, as_of=None, error=None, root=root)
        return who

    def keep(self, entry: dict[str, Any], key: list[int], who: dict[str, Any]) -> None:
        """Keep ``who`` for the record stamped ``key`` (read just now) in ``entry``."""
        entry.update(key=key, who=who)
        entry.pop("w", None)
        self.changed = True

    def who(self, root: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        """Who the job in ``root`` is, as ``entry`` keeps it (its id and folder: None for its
        folder's)."""
        who = entry.get("who")
        if who is None:
            index = entry.get("w")
            if type(index) is not int or not 0 <= index < len(self.whos) or \
                    self.whos[index] is None:
                return None
            who = dict(self.whos[index])
        elif not _is_who(who):  # another build's, or garbled
            return None
        else:
            who = dict(who)
        if who.get("job_id") is None:
            who["job_id"] = root.rsplit("/", 1)[-1]
        if who.get("there") is None:
            who["there"] = root
        return who

    def report(self, answer: dict[str, Any], root: Path | str) -> JobStatus:
        """report_from(answer); of a record the judge found as it was (the same object), made
        without checking its fields again once a JobStatus was made of it."""
        path = str(root)
        entry = self.new.get(path) or {}
        state = entry.get("state")
        if not isinstance(state, dict) or answer["state"] is not state or answer.get("tasks"):
            return report_from(answer)
        if not entry.get("checked"):
            report = report_from(answer)
            entry["checked"] = self.changed = True
            return report
        report = JobStatus.__new__(JobStatus)  # the fields a JobStatus was made of before
        name = path.rpartition("/")[2]  # (root.name)
        report.__dict__ = _status_fields(name, state, answer["tail"], answer["place"])
        return report

    def save(self, every: bool = True) -> None:
        """Write what was read: a listing of ``every`` job's rows are the cache from now on;
        a sweep's (not ``every``) are laid over the rows of the others, kept as they were."""
        self.close()
        rows = self.new if every else {**self.old, **self.new}
        if not (self.changed or rows.keys() != self.old.keys()) or not self.path.parent.is_dir():
            return
        whos: list[Any] = []
        places: dict[str, int] = {}
        texts: dict[str, str] = {}
        for root, entry in rows.items():
            who = self.who(root, entry) if isinstance(entry, dict) else None
            if who is None:
                continue
            name = root.rsplit("/", 1)[-1]
            who.update(job_id=None if who["job_id"] == name else who["job_id"],
                       there=None if who["there"] == root else who["there"])
            text = json.dumps(who, sort_keys=True)
            if text not in places:
                places[text] = len(whos)
                whos.append(who)
            rows[root] = {k: v for k, v in entry.items() if k != "who"}
            rows[root]["w"] = places[text]
            state = entry.get("state")
            if isinstance(state, dict):  # a key or a text that records share (a sweep's time
                # of submission, a status, the machine) is written once: marshal refers back to it
                rows[root]["state"] = {sys.intern(k): texts.setdefault(v, v)
                                       if type(v) is str else v for k, v in state.items()}
        with _suppress(OSError, ValueError):
            _write_plain(self.path, marshal.dumps({"version": _CACHE_VERSION, "whos": whos,
                                                   "rows": rows}))
            with _suppress(FileNotFoundError):  # the cache as JSON, before it was marshal
                os.unlink(f"{self.path}.json")


def _ask_hosts(remote: dict[str, list[dict[str, Any]]],
               timeout: float) -> dict[str, dict[str, Any]]:
    """Every host's jobs judged there, one round trip per host, all hosts at once, within
    ``timeout`` seconds: {host: {job_id: answer}} (``"*"``: the error that kept the host silent)."""
    import threading

    results: dict[str, dict[str, Any]] = {}  # one assignment per host: late threads change nothing

    def ask(host: str, rows: list[dict[str, Any]]) -> None:
        try:
            with SSH.from_config_file(host, timeout=timeout) as ssh:
                request = {"action": "status", "roots": [row["there"] for row in rows],
                           "tasks": [row.get("tasks") for row in rows]}
                answers = ssh.serve([request], timeout=timeout)[0]
            results[host] = {row["job_id"]: answer for row, answer in zip(rows, answers)}
        except Exception as exc:  # the host's rows stay as last seen, and say why
            results[host] = {"*": exc}

    threads = [threading.Thread(target=ask, args=item, daemon=True) for item in remote.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 1.0
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    silent = {"*": StackopsConnectionError(f"did not answer within {timeout:g}s")}
    return {host: dict(results.get(host, silent)) for host in remote}


# -- sweeps ------------------------------------------------------------------------------------

def load_sweep_grid(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The kwargs of a sweep's jobs from a JSON Lines file: one JSON object per line, the K-th for
    job ``<id>-K`` (blank lines skipped); a line that is no JSON object is refused by number."""
    source = os.fspath(path)
    grid = []
    for number, line in enumerate(_read_kwargs_file(source).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{source} line {number} is not JSON: {exc}",
                              hint='one JSON object of kwargs per line, e.g. {"lr": 0.1}') from None
        if not isinstance(value, dict):
            raise ConfigError(f"{source} line {number} must be a JSON object of kwargs, "
                              f"got {type(value).__name__}")
        grid.append(value)
    if not grid:
        raise ConfigError(f"{source} holds no line of kwargs: a sweep needs at least one")
    return grid


def _sweep_lines(common: dict[str, Any] | None, grid: Any) -> list[dict[str, Any]]:
    """Each job's kwargs: ``common`` updated with its line, checked as JSON data."""
    if isinstance(grid, (str, bytes, dict)) or not isinstance(grid, (list, tuple)) or not grid:
        raise ConfigError("a sweep needs a non-empty list of kwargs dicts, one per job",
                          hint="load_sweep_grid(path) reads them from a JSON Lines file")
    lines = []
    for number, line in enumerate(grid, 1):
        if not isinstance(line, dict):
            raise ConfigError(f"sweep line {number} must be a dict of kwargs, "
                              f"got {type(line).__name__}")
        try:
            lines.append(_check_kwargs({**(common or {}), **line}))
        except ConfigError as exc:
            raise ConfigError(f"sweep line {number}: {exc}") from None
    return lines


def sweep_job_ids(sweep_id: str, count: int) -> list[str]:
    """``<sweep_id>-0000`` ... : four digits, or as many as the count needs."""
    width = max(4, len(str(count - 1)))
    return [check_safe_name(f"{sweep_id}-{index:0{width}d}") for index in range(count)]


def _check_sweep_config(config: RemoteStackOpsConfig) -> None:
    launch = _option(f"launch_method {config.launch_method!r}", "--slurm")
    refused = [(config.launch_method != "remotely", launch),
               (config.transfer_method != "sftp", _option("transfer_method 'cloud'",
                                                          "--transfer cloud")),
               (config.interactive, _option("interactive jobs", "--interactive"))]
    for flag, what in refused:
        if flag:
            raise ConfigError(f"a sweep cannot run {what}",
                              hint="a sweep runs detached jobs here or on an SSH host")


class Sweep:
    """The jobs of one sweep, made by run_sweep: job K is ``<sweep id>-K`` (zero-padded) with the
    kwargs of line K. Each is a RemoteMachine; this object follows them all at once."""

    def __init__(self, sweep_id: str, jobs: list[RemoteMachine]) -> None:
        self.sweep_id = sweep_id
        self._jobs: list[RemoteMachine] | None = jobs  # None: Sweep.load's, made when asked for
        self._gone: dict[str, str] = {}  # members whose folder here is gone: why (Sweep.load)
        self._queued: Path | None = None  # a loaded sweep's: its members' folders are in it
        self._submitting: list[Any] | None = None  # its submitter, while it submits (Sweep.load)
        self._ids: list[str] = []

    job_id = property(lambda self: self.sweep_id)  # the CLI's verbs name it like a job

    @property
    def jobs(self) -> list[RemoteMachine]:
        self._make()
        return self._jobs or []

    @property
    def gone(self) -> dict[str, str]:
        self._make()
        return self._gone

    @gone.setter
    def gone(self, gone: dict[str, str]) -> None:
        self._gone = gone

    def _every_id(self) -> list[str]:
        """Every member's id, those gone too."""
        return self._ids if self._jobs is None else [*self.gone, *(j.job_id for j in self.jobs)]

    def _without(self, ended: dict[str, Any]) -> Sweep:
        """The sweep but for the members ``ended`` (a loaded one's members are not made: their
        status is read as list reads it, _RecordCache)."""
        if self._jobs is None:
            left = Sweep._load_from(self.sweep_id, self._queued, self._ids)
            left._ids = [job_id for job_id in self._ids if job_id not in ended]
            return left
        left = Sweep(self.sweep_id, [job for job in self.jobs if job.job_id not in ended])
        left.gone = self.gone
        return left

    def _make(self) -> None:
        """Make the members of a loaded sweep, their records read whole (once)."""
        if self._jobs is None and self._queued is not None:
            self._jobs, self._gone = _load_members(self._queued, self._ids, self.sweep_id)

    def __repr__(self) -> str:
        return f"Sweep({self.sweep_id!r}, {len(self.jobs)} jobs)"

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Any:
        return iter(self.jobs)

    def __getitem__(self, index: int) -> RemoteMachine:
        return self.jobs[index]

    @classmethod
    def load(cls, sweep_id: str, base_dir: str | None = None) -> Sweep:
        """The sweep ``sweep_id`` submitted earlier from this machine (a member whose folder is
        gone is in ``gone``: its status reads failed, saying so; one whose record alone is gone
        reads as its folder's state says, _recordless_reports). Its members' records are read
        when first asked for (``jobs``); the status of a sweep here reads none that it read before
        (_RecordCache)."""
        queued = expand_home(f"{base_dir or DEFAULT_BASE_DIR}/queued")
        try:
            record = _read_json(queued / check_safe_name(sweep_id) / SWEEP_JSON)
            ids = record["ids"]
        except (StackopsError, KeyError, TypeError) as exc:
            raise ConfigError(f"no sweep {sweep_id!r} under {collapse_home(queued.parent)}",
                              hint=f"{_prog()} list shows the jobs") from exc
        sweep = cls._load_from(sweep_id, queued, [str(job_id) for job_id in ids])
        sweep._submitting = record.get("submitting")
        return sweep

    @classmethod
    def _load_from(cls, sweep_id: str, queued: Path | None, ids: list[str]) -> Sweep:
        """A sweep of members ``ids`` in folder ``queued``, made when first asked for."""
        sweep = cls(sweep_id, [])
        sweep._jobs, sweep._queued, sweep._ids = None, queued, ids
        return sweep

    def close(self) -> None:
        if self._jobs:
            self._jobs[0].close()  # the one connection they share

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def check_job_status(self, timeout: float = 60.0) -> dict[str, JobStatus | StackopsError]:
        """Every job's status, judged where they run, all in one round trip (a member whose
        record names another place is asked there, as its own status is: _per_place)."""
        found = self._reports_here() if self._jobs is None else None
        if found is None:
            asked = _per_place(self.jobs, lambda place, jobs: dict(zip(
                [job.job_id for job in jobs], place.reports([_seen(job) for job in jobs], 0))),
                _last_read)
            found = (list(asked), list(asked.values()))
        answers: dict[str, JobStatus | StackopsError] = {
            job_id: JobStatus(job_id, "failed", error_message=why)
            for job_id, why in self._gone.items()}
        answers.update(_recordless_reports(_recordless_members(self, self._gone)))
        answers.update(zip(*found))
        if self._being_submitted():  # a member not written or not fired yet has not ended
            for job_id, report in answers.items():
                if job_id in self._gone or isinstance(report, JobStatus) and \
                        report.status == "prepared":
                    answers[job_id] = JobStatus(job_id, "queued", reason="being submitted")
        return dict(sorted(answers.items()))  # in the sweep's order (its ids are zero-padded)

    def _being_submitted(self) -> bool:
        """Whether the process submitting this sweep lives (on this machine: one elsewhere is
        not judged here)."""
        return _submitter({"submitting": self._submitting}) is not None

    def _reports_here(self) -> tuple[list[str], list[JobStatus]] | None:
        """The members' ids and statuses of a loaded sweep on this machine, read as ``list`` reads
        them (_RecordCache) and no member made; None for one elsewhere, or an odd record."""
        here = _members_here(self._queued, self._ids, self.sweep_id)
        if here is None:
            return None
        cache, found, self._gone = here
        members = _own_members(self.sweep_id, found, self._gone)
        if members is None:
            return None
        roots = [who["root"] for who in members]
        answers = _reports_of(roots, 0, [who["tasks"] for who in members], cache)
        reports = [cache.report(answer, root) for answer, root in zip(answers, roots)]
        cache.save(every=False)
        return [who["job_id"] for who in members], reports

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> dict[str, JobStatus]:
        """Block until every job ended (a failed one does not stop the others); their statuses.
        A job never started (its fire was broken off) ends the wait too: it never will start."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            answers = _within(timeout, deadline, self.check_job_status)
            ended = {key: value for key, value in answers.items()
                     if isinstance(value, JobStatus) and (value.finished or value.status ==
                                                          "prepared")}
            if len(ended) == len(answers):
                return ended
            if deadline is not None and time.monotonic() > deadline:
                raise StackopsError(f"sweep {self.sweep_id}: {len(answers) - len(ended)} of "
                                    f"{len(answers)} jobs not ended after {timeout}s")
            time.sleep(poll)

    def cancel(self, grace: float = 10.0) -> dict[str, JobStatus | StackopsError]:
        """Cancel every job that has not ended, in one round trip (per place: _per_place): each
        is marked first, so the queue starts none of them meanwhile. A member here whose record
        is gone is cancelled too, as ``cancel MEMBER`` cancels it (_cancel_recordless)."""
        answers = _per_place(self.jobs, lambda place, jobs: _cancel_at(place, jobs, grace))
        for root in _recordless_members(self, self.gone):
            try:
                answers[root.name] = _cancel_recordless(root, grace)
            except StackopsError as exc:
                answers[root.name] = exc
        return dict(sorted(answers.items()))


def _cancel_at(place: _Place, jobs: list[RemoteMachine], grace: float) -> dict[str, JobStatus]:
    """Cancel ``jobs``, all of ``place``, in one round trip: each is marked before any stops."""
    request = {"action": "cancel", "roots": [job.root_there for job in jobs], "grace": grace}
    answers: dict[str, JobStatus] = {}
    for job, state in zip(jobs, place.call([request])[0]):
        place.mirror(_seen(job), state)
        report = answers[job.job_id] = _status_of(job.job_id, state)
        report.reason = f"was {state.get('was')}"
    return answers


def _per_place(jobs: list[RemoteMachine],
               ask: Callable[[_Place, list[RemoteMachine]], dict[str, Any]],
               lost: Callable[[RemoteMachine, StackopsError], Any] | None = None,
               ) -> dict[str, Any]:
    """``ask(place, its jobs)`` of each place the jobs run at, one call each: {job id: answer}.
    A sweep's members share one place; a member whose record names another (edited by hand) is
    asked there, as ``status MEMBER`` asks it. A place that cannot be asked gives each of its
    jobs ``lost(job, error)`` (with no ``lost``: the error, unless the place is the only one:
    then the error is raised, as it was)."""
    groups: dict[int, list[RemoteMachine]] = {}
    for job in jobs:
        groups.setdefault(id(job.place), []).append(job)
    answers: dict[str, Any] = {}
    for group in groups.values():
        try:
            answers.update(ask(group[0].place, group))
        except StackopsError as exc:
            if len(groups) == 1 and lost is None:
                raise
            answers.update({job.job_id: lost(job, exc) if lost else exc for job in group})
    return answers


_NOT_ASKED = "its host could not be asked: "  # a report as last read there: its reason says so


class _Unasked(str):
    """The ``reason`` of a report that is its record as last read, its host not asked now: the
    text says so (_NOT_ASKED, then ``why``), and the value, not the text, marks it (_unasked).
    A str to everything else: JobStatus, its dict and its JSON are unchanged."""

    why = ""


def _not_asked(why: str) -> _Unasked:
    reason = _Unasked(f"{_NOT_ASKED}{why}")
    reason.why = why
    return reason


def _last_read(job: RemoteMachine, exc: StackopsError) -> JobStatus | StackopsError:
    """A member whose host could not be asked, as ``status MEMBER`` and ``list`` show it: its
    record as last read there, as of then, its ``reason`` saying why (_NOT_ASKED); an error of
    another kind (or a job here) stays the error."""
    if not job.is_remote or not isinstance(exc, StackopsConnectionError):
        return exc
    report = _as_last_read(job.job_id, job.file_manager.job_root)
    report.reason = _not_asked(str(exc))
    return report


def _unasked(report: Any) -> str | None:
    """Why a member's report is its last read one (_last_read: why its host could not be
    asked), or None for one read now."""
    if isinstance(report, JobStatus) and report.as_of and isinstance(report.reason, _Unasked):
        return report.reason.why
    return None


def _recordless_members(sweep: Sweep, gone: dict[str, str]) -> list[Path]:
    """The folders here of ``sweep``'s members whose record is gone (of those in ``gone``, by the
    one rule: _record_gone): job folders that link their code to the sweep's folder (a stranger
    under a member's id has a record: not one)."""
    queued = sweep._queued
    found: list[Path] = []
    if queued is None:
        return found
    for job_id in gone:
        with _suppress(ConfigError):
            root = queued / check_safe_name(job_id)
            if _record_gone(root) and _shared_of(root) == queued / sweep.sweep_id:
                found.append(root)
    return found


def _recordless_reports(roots: list[Path]) -> dict[str, JobStatus]:
    """Members whose record is gone (_recordless_members), each as its folder's own state record
    says, judged as any job here is (one whose process holds its lock runs), and its ``reason``
    saying that its record is missing: not failed for that (its record says where it runs and
    how it is read, its state how it is doing). One that runs on a host (its folder here holds
    the copy of its state last read there) or on another machine (as of when written there) and
    has not ended cannot be asked there: its record said where."""
    own = [root for root in roots if not read_state(root).get("mirrored")]
    judged = dict(zip(own, judge_jobs(own)))
    reports = {}
    for root in roots:
        report = reports[root.name] = _status_of(root.name, judged[root]) if root in judged \
            else _as_last_read(root.name, root)
        report.reason = f"{_record_missing(root)}: read from its folder"
        if report.as_of and not report.finished:
            report.reason = _not_asked(f"{_record_missing(root)}, and it says where it runs")
    return reports


def _not_member(sweep_id: str, job_id: str, named: Any) -> str:
    """Why the job under a member's id is not that member: its own record names another sweep,
    or none (the member's folder was removed and its id used again)."""
    names = f"sweep {named}" if named else "no sweep"
    return (f"the job {job_id} here is not a member of sweep {sweep_id} (its record names "
            f"{names}): the member's folder was removed (by hand?); how it ended is not known")


def _own_members(sweep_id: str, members: list[dict[str, Any]],
                 gone: dict[str, str]) -> list[dict[str, Any]] | None:
    """The members of a sweep here (as _members_here finds them) whose own record names the
    sweep; each other job under a member's id is one gone, saying why (into ``gone``). None when
    a member's record names a host: then each is read where its record says (Sweep.jobs)."""
    own = []
    for who in members:
        if who["sweep"] != sweep_id:
            gone[who["job_id"]] = _not_member(sweep_id, who["job_id"], who["sweep"])
        elif who["remote"]:
            return None
        else:
            own.append(who)
    return own


def _load_members(queued: Path, ids: list[str],
                  sweep_id: str) -> tuple[list[RemoteMachine], dict[str, str]]:
    """The members of a sweep (Sweep.jobs), made from their records, and why each one not found
    is gone (Sweep.gone): a job whose own record names no such sweep is no member. A member whose
    record is the first's but for the id is a copy; members of one place share it (one
    connection), and one whose record names another place is asked there."""
    jobs: list[RemoteMachine] = []
    plain: dict[str, Any] = {}
    first = b""  # the first member's record, as bytes
    places: dict[tuple[str, str | None], _Place] = {}
    strangers: dict[str, str] = {}
    for job_id in ids:
        raw = _read_bytes(f"{queued}/{job_id}/{REMOTE_MACHINE_JSON}")
        if raw is None:
            if os.path.lexists(queued / job_id / REMOTE_MACHINE_JSON):
                _read_json(queued / job_id / REMOTE_MACHINE_JSON)  # says why, naming it
            continue
        if jobs and raw == first.replace(jobs[0].job_id.encode(), job_id.encode()):
            jobs.append(_member_as_loaded(jobs[0], job_id))  # byte for byte the first's
            continue
        data = _read_json(queued / job_id / REMOTE_MACHINE_JSON)
        named = data.get("shared_folder") if isinstance(data, dict) else None
        if named != sweep_id:
            strangers[job_id] = _not_member(sweep_id, job_id, named)
            continue
        if jobs and _id_aside(data) == plain:  # the first's record but for the id
            jobs.append(_member_as_loaded(jobs[0], job_id))
            continue
        first = first or raw
        job = RemoteMachine.from_dict(data, job_root=queued / job_id)
        job.place = places.setdefault((type(job.place).__name__, job.config.ssh_host), job.place)
        jobs.append(job)
        plain = plain or _id_aside(data)
    loaded = {job.job_id for job in jobs}
    return jobs, {job_id: strangers.get(job_id) or _gone(queued / job_id, queued / sweep_id)
                  for job_id in ids if job_id not in loaded}


def _members_here(queued: Path | None, ids: list[str], sweep_id: str,
                  ) -> tuple[_RecordCache, list[dict[str, Any]], dict[str, str]] | None:
    """Who each member of a sweep on this machine is (its id, folder and tasks, as a list row
    has them), why each one not found is gone, and the record cache that read them. A record is
    read only when changed since the cache kept it; read, it is kept without a RemoteMachine
    made of it when its bytes are the first member's but for the id (_load_members' rule). None
    for a sweep that runs elsewhere, or a record that is odd (Sweep.jobs then says why)."""
    if queued is None:
        return None
    first_id = next((job_id for job_id in ids
                     if os.path.isfile(f"{queued}/{job_id}/{REMOTE_MACHINE_JSON}")), None)
    if first_id is None:
        return None
    raw = _read_bytes(f"{queued}/{first_id}/{REMOTE_MACHINE_JSON}") or b""
    try:
        first = RemoteMachine.from_dict(json.loads(raw), job_root=queued / first_id)
    except (StackopsError, ValueError, TypeError, KeyError, AttributeError):
        return None
    model = _who_of(first)
    if type(first.place) is not _Here or not model["there"].endswith(f"/{first_id}"):
        return None
    cache = _RecordCache(queued.parent)
    members: list[dict[str, Any]] = []
    gone: dict[str, str] = {}
    for job_id in ids:
        root = f"{queued}/{job_id}"
        key = cache.key(f"{root}/{REMOTE_MACHINE_JSON}")
        if key is None and not os.path.lexists(f"{root}/{REMOTE_MACHINE_JSON}"):
            gone[job_id] = _gone(Path(root), queued / sweep_id)
            continue
        entry = cache.entry(root)
        who = cache.who(root, entry) if key and entry.get("key") == key else None
        if who is None and key is not None and _read_bytes(f"{root}/{REMOTE_MACHINE_JSON}") \
                == raw.replace(first_id.encode(), job_id.encode()):
            who = dict(model, job_id=job_id, there=f"{model['there'][:-len(first_id)]}{job_id}")
            if key:
                cache.keep(entry, key, dict(who))
        who = who or cache.identity(Path(root), None, warn=False)
        if who is None:
            return None
        there = who["there"]  # where it is judged: its folder here (as text)
        who["root"] = root if there == root else expand_home(there)  # (text: _reports_of)
        members.append(who)
    return cache, members, gone


def _sweep_member(template: RemoteMachine, job_id: str, kwargs: dict[str, Any]) -> RemoteMachine:
    """Job ``job_id`` of a sweep: the template's function, config and connection, its kwargs.
    Copies, not constructions: they were checked once, and a sweep makes thousands."""
    job = _member_as_loaded(template, job_id)  # the template's state is new: so is the job's
    job.kwargs = kwargs
    job.scripts_generated = True
    return job


def _id_aside(data: Any) -> dict[str, Any]:
    """A member's record (remote_machine.json) with its id left out, to compare with others'."""
    if not isinstance(data, dict):
        return {"": data}
    aside = dict(data)
    for part in ("config", "file_manager"):
        if isinstance(aside.get(part), dict):
            aside[part] = dict(aside[part], job_id="")
    return aside


def _twin(thing: Any) -> Any:
    """A shallow copy of a plain object (copy.copy, without its generic protocol's cost)."""
    twin = object.__new__(type(thing))
    twin.__dict__.update(thing.__dict__)
    return twin


def _member_as_loaded(first: RemoteMachine, job_id: str) -> RemoteMachine:
    """A loaded sweep member whose record is ``first``'s but for its id (the rule in a sweep),
    made as a copy of ``first``: checked once, not 10,000 times. Its kwargs are read when asked."""
    job = _twin(first)
    job.config = _twin(first.config)
    job.config.job_id = job_id
    manager = job.file_manager = _twin(first.file_manager)
    manager.job_id = job_id
    manager.job_root_rh = f"{manager.job_root_rh.rsplit('/', 1)[0]}/{job_id}"
    manager.job_root = manager.job_root.parent / job_id
    job.data, job.task_ids, job.kwargs = list(first.data), list(first.task_ids), None
    return job


def run_sweep(func: Any, config: RemoteStackOpsConfig, grid: list[dict[str, Any]],
              func_kwargs: dict[str, Any] | None = None, data: list[str] | None = None,
              run: bool = True, progress: Callable[[int], None] | None = None) -> Sweep:
    """Run ``func`` once per line of ``grid`` (a list of kwargs dicts; load_sweep_grid reads a
    JSON Lines file), each line updating ``func_kwargs``: job K is ``<config.job_id>-K``.
    Everything is checked before anything is written or sent (each line's kwargs against the
    function, the ids against the jobs that exist). The jobs share one copy of stackops, the
    wrapper and the code snapshot (the folder ``<config.job_id>`` beside theirs); to a host they
    travel as one stream. A failed job does not stop the others. ``run=False`` prepares
    everything and starts nothing (``start ID-K`` starts a job). ``func`` may be a command (a
    list of strings) whose ``{name}`` placeholders each line fills (fill_command)."""
    _check_sweep_config(config)
    lines = _sweep_lines(func_kwargs, grid)
    command = isinstance(func, (list, tuple))  # each job's line fills the command's {name}s
    if command:
        if func_kwargs:
            raise ConfigError("a sweep of commands takes no func_kwargs: its lines fill the "
                              "command's {name} placeholders")
        check_command_sweep(_check_command(func), lines)
    template = RemoteMachine(func, config, func_kwargs=None if command else lines[0], data=data)
    parameters = _parameters(func, template.job_params)
    workload = config.workload_params is not None
    for number, kwargs in enumerate(lines, 1):
        try:
            _check_call(parameters, kwargs, workload, f"{template.job_params.func_name}()")
        except ConfigError as exc:
            raise ConfigError(f"sweep line {number}: {exc}", hint=exc.hint) from None
    ids = sweep_job_ids(config.job_id, len(lines))
    queued = template.file_manager.job_root.parent
    taken = [name for name in [config.job_id, *ids] if os.path.lexists(queued / name)]
    if taken:
        raise ConfigError(f"sweep {config.job_id!r} would reuse the id of {', '.join(taken[:3])}"
                          + (f" and {len(taken) - 3} more" if len(taken) > 3 else ""),
                          hint=f"choose another {_option('job_id', '--job-id')}")
    template.preflight()
    jobs = [_sweep_member(template, job_id, kwargs) for job_id, kwargs in zip(ids, lines)]
    _put_sweep_in_place(template, jobs, run, progress)
    log.info("sweep %s: %d jobs %s on %s", config.job_id, len(jobs),
             "fired" if run else "ready", template.host_name)
    return Sweep(config.job_id, jobs)


def _put_sweep_in_place(template: RemoteMachine, jobs: list[RemoteMachine], run: bool,
                        progress: Callable[[int], None] | None) -> None:
    """The shared folder and every job's folder here (each with its record), then to the host
    with the jobs' own files in one stream, fired there in the same round trip (or fired here).
    A sweep refused or broken off before its fire leaves nothing behind; one broken off during
    its fire leaves each job either started or withdrawn (see fire_jobs)."""
    queued = template.file_manager.job_root.parent
    made = [template.job_id]
    try:
        _put_folder_in_place(template, "sweep", lambda staging: _sweep_shared(template, staging,
                                                                              jobs))
        made += [job.job_id for job in jobs]
        _write_members(template, jobs, per_job_config=False)
        for job in jobs:
            job.snapshot = template.snapshot
        if template.is_remote:
            spec = _handing(template, False, None)
            spec.fire = [job.root_there for job in jobs] if run else []
            template.handed = _hand_over(template.ssh, spec, progress)
            fired = template.handed.fired
        else:
            fired = fire_jobs([job.file_manager.job_root for job in jobs]) if run else {}
    except BaseException:
        kept = not template.is_remote and _withdraw_fire([queued / name for name in made[1:]])
        if kept:
            _sweep_submitted(queued / template.job_id)
        for name in [] if kept else made:  # a fire with no job started leaves nothing
            path = queued / name
            if path.is_dir() and not path.is_symlink() and (not template.is_remote or read_state(
                    path).get("status") in (None, "prepared")):
                shutil.rmtree(path, ignore_errors=True)
        raise
    with _Uninterrupted():  # fired: its jobs run, and their records say so before Ctrl-C is taken
        for job in jobs:
            job.submitted, job.shared = True, bool(template.handed and template.handed.shared)
            job.launcher_pid = fired.get("pid") if run else None
            _write_plain(job.file_manager.path(REMOTE_MACHINE_JSON), json.dumps(job.to_dict()))
        _sweep_submitted(queued / template.job_id)
    if fired.get("warning"):
        log.warning("sweep %s on %s: %s", template.job_id, template.host_name, fired["warning"])


def _sweep_shared(template: RemoteMachine, staging: Path, jobs: list[RemoteMachine]) -> None:
    """The sweep's shared folder holds what every job of it runs, none of one job's own files."""
    for relative in (REMOTE_MACHINE_JSON, FILE_MANAGER_JSON, KWARGS_JSON, STATE_JSON):
        os.unlink(staging / relative)
    _write_new_json(staging / SWEEP_JSON, {"sweep_id": template.job_id,
                                           "ids": [job.job_id for job in jobs],
                                           "host": template.host_name, "submitting": [
                                               machine_key(), os.getpid(), process_start_ticks(),
                                               os.path.expanduser("~")]})


def _sweep_submitted(shared: Path) -> None:
    """The sweep's submission is over: from now on a member without a folder is gone."""
    with _suppress(OSError, StackopsError):
        _change_sweep(shared, lambda record: record.pop("submitting", None))


# ============================================================================================
# 15. cluster: one workload split over several hosts by their CPU and RAM
# ============================================================================================

class LoadCriterion(enum.Enum):
    """What a host's share follows: its CPUs, its RAM, or their product; ``*_norm`` is the same as a
    share of the cluster's total (the shares sum to 1)."""

    cpu = "cpu"
    ram = "ram"
    product = "product"
    cpu_norm = "cpu_norm"
    ram_norm = "ram_norm"
    product_norm = "product_norm"

    @property
    def normalised(self) -> LoadCriterion:
        return self if self.name.endswith("_norm") else LoadCriterion[self.name + "_norm"]


@_model
class MachineSpecs:
    """A host's CPUs and RAM (GiB), their product, and each as a share of the cluster's total."""

    cpu: float
    ram: float
    product: float = 0.0
    cpu_norm: float = 0.0
    ram_norm: float = 0.0
    product_norm: float = 0.0

    def __post_init__(self) -> None:
        self.product = self.cpu * self.ram

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> MachineSpecs:
        """From ``SSH.remote_specs`` (or the same facts read here)."""
        return cls(cpu=float(facts.get("cpu_count") or 1),
                   ram=float(facts.get("memory_bytes") or 0) / 2**30)

    @classmethod
    def from_local(cls) -> MachineSpecs:
        return cls.from_facts(_local_specs())

    def value(self, criterion: LoadCriterion) -> float:
        return float(getattr(self, criterion.value))

    @staticmethod
    def normalise(specs: list[MachineSpecs]) -> list[MachineSpecs]:
        """Set each host's ``*_norm`` fields to its share of the total (0 for a total of 0)."""
        for name in ("cpu", "ram", "product"):
            total = sum(getattr(spec, name) for spec in specs)
            for spec in specs:
                setattr(spec, name + "_norm", getattr(spec, name) / total if total else 0.0)
        return specs


@_model
class ThreadLoadCalculator:
    """How many parallel parts a host runs: ``num_jobs`` (None: 1) on a host like the reference,
    scaled by the criterion (half the reference's CPUs: half the parts), at least 1."""

    num_jobs: int | None = None
    load_criterion: LoadCriterion = LoadCriterion.cpu
    reference_specs: MachineSpecs | None = None  # None: this machine (largest host for *_norm)

    def get_num_threads(self, machine: MachineSpecs, reference: MachineSpecs | None = None) -> int:
        reference = self.reference_specs or reference
        if self.num_jobs is None or reference is None or reference.value(self.load_criterion) <= 0:
            return 1
        share = machine.value(self.load_criterion) / reference.value(self.load_criterion)
        return max(1, int(self.num_jobs * share))

    @classmethod
    def default(cls) -> ThreadLoadCalculator:
        return cls(None, LoadCriterion.cpu, None)

    def to_dict(self) -> dict[str, Any]:
        return {"num_jobs": self.num_jobs, "load_criterion": self.load_criterion.name,
                "reference_specs": (dataclasses.asdict(self.reference_specs)
                                    if self.reference_specs else None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThreadLoadCalculator:
        ref = data.get("reference_specs")
        return cls(data.get("num_jobs"), LoadCriterion[data.get("load_criterion", "cpu")],
                   MachineSpecs(**{k: ref[k] for k in ("cpu", "ram")}) if ref else None)


@_model
class MachineLoadCalculator:
    """Cuts ``[0, max_num)`` into one contiguous slice per host, sized by its share of the
    criterion; the last host ends at ``max_num``, so the slices cover the range exactly once."""

    max_num: int = 1000
    load_criterion: LoadCriterion = LoadCriterion.cpu_norm

    def get_workload_params(self, specs: list[MachineSpecs],
                            threads: list[int]) -> list[WorkloadParams]:
        if len(specs) != len(threads) or not specs:
            raise ConfigError("get_workload_params needs one thread count per host, and at least "
                              "one host")
        criterion = self.load_criterion.normalised
        result, start = [], 0
        for i, (spec, jobs) in enumerate(zip(specs, threads)):
            end = min(self.max_num, start + int(spec.value(criterion) * self.max_num))
            if i == len(specs) - 1:
                end = self.max_num
            result.append(WorkloadParams(idx_min=0, idx_max=self.max_num, idx_start=start,
                                         idx_end=end, idx=i, jobs=max(1, jobs)))
            start = end
        return result


class Cluster:
    """The same callable split over several hosts: each gets a slice of the index range in
    proportion to its CPU/RAM, all launched together, watched together, gathered together."""

    def __init__(self, func: Any, ssh_hosts: list[str], config: RemoteStackOpsConfig | None = None,
                 func_kwargs: dict[str, Any] | None = None,
                 thread_load_calc: ThreadLoadCalculator | None = None,
                 ditch_unavailable: bool = True, description: str = "", job_id: str | None = None,
                 base_dir: str | None = None, max_num: int = 1000) -> None:
        if not ssh_hosts or len(set(ssh_hosts)) != len(ssh_hosts):
            raise ConfigError(f"{_option('Cluster', 'cluster run --hosts')} needs at least one "
                              "host, each named once")
        for host in ssh_hosts:
            parse_ssh_target(host)
        self.func = func
        self.job_params: JobParams | None = _job_params_for(func)[0]
        if self.job_params is not None and self.job_params.kind == "script":
            raise ConfigError("a Cluster splits a function's workload; a script cannot be split",
                              hint="pass a function that takes workload_params")
        self.ssh_hosts = list(ssh_hosts)
        self.config = config or RemoteStackOpsConfig()
        self.func_kwargs = _check_kwargs(func_kwargs)
        if "workload_params" in self.func_kwargs:
            raise ConfigError("the Cluster sets workload_params itself; remove it from "
                              + _option("func_kwargs", "--kwargs"))
        if self.job_params is not None:
            _check_call(_parameters(func, self.job_params), self.func_kwargs, True,
                        f"{self.job_params.func_name}()")
        self.thread_load_calc = thread_load_calc or ThreadLoadCalculator.default()
        criterion = self.thread_load_calc.load_criterion.normalised
        self.machine_load_calc = MachineLoadCalculator(max_num, criterion)
        self.ditch_unavailable = ditch_unavailable
        self.description = description
        self.job_id = check_safe_name(job_id or _random_job_id())
        self.base_dir = collapse_home(base_dir or DEFAULT_BASE_DIR.rsplit("/", 1)[0])
        self.root_dir = expand_home(f"{self.base_dir}/job_id__{self.job_id}")
        self.unavailable: dict[str, str] = {}
        self.specs: dict[str, MachineSpecs] = {}
        self.workloads: dict[str, WorkloadParams] = {}
        self.machines: dict[str, RemoteMachine] = {}
        self._ssh: dict[str, SSH] = {}

    def __repr__(self) -> str:
        lines = [f"Cluster {self.job_id}:"] + [f"  {host}: {wp.idx_start}..{wp.idx_end} x{wp.jobs}"
                                                for host, wp in self.workloads.items()]
        return "\n".join(lines)

    def probe_specs(self, host: str, ssh: SSH) -> MachineSpecs:
        """A host's CPUs and RAM (one round trip, standard library on the host). Override it to
        pretend hosts differ (the tests do, since loopback hosts share one machine)."""
        return MachineSpecs.from_facts(ssh.remote_specs)

    # -- launching -------------------------------------------------------------------------------

    def _parallel(self, action: Callable[[str], Any], hosts: list[str]) -> dict[str, Any]:
        """Run ``action(host)`` for every host at once; a failure is returned, not raised."""
        from concurrent.futures import ThreadPoolExecutor

        by = _LOOKS.by  # (a thread's own: wait's bound holds in each host's thread too)

        def guarded(host: str) -> Any:
            _LOOKS.by = by
            try:
                return action(host)
            except StackopsError as exc:
                return exc
            except Exception as exc:  # a host's failure is evidence for its row, not a crash of all
                return StackopsError(f"{type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
            return dict(zip(hosts, pool.map(guarded, hosts)))

    def connect(self) -> Cluster:
        """Connect to and probe every host in parallel. An unreachable host is left out (and said
        so) with ``ditch_unavailable``; else nothing is launched anywhere and an error names it."""
        def open_and_probe(host: str) -> tuple[SSH, MachineSpecs]:
            ssh = SSH.from_config_file(host, accept_new_host_key=self.config.accept_new_host_key,
                                       timeout=self.config.ssh_timeout)
            return ssh, self.probe_specs(host, ssh)

        results = self._parallel(open_and_probe, [h for h in self.ssh_hosts if h not in self._ssh])
        failed = {host: str(r) for host, r in results.items() if isinstance(r, Exception)}
        for host, result in results.items():
            if not isinstance(result, Exception):
                self._ssh[host], self.specs[host] = result
        if failed and not self.ditch_unavailable:
            self.close()
            raise self._unreachable(results, "cannot reach " + "; ".join(
                f"{h}: {e}" for h, e in failed.items()), "fix them, or " + _option(
                    "pass ditch_unavailable=True", "leave out --strict") + " to go on without them")
        for host, error in failed.items():
            log.warning("leaving %s out of cluster %s: %s", host, self.job_id, error)
        self.unavailable.update(failed)
        if not self._ssh:
            raise self._unreachable(results, f"no host of cluster {self.job_id} is reachable")
        return self

    @staticmethod
    def _unreachable(results: dict[str, Any], message: str, hint: str = "") -> StackopsError:
        """The error of hosts that could not be reached; with the accept-new hint when some were
        refused for an unknown host key, and as bad input when that is all that was wrong."""
        errors = [r for r in results.values() if isinstance(r, Exception)]
        unknown = [e for e in errors if isinstance(e, HostKeyError) and e.unknown_key]
        hints = [hint] if hint else []
        if unknown:
            hints.insert(0, f"unknown host keys: {unknown[0].hint}")
        if unknown and len(unknown) == len(errors):
            return HostKeyError(message, "; ".join(hints), unknown_key=True)
        return StackopsConnectionError(message, hint="; ".join(hints) or None)

    def generate_standard_kwargs(self) -> dict[str, WorkloadParams]:
        """Each reachable host's slice of ``[0, max_num)`` and its thread count."""
        hosts = [h for h in self.ssh_hosts if h in self._ssh]
        specs = MachineSpecs.normalise([self.specs[h] for h in hosts])
        criterion = self.thread_load_calc.load_criterion
        reference = max(specs,
                        key=lambda s: s.value(criterion)) if criterion.name.endswith("_norm") \
            else MachineSpecs.from_local()
        threads = [self.thread_load_calc.get_num_threads(spec, reference) for spec in specs]
        workloads = self.machine_load_calc.get_workload_params(specs, threads)
        self.workloads = dict(zip(hosts, workloads))
        return self.workloads

    def _machine_config(self, index: int, host: str) -> RemoteStackOpsConfig:
        """A part's config: the cluster's, with what the user config file says for its host."""
        return self.config._for_host(host, job_id=f"{self.job_id}_{index}",
                                     base_dir=collapse_home(self.root_dir),
                                     description=self.description or self.config.description,
                                     workload_params=self.workloads[host].to_dict())

    def submit(self) -> Cluster:
        """One RemoteMachine per host, generated here and submitted to all hosts in parallel."""
        return self._submit()

    def _submit(self, launch: bool = False) -> Cluster:
        """submit(); with ``launch`` (what run() does) each host also starts its job in the same
        round trip, once every host has its job in place, and not at all if one failed; fire()
        must follow."""
        if not self.workloads:
            raise StackopsError("no workloads yet",
                                hint="call connect() and generate_standard_kwargs() first")
        _mkdir_private(self.root_dir)
        for index, host in enumerate(self.ssh_hosts):
            if host in self.workloads and host not in self.machines:
                machine = RemoteMachine(self.func, self._machine_config(index, host),
                                        self.func_kwargs)
                machine.place.connection = self._ssh[host]
                self.machines[host] = machine
        gated = launch and self.config.transfer_method != "cloud"  # cloud: fetched when fired
        together = _Together(len(self.machines)) if gated else None

        def hand_over(host: str) -> RemoteMachine:
            gate = together.arrive if together else None
            try:  # submit() generates each folder first, in parallel: its writes wait on the disk
                return _submit_job(self.machines[host], launch=launch, gate=gate)
            except BaseException:
                if together is not None:
                    together.fail()
                raise

        self._raise_failures("submit", self._parallel(hand_over, list(self.machines)))
        self._save()
        return self

    def fire(self, run: bool = True) -> dict[str, tuple[int | None, str]]:
        """Start every host's job at once (detached); returns each (wrapper's pid, command)."""
        results = self._parallel(lambda h: self.machines[h].fire(run), list(self.machines))
        self._save()
        self._raise_failures("fire", results)
        return results

    def _raise_failures(self, what: str, results: dict[str, Any]) -> None:
        failed = {host: r for host, r in results.items() if isinstance(r, Exception)}
        if failed:
            raise StackopsError(f"{what} failed on "
                                + "; ".join(f"{h}: {e}" for h, e in failed.items()))

    def run(self, run: bool = True) -> Cluster:
        """connect, generate_standard_kwargs, submit, fire: the whole launch."""
        self.connect()
        self.generate_standard_kwargs()
        self._submit(launch=run)
        self.fire(run)
        return self

    # -- following -------------------------------------------------------------------------------

    def check_job_status(self) -> dict[str, JobStatus | StackopsError]:
        """Every host's JobStatus, read in parallel; an unreachable host gets its error instead."""
        return self._parallel(lambda h: self.machines[h].get_status(0), list(self.machines))

    def rerun_failed(self, fresh: bool = False) -> dict[str, str]:
        """Run again, on the same host with the same slice, every part that failed or was
        cancelled, each with its own snapshot (``fresh``: the code as it is now); the cluster
        follows the new parts from then on. Returns {host: new job id}."""
        ended = {host: r for host, r in self.check_job_status().items() if isinstance(r, JobStatus)}
        failed = [host for host, report in ended.items()
                  if report.status in ("failed", "cancelled")]
        if not failed:
            raise ConfigError(f"cluster {self.job_id} has no failed part to rerun")
        results = self._parallel(lambda h: self.machines[h].rerun(fresh=fresh), failed)
        self._raise_failures("rerun", results)
        self.machines.update(results)
        self._save()
        return {host: machine.job_id for host, machine in results.items()}

    def cancel(self, grace: float = 10.0) -> dict[str, JobStatus | StackopsError]:
        """Cancel every host's part at once; an unreachable host gets its error instead."""
        return self._parallel(lambda h: self.machines[h].cancel(grace), list(self.machines))

    def download_results(self, target: str | os.PathLike[str] | None = None) -> Path:
        """Every completed host's results into one local folder, one sub-folder per host."""
        folder = expand_home(target) if target is not None else self.root_dir / "results"
        _mkdir_private(folder)
        results = self._parallel(lambda h: self.machines[h].download_results(
            folder / _host_folder(h), overwrite=True), list(self.machines))
        self._save()
        self._raise_failures("download", results)
        return folder

    def close(self) -> None:
        for ssh in self._ssh.values():
            ssh.close()
        self._ssh.clear()
        for machine in self.machines.values():
            machine.place.connection = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- persistence -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "base_dir": self.base_dir, "description": self.description,
                "ssh_hosts": self.ssh_hosts, "func_kwargs": self.func_kwargs,
                "config": self.config.to_dict(),
                "unavailable": self.unavailable, "ditch_unavailable": self.ditch_unavailable,
                "specs": {h: dataclasses.asdict(s) for h, s in self.specs.items()},
                "workloads": {h: w.to_dict() for h, w in self.workloads.items()},
                "machines": {h: collapse_home(m.file_manager.job_root) for h,
                             m in self.machines.items()},
                "thread_load_calc": self.thread_load_calc.to_dict(),
                "machine_load_calc": {"max_num": self.machine_load_calc.max_num,
                                      "load_criterion": self.machine_load_calc.load_criterion.name}}

    def _save(self) -> None:
        _atomic_write_json(self.root_dir / "cluster.json", self.to_dict())

    @classmethod
    def load(cls, job_id: str, base_dir: str | None = None) -> Cluster:
        """A cluster launched earlier (by any process), ready for status and download."""
        base = base_dir or DEFAULT_BASE_DIR.rsplit('/', 1)[0]
        root = expand_home(f"{base}/job_id__{check_safe_name(job_id)}")
        data = _read_json(root / "cluster.json")
        cluster = cls.__new__(cls)
        cluster.func = cluster.job_params = None
        cluster.root_dir = root
        try:
            for key in ("job_id", "base_dir", "description", "func_kwargs", "ditch_unavailable"):
                setattr(cluster, key, data[key])
            cluster.ssh_hosts = list(data["ssh_hosts"])
            cluster.config = RemoteStackOpsConfig.from_dict(data["config"])
            cluster.unavailable = dict(data["unavailable"])
            cluster.specs = {h: MachineSpecs(cpu=s["cpu"], ram=s["ram"]) for h,
                             s in data["specs"].items()}
            cluster.workloads = {h: WorkloadParams.from_dict(w) for h,
                                 w in data["workloads"].items()}
            cluster.machines = {h: RemoteMachine.from_job_dir(p) for h,
                                p in data["machines"].items()}
            cluster.thread_load_calc = ThreadLoadCalculator.from_dict(data["thread_load_calc"])
            calc = data["machine_load_calc"]
            cluster.machine_load_calc = MachineLoadCalculator(calc["max_num"],
                                                              LoadCriterion[calc["load_criterion"]])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{root / 'cluster.json'} is incomplete: {exc}") from exc
        cluster._ssh = {}
        return cluster


def _host_folder(host: str) -> str:
    """A folder name for a host: its alias with anything unsafe replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", host).lstrip(".-") or "host"


# ============================================================================================
# 16. cloud worker: claims and runs work units from a cloud queue
# ============================================================================================

CLOUD_UNITS_DIR = "cloud_units"  # under the worker's base dir: one folder per unit it runs
CLOUD_BACKOFF_MAX = 60.0  # seconds at most between two looks at a queue that cannot be listed


class _ClaimKeeper:
    """Refreshes a claim in the background for the whole time a unit is held (its download, its
    run, its upload). ``lost`` is set once another claim wins, or once the claim could not be
    refreshed for a whole lease: from then on the unit is not ours and nothing of it is uploaded."""

    def __init__(self, queue: CloudQueue, unit_id: str, claim: str, worker: str) -> None:
        import threading

        self.queue, self.unit_id, self.claim, self.worker = queue, unit_id, claim, worker
        self.lost, self._stop = threading.Event(), threading.Event()
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"claim-{unit_id}", daemon=True)

    def __enter__(self) -> _ClaimKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(self.queue.lease / 4):
            began = time.monotonic()
            try:
                self.queue.heartbeat(self.unit_id, self.claim, self.worker)
                refreshed = began
                ours, cancelled = self.queue.look(self.unit_id, self.claim)
                if cancelled:
                    self.cancelled.set()
                if not ours:
                    log.warning("unit %s was claimed by another worker; it will not be uploaded",
                                self.unit_id)
                    self.lost.set()
                    return
            except StackopsError as exc:
                log.warning("could not refresh the claim on unit %s: %s", self.unit_id, exc)
                if time.monotonic() - refreshed > self.queue.lease:
                    self.lost.set()
                    return

    def held(self) -> bool:
        """Still ours: never lost, and the earliest live claim in a fresh listing."""
        return not self.lost.is_set() and self.queue.still_ours(self.unit_id, self.claim)


def _unit_member_ok(info: Any, data: list[str]) -> bool:
    """A member that may be unpacked: under job/ or home/<data path>, a link within it."""
    name = posixpath.normpath(info.name)
    if info.name.startswith("/") or name.startswith(".."):
        return False
    if not (info.isfile() or info.isdir() or info.issym()):
        return False
    places = ["job"] + [f"home/{item}" for item in data]
    top = next((place for place in places if name == place or name.startswith(place + "/")), None)
    if top is None:
        return False
    if info.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
        return not info.linkname.startswith("/") and (target == top or target.startswith(top + "/"))
    return True


class _UnitRefused(TransferError):
    """A unit whose archive is refused: it ends failed rather than be tried again and again."""


def _unpack_unit(archive: Path, staging: Path) -> list[str]:
    """Unpack a unit's archive into a new private folder ``staging``, refusing the whole archive
    if a member is outside the unit's places; never chowns. Returns its data paths (from home)."""
    import tarfile

    staging.mkdir(mode=0o700)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            record = "job/" + REMOTE_MACHINE_JSON
            job = tar.extractfile(record) if record in tar.getnames() else None
            recorded = json.loads(job.read()) if job is not None else {}
            data = [_home_relative(expand_home(d))[2:] for d in recorded.get("data", [])]
            bad = [m.name for m in members if not _unit_member_ok(m, data)]
            if job is None or bad:
                what = ", ".join(bad[:3]) or "no job folder"
                raise _UnitRefused(f"unit archive {archive.name} holds {what}, outside the unit's "
                                    "job folder and data: nothing was unpacked",
                                    hint="a unit packed by an older stackops? submit it again")
            tar.chown = lambda *args, **kwargs: None  # type: ignore[method-assign]  # never chown
            extra: dict[str, Any] = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
            tar.extractall(str(staging), members=members, **extra)
    except (tarfile.TarError, ValueError, AttributeError, TypeError) as exc:  # not a unit's archive
        raise _UnitRefused(f"cannot unpack unit archive {archive.name}: {exc}") from exc
    except OSError as exc:
        raise TransferError(f"cannot unpack unit archive {archive.name}: {exc}") from exc
    return data


def _place_unit(staging: Path, root: Path, data: list[str], unit_id: str = "") -> None:
    """Move an unpacked unit into ``root`` and its data to their home-relative places, unless
    this machine sees the submitter's files (a worker, ``unit_id``, on the submitting machine):
    then nothing of yours is written over."""
    os.rename(staging / "job", root)
    manager = _read_json(root / FILE_MANAGER_JSON)
    mine = expand_home(manager.get("base_dir") or DEFAULT_BASE_DIR) / "queued" / unit_id
    with _suppress(OSError):
        if unit_id and (mine / FILE_MANAGER_JSON).read_bytes() == \
                (root / FILE_MANAGER_JSON).read_bytes():
            return  # the submitter's own folder is here: so are its data
    _place_data(staging, data)


def _fetch_archive(source: str, root: Path, sha256: str | None = None, unit_id: str = "") -> None:
    """The archive of a job (or of a worker's ``unit_id``) at ``source``, fetched with this
    machine's rclone (checked against the ``sha256`` recorded at upload, unless None: a unit,
    and kept in its logs), unpacked as a unit is (nothing outside the job folder and its data),
    put in place at ``root`` (_place_unit)."""
    staging = Path(_make_temp_dir(_trusted_dir(root.parent, "base folder")))
    try:
        _rclone("copyto", source, str(staging / "job.tar"), what=f"fetch of {source}")
        digest = _sha256_file(staging / "job.tar")
        if sha256 is not None and digest != sha256:
            raise TransferError(f"the archive {source} is not the one uploaded (its sha256 is "
                                f"{digest}, expected {sha256}): another writer of the bucket "
                                "replaced it; nothing was unpacked")
        data = _unpack_unit(staging / "job.tar", staging / "x")
        if sha256 is not None:
            _write_plain(staging / "x" / "job" / LOGS / "archive_sha256.txt", digest)
        _place_unit(staging / "x", root, data, unit_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _place_data(staging: Path, data: list[str]) -> None:
    """An unpacked archive's data (``home/<path>``) to their home-relative places, file by file."""
    for item in data:
        source = staging / "home" / item
        files = [source]
        if source.is_dir():
            files = sorted(p for p in source.rglob("*") if not p.is_dir())
        for path in files:
            target = Path.home() / item / path.relative_to(source)  # a file's relative path is "."
            _mkdir_private(target.parent)
            os.replace(path, target)


def _units_folder(base_dir: str | None) -> Path:
    return expand_home(f"{base_dir or DEFAULT_BASE_DIR}/{CLOUD_UNITS_DIR}")


def _fetch_unit(queue: CloudQueue, unit_id: str, base_dir: str | None = None,
                attempt: str = "") -> Path:
    """Download a claimed unit and unpack it into ``<unit id>.<attempt>`` under this worker's
    base dir (never a path a record names): a fresh folder per attempt, so no attempt's files or
    end pass for another's; one already there is an error, never replaced."""
    units = _units_folder(base_dir)
    _mkdir_private(units)
    name = check_safe_name(unit_id, "unit id") + (f".{attempt}" if attempt else "")
    root = units / name
    if os.path.lexists(root):
        raise TransferError(f"unit {unit_id}: its attempt's folder {collapse_home(root)} exists")
    _fetch_archive(f"{queue.base}/{unit_id}/unit.tar", root, unit_id=unit_id)
    return root


def _earlier_run(units: Path, unit_id: str) -> Path | None:
    """An earlier attempt of ``unit_id`` whose job still runs here (its worker was killed and
    started again), to adopt, or None. Earlier attempts (``<unit>.<attempt>``, or ``<unit>``)
    that provably ended are removed; one that never started is marked cancelled first (its
    queue entry is then dropped), and removed by a later look."""
    prefix = check_safe_name(unit_id, "unit id") + "."
    names = [name for name in os.listdir(units)
             if name.startswith(prefix) and name[len(prefix):].isdigit()]
    live = None
    for folder in [units / name for name in sorted(names, reverse=True)] + [units / unit_id]:
        if not (folder / FILE_MANAGER_JSON).is_file():
            continue
        if _alive(folder):
            live = live or folder
            continue
        state = read_state(folder)
        if state.get("cancel") or state.get("status") in TERMINAL_STATUSES:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        _record(folder, cancel="a later attempt of its unit replaced it")
        if _alive(folder):  # it started meanwhile: it runs despite the mark
            live = live or folder
    return live


def _start_unit(queue: CloudQueue, unit_id: str, claim: str,
                base_dir: str | None) -> tuple[RemoteMachine, bool]:
    """The claimed unit's job, started here or adopted (see _earlier_run), and whether adopted."""
    units = _units_folder(base_dir)
    root = _earlier_run(units, unit_id) if units.is_dir() else None
    adopted = root is not None
    if root is not None:
        log.warning("unit %s still runs here in %s (an earlier attempt): following it", unit_id,
                    collapse_home(root))
    else:
        root = _fetch_unit(queue, unit_id, base_dir, claim.split("-", 1)[0])
    machine = RemoteMachine.from_job_dir(root)
    machine.file_manager.job_root_rh = collapse_home(root)
    if not adopted:
        machine.launcher_pid = None
        machine.fire()
    return machine, adopted


def _run_unit(queue: CloudQueue, unit_id: str, claim: str, worker: str,
              base_dir: str | None = None) -> str:
    """Run a claimed unit here with this machine's slots (or follow an earlier attempt's run),
    then upload its results and status, while a heartbeat refreshes the claim; a unit whose
    claim was lost is not uploaded. Returns the unit's status (or ``lost``)."""
    with _ClaimKeeper(queue, unit_id, claim, worker) as keeper:
        try:
            machine, adopted = _start_unit(queue, unit_id, claim, base_dir)
        except _UnitRefused as exc:  # a unit refused here ends failed, not retried forever
            status: dict[str, Any] = {"unit": unit_id, "status": "failed", "worker": worker,
                                      "host": os.uname().nodename, "error": str(exc)}
            if keeper.held():
                queue.finish(unit_id, None, status)
            raise
        started = time.time()
        while not (report := machine.get_status(0)).finished:
            if keeper.cancelled.is_set():
                log.info("unit %s was cancelled: stopping it", unit_id)  # here, where it runs
                stopped = cancel_job(machine.file_manager.job_root, 10.0)  # (not the queue's)
                report = _status_of(machine.job_id, stopped)
                break
            time.sleep(0.2)
        if not keeper.held():
            log.warning("unit %s was claimed by another worker meanwhile; not uploading its "
                        "results", unit_id)
            return "lost"
        status = {"unit": unit_id, "status": report.status, "worker": worker,
                  "host": os.uname().nodename, "start_time": report.start_time,
                  "end_time": report.end_time, "duration_seconds": round(time.time() - started, 3),
                  "error": _tail(report.error_message, 20), "adopted": adopted}
        results = (expand_home(report.results_path)
                   if report.results_path and report.status != "cancelled" else None)
        if not queue.finish(unit_id, results, status, keeper.held):
            log.warning("unit %s was claimed by another worker during the upload; its status stays "
                        "unwritten", unit_id)
            return "lost"
    return report.status


def _units_to_claim(queue: CloudQueue, worker: str,
                    running: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(the units this worker may claim, a fresh listing); an unusable one is warned of."""
    mine = []
    for unit_id, info in sorted(queue.listing().items()):
        if not info["ready"] or info["done"] or info.get("cancelled") or unit_id in running:
            continue
        try:
            meta = queue.meta(check_safe_name(unit_id, "unit id"))
            allowed = meta.get("allowed_remotes") or [worker]
        except StackopsError as exc:
            log.warning("skipping unit %r: %s", unit_id, exc)
            continue
        if worker in allowed:
            mine.append(unit_id)
    return mine, queue.listing()


def run_worker(cloud_name: str, name: str | None = None, max_jobs: int = 1, poll: float = 5.0,
               until_idle: bool = False, settle: float = CLOUD_SETTLE, lease: float = CLOUD_LEASE,
               base_dir: str | None = None) -> int:
    """Claim and run work units from the cloud queue, up to ``max_jobs`` at a time, until stopped
    (``until_idle``: until every unit is done). Returns how many units this worker finished.
    A queue that cannot be read is logged and read again later, backing off up to
    CLOUD_BACKOFF_MAX seconds: the worker goes on."""
    from concurrent.futures import ThreadPoolExecutor

    worker = check_safe_name(name or f"{os.uname().nodename}-{os.getpid()}", "worker name")
    if max_jobs < 1:
        raise ConfigError("max_jobs must be at least 1")
    check_cloud_remote(cloud_name)
    queue = CloudQueue(cloud_name, settle, lease)
    running: dict[str, Any] = {}
    finished = failures = 0
    with ThreadPoolExecutor(max_workers=max_jobs) as pool:
        while True:
            for unit_id in [u for u, f in running.items() if f.done()]:
                try:
                    log.info("unit %s: %s", unit_id, running.pop(unit_id).result())
                    finished += 1
                except Exception as exc:  # one unit's trouble must not stop the worker
                    log.warning("unit %s failed to run here: %s", unit_id, exc)
            try:
                mine, units = _units_to_claim(queue, worker, running)
                for unit_id in mine:
                    if len(running) >= max_jobs:
                        break
                    info = units.get(unit_id, {})
                    claims = info.get("claims", [])
                    claim = None if info.get("done") else queue._take_pending(unit_id, claims)
                    if claim is None and (info.get("done") or queue.live_claims(claims)):
                        continue
                    claim = claim or queue.claim(unit_id, worker)
                    if claim is not None:
                        log.info("worker %s claimed unit %s", worker, unit_id)
                        running[unit_id] = pool.submit(_run_unit, queue, unit_id, claim, worker,
                                                       base_dir)
            except StackopsError as exc:  # the remote went away for a moment: back off, go on
                failures += 1
                delay = min(poll * 2 ** min(failures, 16), max(poll, CLOUD_BACKOFF_MAX))
                log.warning("cannot read the queue on %s (%s); looking again in %.1fs", queue.base,
                            exc, delay)
                time.sleep(delay)
                continue
            failures = 0
            if until_idle and not running and not mine:
                return finished
            time.sleep(0.2 if running else poll)


# ============================================================================================
# 17. CLI
# ============================================================================================

def _print_table(rows: list[list[str]], header: list[str] | None = None) -> None:
    rows = ([header] if header else []) + rows
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                    for row in rows))  # one write: 10,000 rows, unbuffered too


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _print_json_rows(rows: list[Any]) -> None:
    """A JSON list, one row a line: as readable, and fast for 10,000 rows: json's C encoder made
    once (JSONEncoder.encode makes one a row, which is a third of the time), where there is one."""
    encoder = json.JSONEncoder(ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)  # (what encode calls: rows are no cycles)
    if make is None:
        lines = ",\n  ".join(map(encoder.encode, rows))
    else:
        one = make(None, encoder.default, json.encoder.encode_basestring, None,
                   encoder.key_separator, encoder.item_separator, False, False, True)
        lines = ",\n  ".join(["".join(one(row, 0)) for row in rows])
    print(f"[\n  {lines}\n]" if rows else "[]")


def _duration(report: JobStatus) -> str:
    start = _parse_iso(report.start_time)
    if start is None:  # (never started: 10,000 jobs cancelled in line are shown quickly)
        return "-"
    end = _parse_iso(report.end_time) or _parse_iso(report.as_of)  # (as list: known until then)
    return _format_duration(((end or _utcnow()) - start).total_seconds())


def _status_rows(report: JobStatus) -> list[list[str]]:
    status = report.status + (f" (place {report.place} in the queue)" if report.place else "")
    rows = [["job", report.job_id], ["status", status], ["host", report.host],
            ["pid", str(report.pid or "-")], ["submitted", report.submission_time or "-"],
            ["started", report.start_time or "-"], ["ended", report.end_time or "-"],
            ["duration", _duration(report)], ["results", report.results_path or "-"]]
    if report.attempt:
        rows.append(["attempt", report.attempt])
    for name, value in (("exit code", report.exit_code), ("signal", report.signal),
                        ("peak memory", _mib(report.max_rss_bytes) if report.max_rss_bytes
                         is not None else None),
                        ("cpu time", _format_duration(report.cpu_seconds)
                         if report.cpu_seconds is not None else None), ("slot", report.slot)):
        if value is not None:
            rows.append([name, str(value)])
    if report.as_of:
        rows[1][1] += f" (as of {report.as_of[:19]}: its host could not be asked)"
    if report.slurm_job_id:
        rows.append(["slurm job", report.slurm_job_id])
    if report.reason:
        rows.append(["reason", report.reason])
    if report.error_message:
        rows.append(["error", _last_line(report.error_message)])
    return rows


def _parse_workload(text: str | None) -> WorkloadParams | None:
    if text is None:
        return None
    match = re.match(r"(\d+):(\d+)(?::(\d+))?\Z", text)
    if not match:
        raise ConfigError(f"--workload {text!r} is not START:END[:PARTS]",
                          hint="e.g. --workload 0:1000:4")
    start, end, parts = int(match[1]), int(match[2]), int(match[3] or 1)
    if end <= start:
        raise ConfigError(f"--workload {text!r} is an empty range: END must be greater than START",
                          hint="e.g. --workload 0:1000:4 covers [0, 1000) in 4 parts")
    return WorkloadParams(idx_min=start, idx_max=end, idx_start=start, idx_end=end, jobs=parts)


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``run [options] -- COMMAND [ARGS...]`` (and ``cluster run``, ``cloud submit``): (the
    words before ``--``, the job's command after it); (argv, None) for any other command line."""
    if "--" not in argv:
        return argv, None
    cut = argv.index("--")
    verbs = [word for word in argv[:cut] if not word.startswith("-")]
    if verbs[:1] == ["run"] or verbs[:2] in (["cluster", "run"], ["cloud", "submit"]):
        return argv[:cut], argv[cut + 1:]
    return argv, None


def _run_target(args: Any) -> Any:
    """What ``run`` (``cluster run``, ``cloud submit``) runs: TARGET (a script or FILE.py:FUNC),
    or the command after ``--`` as a list; exactly one of them, and a command with none of the
    options that only a Python function takes."""
    command = getattr(args, "job_command", None)
    if command is not None and args.target:
        raise ConfigError(f"give a script or function ({args.target}) or a command after --, "
                          "not both")
    if command is None:
        if not args.target:
            raise ConfigError("nothing to run: give a script, FILE.py:FUNC, or -- COMMAND",
                              hint=f"e.g. {_prog()} run train.py, or {_prog()} run -- make train")
        return args.target
    if args.kwargs != "{}":
        raise ConfigError("--kwargs is for a Python function or script: a command's arguments "
                          "follow --", hint="a sweep's lines fill the command's {name} "
                                            "placeholders")
    return _check_command(command)


def _cmd_run(args: Any) -> int:
    target = _run_target(args)
    config = RemoteStackOpsConfig(
        job_id=args.job_id or _random_job_id(), base_dir=args.base_dir,
        description=args.description, **_given_settings(args),
        ssh_host=args.host, accept_new_host_key=args.accept_new,
        transfer_method=args.transfer, cloud_name=args.cloud,
        update_repo=args.update_repo, install_repo=args.install_repo, data=args.data,
        interactive=args.interactive, wrap_in_try_except=args.try_except,
        parallelize=args.parallelize,
        lock_resources=not args.no_lock, ssh_timeout=args.ssh_timeout,
        workload_params=_parse_workload(args.workload),
        launch_method="slurm" if args.slurm else "remotely",
        notify_upon_completion=args.notify or args.email is not None, to_email=args.email,
        on_end=args.on_end, retries=args.retries, retry_delay=args.retry_delay, gpus=args.gpus,
        group=args.group,
        after=[job_id.strip() for job_id in args.after.split(",") if job_id.strip()],
        slurm_options=dict(parse_slurm_option(text) for text in args.slurm_opt))
    if args.sweep:
        return _run_sweep_and_report(target, config, args)
    machine = RemoteMachine(target, config, func_kwargs=parse_kwargs(args.kwargs))
    with machine:
        return _run_and_report(machine, args)


def _given_settings(args: Any) -> dict[str, Any]:
    """The settings the user config file may give that the command line gives: the others are
    left out, for the file to fill in (see RemoteStackOpsConfig)."""
    given = {"copy_repo": args.copy_repo, "max_simultaneous_jobs": args.max_jobs,
             "python": getattr(args, "python", None),
             "env": dict(parse_env_option(text) for text in args.env)}
    return {field: value for field, value in given.items() if value is not None}


def _run_sweep_and_report(target: Any, config: RemoteStackOpsConfig, args: Any) -> int:
    grid = load_sweep_grid(args.sweep)
    with run_sweep(target, config, grid, parse_kwargs(args.kwargs), run=not args.no_launch,
                   progress=_progress(args)) as sweep:
        first, last = sweep.jobs[0].job_id, sweep.jobs[-1].job_id
        if args.no_launch:
            print(f"sweep {sweep.sweep_id}: {len(sweep)} jobs ({first} .. {last}) ready; "
                  "nothing was started.")
            return 0
        if not args.wait:
            if args.json:
                _print_json({"sweep": sweep.sweep_id, "jobs": [job.job_id for job in sweep]})
            else:
                print(f"sweep {sweep.sweep_id}: {len(sweep)} jobs ({first} .. {last}) fired on "
                      f"{sweep.jobs[0].host_name}")
                print(f"  wait:    {_prog()} wait {sweep.sweep_id}")
                print(f"  status:  {_prog()} status {sweep.sweep_id}")
            return 0
        try:
            reports = sweep.wait()
        except KeyboardInterrupt:
            print(f"\nstopped waiting; sweep {sweep.sweep_id} goes on (detached)", file=sys.stderr)
            return 130
    if args.json:
        _print_json([report.to_dict() for report in reports.values()])
    else:
        rows = [[job_id, report.status, _duration(report), _last_line(report.error_message)]
                for job_id, report in reports.items()]
        _print_table(rows, ["job", "status", "duration", "error"])
    return 0 if all(report.status == "completed" for report in reports.values()) else 1


def _handed_report(machine: RemoteMachine) -> JobStatus:
    """The job as its fire left it, with no second round trip after run(): waiting, queued
    (Slurm) or running, on the node that took it; a job not handed over so (a cloud queue's)
    has its status read."""
    handed = machine.handed
    node = handed.node if handed is not None else ""
    if not machine.is_remote:
        node = os.uname().nodename
    if not node or machine.config.launch_method == "cloud_manager":
        return machine.get_status(0)
    status = "queued" if machine.uses_slurm or not machine.file_manager.lock_resources \
        else "waiting"
    return JobStatus(job_id=machine.job_id, status=status, host=node,
                     submission_time=_iso(machine.file_manager.submission_time),
                     slurm_job_id=machine.slurm_job_id)


def _run_and_report(machine: RemoteMachine, args: Any) -> int:
    machine.run(run=not args.no_launch, show_scripts=args.show_scripts, progress=_progress(args))
    if args.no_launch:
        print(f"job {machine.job_id} is ready at {machine.file_manager.job_root_rh}; nothing was "
              "started.")
        print(f"launch it with:\n{machine.launch_command}")
        return 0
    if not args.wait:
        report = _handed_report(machine)
        if args.json:
            _print_json(report.to_dict())
        else:
            started = (f"Slurm job {machine.slurm_job_id}" if machine.uses_slurm
                       else f"pid {machine.launcher_pid}")
            print(f"job {machine.job_id} {report.status} on {report.host} ({started})")
            print(f"  status:  {_prog()} status {machine.job_id}")
            print(f"  logs:    {_prog()} logs {machine.job_id} -f")
        return 0
    try:
        machine.wait(download=False)  # the table says where the results are; download gets them
    except JobFailedError:
        pass
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {machine.job_id} goes on (detached)", file=sys.stderr)
        return 130
    report = machine.get_status()
    if args.json:
        _print_json(report.to_dict())
    else:
        _print_table(_status_rows(report))
        if report.status == "failed":
            print("\n" + report.error_message.rstrip(), file=sys.stderr)
    return 0 if report.status == "completed" else 1


def _cmd_status(args: Any) -> int:
    _pause_gc()
    target = _load_job_or_cluster(args.job_id, args.base_dir)
    with target:
        if not isinstance(target, RemoteMachine):
            return _group_status(target, args)
        try:
            report = target.get_status(args.lines)
            tasks = _reports(target.place, target.array_tasks()) if target.array_parts else []
        except StackopsConnectionError:  # what is known, as list shows it (last read, as of
            if not target.is_remote:  # then), and the failure, saying why and what to do
                raise
            _show_status(_as_last_read(target.job_id, target.file_manager.job_root), [], args)
            raise
    _show_status(report, tasks, args)
    return 0


def _show_status(report: JobStatus, tasks: list[JobStatus], args: Any) -> None:
    if args.json:
        _print_json(dict(report.to_dict(),
                         tasks=[task.to_dict() for task in tasks]) if tasks else report.to_dict())
        return
    _print_table(_status_rows(report))
    if tasks:
        print()
        _print_table([[task.job_id, task.slurm_job_id or "-", task.status, _duration(task),
                       _last_line(task.error_message)] for task in tasks],
                     ["task", "slurm job", "status", "duration", "error"])
    if report.status == "failed" and report.error_message:
        print("\n" + report.error_message.rstrip())
    if args.lines and report.log_tail:
        print(f"\nlast lines of the log:\n{report.log_tail}")


def _group_status(target: Any, args: Any) -> int:
    """``status`` of a sweep, a cluster or a cloud job's units: the counts per status, then a
    line per member (each judged where it runs, as ``list`` judges it)."""
    answers = target.check_job_status()
    if args.json:
        _print_json({"id": target.job_id, "counts": _counts(answers),
                     "members": {key: _member_json(value) for key, value in answers.items()}})
        return _say_unasked(answers)
    print(f"{target.job_id}: {_counts_text(answers)}")
    _print_table([_member_row(key, value) for key, value in answers.items()],
                 ["member", "status", "duration", "error"])
    return _say_unasked(answers)


def _say_unasked(answers: dict[str, Any]) -> int:
    """Say on stderr why members are shown as last read (their host could not be asked), each
    reason once: 1 then (as ``status ID`` of such a job fails, saying why), else 0."""
    unasked = {key: why for key, value in answers.items() if (why := _unasked(value))}
    for why in dict.fromkeys(unasked.values()):
        keys = [key for key, said in unasked.items() if said == why]
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        print(f"stackops: {', '.join(keys[:3])}{more} shown as last read: {_NOT_ASKED}{why}",
              file=sys.stderr)
    return 1 if unasked else 0


def _member_json(value: JobStatus | StackopsError) -> dict[str, Any]:
    """A member as ``status --json`` of its group shows it: its report (one as last read says
    why in ``error`` too, as a ``list --json`` row does), or the error that kept it from being
    read."""
    if not isinstance(value, JobStatus):
        return {"error": str(value)}
    why = _unasked(value)
    return dict(value.to_dict(), error=why) if why else value.to_dict()


def _member_row(key: str, value: JobStatus | StackopsError) -> list[str]:
    """A sweep's, a cluster's or a cloud job's member as _group_status shows it: one read as of
    some time says so (as ``status MEMBER`` and ``list`` do); with no error, its reason (why it
    waits, why its host was not asked, that its record is missing)."""
    if not isinstance(value, JobStatus):
        return [key, "?", "-", _last_line(str(value))]
    status = value.status + (f" (as of {value.as_of[:19]})" if value.as_of else "")
    return [key, status, _duration(value), _last_line(value.error_message or value.reason)]


def _counts(answers: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in answers.values():
        status = value.status if isinstance(value, JobStatus) else "unreadable"
        counts[status] = counts.get(status, 0) + 1
    return counts


def _counts_text(answers: dict[str, Any]) -> str:
    order = [*STATUSES, "unreadable"]
    counts = _counts(answers)
    text = ", ".join(f"{counts[name]} {name}" for name in order if name in counts) or "no jobs"
    unasked = sum(1 for value in answers.values() if _unasked(value))
    return f"{text} ({unasked} as last read: not asked now)" if unasked else text


def _pause_gc() -> None:
    """For a command that reads 10,000 jobs and ends (list, status): no cyclic garbage
    collection (the rows are no cycles, and each collection walks them all: 5% of a list);
    main() resumes it."""
    import gc

    gc.disable()


def _cmd_list(args: Any) -> int:
    filters = _list_filters(args)  # bad input is refused before any host is asked
    _pause_gc()
    if args.host and args.host != "localhost":  # its own job folders, whoever submitted them
        with SSH.from_config_file(args.host, timeout=args.timeout) as ssh:
            answers = ssh.serve([{"action": "list", "base_dir": args.base_dir}],
                                timeout=max(args.timeout, 60.0))[0]
        rows = [{"job_id": Path(answer["root"]).name, "host": args.host, "cluster": None,
                 "as_of": answer["state"].get("as_of"), "error": None,
                 "report": report_from(answer)} for answer in answers]
    else:
        rows = list_job_rows(args.base_dir, args.timeout)
    everything, rows = bool(rows), _filter_rows(rows, filters)
    for host, error in sorted({(r["host"], _last_line(r["error"])) for r in rows if r["error"]}):
        print(f"stackops: {host}: not refreshed ({error})", file=sys.stderr)
    if args.json:
        _print_json_rows([_list_json(row) for row in rows])
        return 0
    if not rows:
        print(f"no job under {args.base_dir} matches" if everything
              else f"no jobs under {args.base_dir}")
        return 0
    table, clusters = [], {}
    for row in rows:
        if row["cluster"] is None:
            table.append(_list_row(row["job_id"], row))
        elif row["cluster"] not in clusters:
            parts = [r for r in rows if r["cluster"] == row["cluster"]]
            clusters[row["cluster"]] = parts
            table.append(_cluster_row(row["cluster"], parts))
            parts.sort(key=lambda part: _natural_key(part["job_id"]))
            table += [_list_row("  " + part["job_id"], part) for part in parts]
    _print_table(table, ["JOB", "HOST", "STATUS", "SUBMITTED (UTC)", "DURATION", "RESULTS"])
    return 0


def _list_filters(args: Any) -> dict[str, Any]:
    """``list``'s filters, checked: the statuses, host, earliest submission, sweep members and
    count asked for (None or empty: no such filter)."""
    statuses = {s.strip() for text in args.status for s in text.split(",") if s.strip()}
    unknown = sorted(statuses - set(STATUSES))
    if unknown:
        raise ConfigError(f"--status {', '.join(unknown)}: not a job status (a job is "
                          f"{', '.join(STATUSES)})")
    if args.last is not None and args.last < 1:
        raise ConfigError(f"--last must be at least 1, got {args.last}")
    since = None
    if args.since is not None:
        since = _utcnow() - _dt.timedelta(seconds=_parse_age(args.since, "--since"))
    members = None if args.sweep is None else set(_sweep_members(args.sweep, args.base_dir))
    return {"statuses": statuses, "host": args.host, "since": since, "sweep": members,
            "sweep_id": args.sweep, "last": args.last}


def _sweep_members(sweep_id: str, base_dir: str) -> list[str]:
    """The ids of a sweep's jobs, from its record (one small file, not its jobs' folders)."""
    queued = expand_home(f"{base_dir}/queued")
    try:
        ids = _read_json(queued / check_safe_name(sweep_id, "--sweep") / SWEEP_JSON)["ids"]
    except (StackopsError, KeyError, TypeError) as exc:
        raise ConfigError(f"no sweep {sweep_id!r} under {collapse_home(queued.parent)}",
                          hint=f"{_prog()} list shows the jobs") from exc
    return [str(job_id) for job_id in ids]


def _filter_rows(rows: list[dict[str, Any]], filters: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows ``list`` shows: the ones ``filters`` keep (see _list_filters), in the order they
    were submitted (a sweep's, submitted at once, by index), the last ``last`` of them."""
    statuses, host, since, sweep = (filters[key] for key in ("statuses", "host", "since", "sweep"))

    def kept(row: dict[str, Any]) -> bool:
        report: JobStatus = row["report"]
        if statuses and report.status not in statuses:
            return False
        if sweep is not None and (row["job_id"] not in sweep or  # (a host's rows name none)
                                  row.get("sweep", filters["sweep_id"]) != filters["sweep_id"]):
            return False
        if since is not None and (_parse_iso(report.submission_time) or since) <= since:
            return False
        return host is None or row["host"] == host

    every = not statuses and sweep is None and since is None and host is None
    chosen = sorted(rows if every else filter(kept, rows), key=lambda row: (  # ISO: sort as text
        row["report"].submission_time or "", _natural_key(row["job_id"])))
    return chosen[-filters["last"]:] if filters["last"] else chosen


_DIGIT_RUNS = re.compile(r"(\d+)")


def _natural_key(text: str) -> list[Any]:
    """``text`` split so that its numbers compare as numbers: job-9 before job-10."""
    return [int(part) if part.isdigit() else part for part in _DIGIT_RUNS.split(text)]


def _list_json(row: dict[str, Any]) -> dict[str, Any]:
    """A row of ``list --json``: its JobStatus; ``host`` is the alias, ``hostname`` its answer."""
    data = row["report"].to_dict()  # (as_of keeps its place; the rest come last, in this order)
    data["hostname"] = data.pop("host")
    data["host"], data["cluster"] = row["host"], row["cluster"]
    data["as_of"], data["not_refreshed"] = row["as_of"], row["error"]
    return data


def _list_row(name: str, row: dict[str, Any]) -> list[str]:
    """A job's line in ``list``: a row its host could not refresh says when it was last seen."""
    report: JobStatus = row["report"]
    status, end = report.status, _parse_iso(report.end_time)
    seen = _parse_iso(row["as_of"])
    if seen is not None:
        status += f" (as of {seen.strftime('%Y-%m-%d %H:%M:%S')})"
        end = end or seen  # its duration stops where our knowledge does
    start = _parse_iso(report.start_time)
    took = _format_duration(((end or _utcnow()) - start).total_seconds()) if start else "-"
    submitted = (report.submission_time or "-")[:19]
    return [name, row["host"], status, submitted, took, report.results_path or "-"]


def _cluster_row(cluster: str, parts: list[dict[str, Any]]) -> list[str]:
    counts = _counts({part["job_id"]: part["report"] for part in parts})
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    submitted = min((p["report"].submission_time or "-" for p in parts), default="-")
    return [f"{cluster} (cluster)", f"{len(parts)} host(s)", summary, submitted[:19], "", ""]


def _cmd_logs(args: Any) -> int:
    target = _load_job_or_cluster(args.job_id, args.base_dir)
    with target:
        alone = isinstance(target, RemoteMachine) and not target.array_parts
        return _follow_logs(_members(target), args, None if alone else {})


def _follow_logs(members: list[RemoteMachine], args: Any,
                 names: dict[str, str] | None = None) -> int:
    """The jobs' logs (each one's last ``--lines``, or all in slices), read where they run (one
    call per place), each under a header naming it (by ``names``, else its id) unless ``names``
    is None; with ``--follow``, what they add, until every one has ended and nothing more came
    (a line appears here within a second of the job printing it; a host that cannot be read now
    is said once and asked again, the others followed meanwhile)."""
    if args.lines is not None and args.lines < 0:
        raise ConfigError(f"-n takes a number of lines, 0 or more, not {args.lines}")
    start = 0 if args.lines is None else None  # None: the server reads the last lines first
    offsets: dict[str, int | None] = {member.job_id: start for member in members}
    done: set[str] = set()
    shown: dict[str, Any] = {"job": "", "open": False, "told": set()}
    streaming: RemoteMachine | None = None  # without -f: a log printed whole before the next
    while len(done) < len(members):
        live = [streaming] if streaming else [m for m in members if m.job_id not in done]
        streaming, more = None, False
        for group in _by_place(live):
            for member, answer in zip(group, _read_logs(group, offsets, args, shown["told"])):
                if answer is None:
                    continue
                _show_log(member.job_id, answer, args.follow, names, shown)
                more = more or bool(answer.get("more"))
                if answer.get("more") or not args.follow:
                    streaming = member if answer.get("more") and not args.follow else None
                    if not answer.get("more"):
                        done.add(member.job_id)
                elif answer["ended"] and not answer["text"] and offsets[member.job_id] is not None:
                    done.add(member.job_id)  # ended before a read that found nothing more
                offsets[member.job_id] = answer["offset"]
                if streaming:
                    break
            if streaming:
                break
        sys.stdout.flush()
        if not more and len(done) < len(members):
            time.sleep(0.25)
    return 0


def _by_place(members: list[RemoteMachine]) -> list[list[RemoteMachine]]:
    places: dict[int, list[RemoteMachine]] = {}
    for member in members:
        places.setdefault(id(member.place), []).append(member)
    return list(places.values())


def _read_logs(group: list[RemoteMachine], offsets: dict[str, int | None], args: Any,
               told: set[str]) -> list[Any]:
    """One call to the members' place for their logs' next slices; following, a place that
    cannot be read now answers None for each (said once until it answers again)."""
    requests = [{"action": "logs", "roots": [member.root_there], "lines": args.lines,
                 "offset": offsets[member.job_id]} for member in group]
    try:
        answers = group[0].place.call(requests)
    except (StackopsConnectionError, CommandError) as exc:
        if not args.follow:
            raise
        for member in group:
            if member.job_id not in told:
                told.add(member.job_id)
                print(f"stackops: {member.job_id} cannot be read now ({_last_line(str(exc))}); "
                      "still following", file=sys.stderr, flush=True)
        return [None] * len(group)
    told.difference_update(member.job_id for member in group)
    return list(answers)


def _show_log(job_id: str, answer: dict[str, Any], follow: bool, names: dict[str, str] | None,
              shown: dict[str, Any]) -> None:
    """Print a slice of a job's log, under its header when it is not the last one printed
    (a partial line before ends first); a log found shorter than read is said on stderr."""
    label = job_id if names is None else names.get(job_id, job_id)
    if answer.get("truncated"):
        where = "" if names is None else f"{label}: "
        print(f"stackops: {where}(log truncated)", file=sys.stderr, flush=True)
    text = answer["text"]
    if names is not None and shown["job"] != job_id and (text or not follow):
        if shown["open"]:
            sys.stdout.write("\n")
        shown["job"] = job_id
        print(f"==> {label} <==")
    sys.stdout.write(text)
    if text:
        shown["open"] = not text.endswith("\n")


def _members(target: Any) -> list[RemoteMachine]:
    """The jobs a sweep, a cluster, an array or a cloud job's units consist of."""
    if isinstance(target, Sweep):
        return list(target.jobs)
    if isinstance(target, Cluster):
        return list(target.machines.values())
    if isinstance(target, _CloudUnits):
        return list(target.units)
    return target.array_tasks() if target.array_parts else [target]


def _queue_view(slots: Slots, history: int) -> dict[str, Any]:
    with _suppress(OSError, StackopsError):
        slots.ensure_dispatcher(view=True)  # a queue whose dispatcher died drains again from here
    return {"state_dir": collapse_home(slots.root), "running": slots.holders(),
            "waiting": slots.waiters(), "history": slots.history()[-history:] if history else []}


def _cmd_queue(args: Any) -> int:
    if args.host:
        with SSH.from_config_file(args.host) as ssh:
            view = ssh.serve([{"action": "queue", "history": args.history}])[0]
    else:
        view = _queue_view(Slots(), args.history)
        pools = state_dir() / "pools"
        names = sorted(path.name for path in pools.iterdir()) if pools.is_dir() else []
        view["pools"] = {name: _queue_view(Slots(pools / name), args.history) for name in names}
    if args.json:
        _print_json(view)
        return 0
    _print_queue(view)
    for name, pool in view.get("pools", {}).items():
        print(f"\npool {name}:")
        _print_queue(pool)
    return 0


def _print_queue(view: dict[str, Any]) -> None:
    print(f"running ({len(view['running'])}):")
    _print_table([["  " + str(h["slot"]), h.get("job_id", "?"), f"pid {h.get('pid', '?')}",
                   "since " + str(h.get("start_time", "?"))[:19]] for h in view["running"]])
    print(f"waiting ({len(view['waiting'])}):")
    _print_table([[f"  {w['place'] or '-'}.", w["job_id"], w["state"],
                   "since " + str(w["queued_since"])[:19]] for w in view["waiting"]])
    print(f"history (last {len(view['history'])}):")
    _print_table([["  " + h.get("job_id", "?"), h.get("status", "?"),
                   _format_duration(h.get("duration_seconds") or 0),
                   "ended " + str(h.get("end_time"))[:19]]
                  for h in reversed(view["history"])])


def _cmd_download(args: Any) -> int:
    target = _load_job_or_cluster(args.job_id, args.base_dir)
    with target:
        if isinstance(target, RemoteMachine):
            folder = target.download_results(args.to, overwrite=args.overwrite,
                                             progress=_progress(args))
            print(collapse_home(folder))
            return 0
        if isinstance(target, Cluster):
            print(collapse_home(target.download_results(args.to)))
            return 0
        return _download_members(_members(target), args)


def _download_members(members: list[RemoteMachine], args: Any) -> int:
    """Every completed member's results into one folder, a sub-folder each (over the members'
    one connection); the others are named on stderr."""
    if not members:
        raise ConfigError(f"{args.job_id} has no jobs")
    folder = expand_home(args.to or f"{DEFAULT_RESULTS_DIR}/{args.job_id}")
    reports = _reports(members[0].place, members)
    code = 0
    for member, report in zip(members, reports):
        if report.status != "completed":
            print(f"stackops: {member.job_id} is {report.status}: nothing to download",
                  file=sys.stderr)
            code = 1
            continue
        _settle(member, report)
        member.download_results(folder / member.job_id, overwrite=args.overwrite,
                                progress=_progress(args))
    if folder.is_dir():  # (none completed: no folder to name)
        print(collapse_home(folder))
    return code


def _cmd_delete_results(args: Any) -> int:
    with RemoteMachine.load(args.job_id, args.base_dir) as machine:
        results = machine.results()
        machine.delete_remote_results()
    print(f"deleted {results.as_posix()} on {machine.host_name}")
    return 0


# -- job control: cancel, wait, start, delete, prune ----------------------------------------------

class _CloudUnits:
    """The units of a job submitted to a cloud queue, named by the job's id (for cancel)."""

    def __init__(self, job_id: str, units: list[RemoteMachine]) -> None:
        self.job_id, self.units = job_id, units

    def check_job_status(self) -> dict[str, JobStatus | StackopsError]:
        """Each unit's status, from one listing of the queue."""
        cloud = self.units[0].config.cloud_name or ""
        queue = CloudQueue(cloud)
        rows = {row["unit"]: row for row in queue.report([u.job_id for u in self.units])}
        return {unit.job_id: _unit_status(rows[unit.job_id], queue.base)
                if unit.job_id in rows else unit.get_status(0) for unit in self.units}

    def cancel(self, grace: float = 10.0) -> dict[str, JobStatus | StackopsError]:
        answers: dict[str, JobStatus | StackopsError] = {}
        for unit in self.units:
            try:
                answers[unit.job_id] = unit.cancel(grace)
            except StackopsError as exc:
                answers[unit.job_id] = exc
        return answers

    def close(self) -> None:
        pass

    def __enter__(self) -> _CloudUnits:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _cloud_units_of(job_id: str, base_dir: str) -> _CloudUnits | None:
    """The units ``<job_id>-K-N`` this machine put in a cloud queue, if any."""
    queued = expand_home(f"{base_dir}/queued")
    units = []
    for record in sorted(queued.glob(f"{job_id}-*-*/{REMOTE_MACHINE_JSON}")):
        if re.match(rf"{re.escape(job_id)}-\d+-\d+\Z", record.parent.parent.name):
            unit = RemoteMachine.from_job_dir(record.parent.parent)
            if unit.config.launch_method == "cloud_manager":
                units.append(unit)
    return _CloudUnits(job_id, units) if units else None


def _load_job_or_cluster(job_id: str,
                         base_dir: str) -> RemoteMachine | Cluster | Sweep | _CloudUnits:
    """A job, a cluster, a sweep, or a cloud job's units, by id; none of them is bad input."""
    missing: ConfigError | None = None  # a job folder whose record is gone, if nothing else
    try:
        return RemoteMachine.load(job_id, base_dir)
    except _RecordMissingError as exc:
        missing = exc
    except ConfigError:
        pass
    try:
        return Cluster.load(job_id, base_dir.rstrip("/").rsplit("/", 1)[0])
    except StackopsError:
        pass
    with _suppress(ConfigError):
        return Sweep.load(job_id, base_dir)
    units = _cloud_units_of(job_id, base_dir)
    if units is None:
        raise missing or ConfigError(f"no job or cluster {job_id!r} here",
                                     hint=f"{_prog()} list shows the jobs")
    return units


def _cmd_cancel(args: Any) -> int:
    # all known first
    targets = [_target_or_folder(job_id, args.base_dir) for job_id in args.job_ids]
    code = 0
    for target in targets:
        if isinstance(target, Path):
            answer: Any = _cancel_recordless(target, args.grace)
        else:
            with target:
                answer = target.cancel(args.grace)
        reports = answer if isinstance(answer, dict) else {answer.job_id: answer}
        for part, report in reports.items():
            if isinstance(report, Exception):
                print(f"{part}: not cancelled: {report}", file=sys.stderr)
                code = 1
                continue
            was = report.reason[4:] if report.reason.startswith("was ") else ""
            if was in TERMINAL_STATUSES:
                print(f"{report.job_id} had already ended ({was})" if was != "cancelled"
                      else f"{report.job_id} was already cancelled")
            elif report.status == "cancelled":
                print(f"{report.job_id} cancelled")
            else:
                print(f"{report.job_id} cancelling ({report.reason or report.status})")
    return code


def _overall(answers: dict[str, Any]) -> str | None:
    """One status for a group of jobs once every one has ended (a job never started, its fire
    broken off, counts as ended: it never will start), else None."""
    statuses = [r.status for r in answers.values() if isinstance(r, JobStatus)]
    if len(statuses) < len(answers) or \
            not all(status in (*TERMINAL_STATUSES, "prepared") for status in statuses):
        return None
    if all(status == "completed" for status in statuses):
        return "completed"
    return "failed" if "failed" in statuses or "prepared" in statuses else "cancelled"


def _look(target: Any, ended: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``wait`` looks at: each member's report, or the error that kept it from being read.
    ``ended``: a sweep's members seen ended before (an end stands), not asked again, kept up to
    date here: a sweep of 10,000 is not read whole every time wait looks."""
    if isinstance(target, RemoteMachine):
        try:
            return {target.job_id: target.get_status(0)}
        except (StackopsConnectionError, CommandError) as exc:
            return {target.job_id: exc}
    if not isinstance(target, Sweep) or ended is None:
        return target.check_job_status()
    if target._being_submitted():  # its members are still being written: each look reads anew
        target._jobs = None
        return target.check_job_status()
    answers = target._without(ended).check_job_status()
    ended.update((key, value) for key, value in answers.items()
                 if isinstance(value, JobStatus) and value.finished and not value.slurm_job_id)
    return dict(sorted((job_id, ended.get(job_id) or answers[job_id])
                       for job_id in target._every_id()))


def _cmd_wait(args: Any) -> int:
    if args.timeout is not None and not args.timeout >= 0:  # (nan too)
        raise ConfigError(f"--timeout must be positive seconds, got {args.timeout}")
    targets = {job_id: _load_job_or_cluster(job_id, args.base_dir) for job_id in args.job_ids}
    try:
        return _wait_for(targets, args.timeout)
    finally:
        for target in targets.values():
            target.close()


def _wait_for(targets: dict[str, Any], timeout: float | None = None) -> int:
    """Block until every target (a job, sweep, cluster, ...) has ended, saying each end (a
    group's with its counts, and its failed members); 0 if all completed, 1 if not, 124 when
    ``timeout`` seconds went by first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ended: dict[str, str] = {}
    told: set[str] = set()
    seen: dict[str, dict[str, Any]] = {job_id: {} for job_id in targets}  # members ended
    while len(ended) < len(targets):
        for job_id, target in targets.items():
            if job_id in ended:
                continue
            answers = _within(timeout, deadline, _look, target, seen[job_id])
            status = _overall(answers)
            _tell_unread(answers, told)
            if status is not None:
                ended[job_id] = status
                group = "" if isinstance(target, RemoteMachine) else f" ({_counts_text(answers)})"
                print(f"{job_id} {status}{group}", flush=True)
                if group:
                    _say_failed(answers)
        if len(ended) < len(targets):
            if deadline is not None and time.monotonic() >= deadline:
                waiting = ", ".join(job_id for job_id in targets if job_id not in ended)
                print(f"still not ended after {timeout:g}s: {waiting}", file=sys.stderr)
                return 124
            time.sleep(0.3)
    return 0 if all(status == "completed" for status in ended.values()) else 1


class _Looks(_thread._local):
    by: float | None = None  # wait's deadline (monotonic) for this thread's looks (_within)


_LOOKS = _Looks()
LOOK_FLOOR = 5.0  # seconds a look of wait may take however near its deadline (connecting needs)


def _within(timeout: float | None, deadline: float | None, look: Callable[..., Any],
            *args: Any) -> Any:
    """``look(*args)`` of wait, each connect to a host and each answer waited for given what is
    left until ``deadline`` (LOOK_FLOOR at least, the connection's own timeout at most): a host
    that takes the connection and says nothing (a frozen sshd) holds wait past its ``timeout``
    by LOOK_FLOOR at most, and its member is said unreadable with why. ``timeout`` 0 (look
    once) gives the look the connection's whole timeout."""
    before, _LOOKS.by = _LOOKS.by, deadline if timeout else None
    try:
        return look(*args)
    finally:
        _LOOKS.by = before


def _bounded(timeout: float) -> float:
    """A host's ``timeout`` within the deadline of wait's look (_within)."""
    by = _LOOKS.by
    return timeout if by is None else min(timeout, max(by - time.monotonic(), LOOK_FLOOR))


def _tell_unread(answers: dict[str, Any], told: set[str]) -> None:
    """Say once of each member that cannot be read now why (an error, or its host not asked:
    its last read report stands only once it says the member ended)."""
    for part, answer in answers.items():
        why = str(answer) if isinstance(answer, Exception) else _unasked(answer)
        if why and part not in told and not (isinstance(answer, JobStatus) and answer.finished):
            told.add(part)
            print(f"stackops: {part} cannot be read now ({_last_line(why)}); still waiting",
                  file=sys.stderr)


def _say_failed(answers: dict[str, Any], most: int = 5) -> None:
    """Name the failed members of an ended group, each with why (the first ``most``)."""
    failed = [(part, report) for part, report in answers.items()
              if isinstance(report, JobStatus) and report.status == "failed"]
    for part, report in failed[:most]:
        print(f"stackops: {part} failed: {_last_line(report.error_message)}", file=sys.stderr)
    if len(failed) > most:
        print(f"stackops: and {len(failed) - most} more failed", file=sys.stderr)


def _cmd_rerun(args: Any) -> int:
    target = _load_job_or_cluster(args.job_id, args.base_dir)
    if isinstance(target, Cluster):
        if not args.failed:
            raise ConfigError(f"{args.job_id} is a cluster: rerun --failed runs its failed parts "
                              "again")
        with target:
            for host, job_id in target.rerun_failed(args.fresh).items():
                print(f"{host}: rerun as job {job_id} with {_code_note(target.machines[host])}")
            return _wait_cluster(target) if args.wait else 0
    if isinstance(target, RemoteMachine) and args.failed:
        with target:
            tasks = {task_id: None for task_id in target.rerun_failed_tasks(args.fresh)}
            for task in target.array_tasks():
                if task.job_id in tasks:
                    print(f"rerun task as job {task.job_id} with {_code_note(task)}")
            return _wait_for({target.job_id: target}) if args.wait else 0
    if args.failed or isinstance(target, _CloudUnits):
        raise ConfigError("--failed is for a cluster id" if args.failed
                          else "a cloud queue's units are not rerun")
    if isinstance(target, Sweep):
        raise ConfigError(f"{args.job_id} is a sweep: rerun its jobs by their ids "
                          f"({args.job_id}-0000, ...)")
    with target:
        again = target.rerun(fresh=args.fresh)
        with again:
            print(f"job {target.job_id} rerun as job {again.job_id} with {_code_note(again)}")
            if not args.wait:
                return 0
            with _suppress(JobFailedError):
                again.wait(download=False)
            report = again.get_status(0)
    print(f"job {again.job_id} {report.status}")
    return 0 if report.status == "completed" else 1


def _code_note(machine: RemoteMachine) -> str:
    """Which code a rerun runs, as the CLI says it."""
    if not machine.config.copy_repo:
        return "the repo in place, as it is now"
    identity = machine.job_params.code_snapshot[:12]
    if machine.pinned:
        return f"its own snapshot {identity}"
    return f"the code as it is now (snapshot {identity})"


def _cmd_start(args: Any) -> int:
    with RemoteMachine.load(args.job_id, args.base_dir) as machine:
        if machine.launcher_pid is not None or machine.slurm_job_id is not None:
            raise ConfigError(f"job {machine.job_id} was already started",
                              hint=f"{_prog()} rerun {machine.job_id} runs it again")
        if not machine.submitted:
            raise ConfigError(f"job {machine.job_id} was never completely submitted; nothing to "
                              "start")
        machine.fire(True)
        report = machine.get_status(0)
    print(f"job {machine.job_id} {report.status} on {report.host}")
    return 0


def _target_or_folder(job_id: str,
                      base_dir: str) -> RemoteMachine | Cluster | Sweep | _CloudUnits | Path:
    """What ``delete ID`` or ``cancel ID`` acts on: _load_job_or_cluster's, or the folder of a
    job whose record is gone or damaged (_delete_recordless, _cancel_recordless: each says why a
    folder that is neither is left alone)."""
    try:
        return _load_job_or_cluster(job_id, base_dir)
    except StackopsError:
        root = expand_home(f"{base_dir}/queued/{check_safe_name(job_id)}")
        if not os.path.lexists(root) or os.path.lexists(root / SWEEP_JSON):
            raise
        return root


def _print_recordless_deleted(root: Path, results: bool) -> None:
    how = "was gone" if _record_gone(root) else "could not be read"
    removed = _delete_recordless(root, results)
    print(f"deleted {root.name}: its folder {removed}, whose job record {how}")


def _refuse_while_submitted(target: Any) -> None:
    """delete SWEEP while it is still being submitted is refused whole (a member's delete would
    be: _not_submitting), before any member goes."""
    if isinstance(target, Sweep) and target._being_submitted():
        _not_submitting(Path(target.sweep_id), {"sweep_id": target.sweep_id,
                                                "submitting": target._submitting})


def _cmd_delete(args: Any) -> int:
    targets = [_target_or_folder(job_id, args.base_dir) for job_id in args.job_ids]
    for target in targets:
        if isinstance(target, Path):
            _print_recordless_deleted(target, args.results)
            continue
        with target:
            if isinstance(target, RemoteMachine):
                target.delete(results=args.results)
            else:
                _refuse_while_submitted(target)
                _refuse_unended(target)
                for root in _recordless_members(target, target.gone) \
                        if isinstance(target, Sweep) else []:
                    _print_recordless_deleted(root, args.results)
                for member in _members(target):
                    member.delete(results=args.results)
                folder = target.root_dir if isinstance(target, Cluster) else \
                    expand_home(f"{args.base_dir}/queued/{target.job_id}")
                shutil.rmtree(folder, ignore_errors=True)  # its record, once its members went
        print(f"deleted {target.job_id}" + (" and its results" if args.results else ""))
    return 0


def _refuse_unended(target: Any) -> None:
    """Delete a sweep or cluster whole or not at all: refused, before any member goes, while a
    member has not ended or cannot be read (each member's delete would refuse it alone, after
    the ones before it went)."""
    answers = target.check_job_status()
    left = [f"{key} ({value.status})" if isinstance(value, JobStatus) else f"{key} ({value})"
            for key, value in answers.items() if not isinstance(value, JobStatus)
            or not _deletable(value.status)]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise ConfigError(f"{target.job_id}: {', '.join(left[:3])}{more} not ended or not "
                          "readable; nothing deleted", hint=f"{_prog()} cancel {target.job_id}, "
                                                             "then delete it")


def _parse_age(text: str, option: str = "--older-than") -> float:
    match = re.match(r"(\d+(?:\.\d+)?)([smhdw])\Z", text.strip())
    if not match:
        raise ConfigError(f"{option} {text!r} is not an age", hint="e.g. 30m, 12h, 7d, 2w")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match[2]]


def prune_jobs(older_than: float, status: str | None = None, host: str | None = None,
               results: bool = False, base_dir: str | None = None) -> list[str]:
    """Delete the jobs submitted from here that ended more than ``older_than`` seconds ago
    (only ``status`` ones, only on ``host`` when given), each judged where it runs (as ``list``
    judges it: one round trip per host); a job that has not ended is never touched, nor one its
    host cannot confirm. A job folder here whose record is gone reads failed and goes once its
    own state says it ended (never with ``host``: where it ran is not known); an array's task
    goes with its array. Returns the ids deleted."""
    cutoff = _utcnow() - _dt.timedelta(seconds=older_than)
    queued = expand_home(f"{base_dir or DEFAULT_BASE_DIR}/queued")
    rows = list_job_rows(base_dir)
    chosen = [(queued / row["job_id"], row["report"], False) for row in rows
              if not (row["cluster"] or row["as_of"] or row["error"])
              and status in (None, row["report"].status) and host in (None, row["host"])
              and not (row.get("sweep") and (queued / row["sweep"] / REMOTE_MACHINE_JSON).exists())
              and (queued / row["job_id"] / REMOTE_MACHINE_JSON).exists()]
    if host is None and status in (None, "failed"):  # (where one without its record ran: unknown)
        chosen += _recordless_here(queued, {row["job_id"] for row in rows})
    unasked: dict[str, int] = {}
    for row in rows:
        if row["error"] and not row["cluster"] and host in (None, row["host"]):
            unasked[row["host"]] = unasked.get(row["host"], 0) + 1
    for name, count in sorted(unasked.items()):  # (said, not passed over in silence)
        log.warning("not pruned: %d job(s) on %s, which cannot be asked now; prune again once "
                    "it answers", count, name)
    deleted = []
    for root, report, recordless in chosen:
        ended = _parse_iso(report.end_time) if report.finished else None
        if ended is None or ended > cutoff:
            continue
        try:
            if recordless:
                _delete_recordless(root, results)
            else:
                with RemoteMachine.from_job_dir(root) as machine:
                    machine.delete(results=results)
        except StackopsError as exc:
            log.warning("not pruned: %s: %s", root.name, exc)
            continue
        deleted.append(root.name)
    return deleted


def _recordless_here(queued: Path, listed: set[str]) -> list[tuple[Path, JobStatus, bool]]:
    """The job folders here whose record is gone (of those ``list`` has no row for; not an
    array's task), each as status reads it (failed, once its own state record says it ended; one
    that ran on a host as last read there: never judged here, _recordless_reports)."""
    names = sorted(os.listdir(queued)) if queued.is_dir() else []
    roots = [queued / name for name in names if name not in listed
             and not name.startswith(".") and _record_gone(queued / name)]
    found = []
    for root in roots:
        shared = _shared_of(root)
        if shared is None or not (shared / REMOTE_MACHINE_JSON).exists():
            found.append((root, _recordless_reports([root])[root.name], True))
    return found


def _cmd_prune(args: Any) -> int:
    if args.status is not None and args.status not in TERMINAL_STATUSES:
        raise ConfigError(f"--status must be one of {', '.join(TERMINAL_STATUSES)}: only ended "
                          "jobs are pruned")
    deleted = prune_jobs(_parse_age(args.older_than), args.status, args.host, args.results,
                         args.base_dir)
    for job_id in deleted:
        print(f"deleted job {job_id}")
    print(f"{len(deleted)} job(s) deleted", file=sys.stderr)
    return 0


# -- report: a timeline of jobs as one self-contained HTML page -----------------------------------

# The jobs go in as one JSON blob (every "<" escaped), drawn into one SVG whose markup holds only
# numbers and class names; every text (ids, kwargs, errors) reaches the page as textContent.
REPORT_TEMPLATE = r"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy"
content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>stackops report</title><style>
body{font:13px system-ui,sans-serif;margin:12px;color:#222}h1{font-size:16px;margin:0 0 6px}
#head span,#legend span{margin-right:14px}#legend{margin:6px 0}#wrap{overflow-x:auto}
#tl{display:block}text{font-size:11px;fill:#444}.ln{fill:#f3f3f3}.ax{stroke:#ddd}.r{opacity:.4}
.rt{stroke:#000;stroke-dasharray:2 2}.sel{stroke:#000;stroke-width:2}#info{position:fixed;
right:12px;bottom:12px;background:#fff;border:1px solid #aaa;padding:4px 8px;max-width:40em}
#info:empty{display:none}th{text-align:left;padding-right:8px;vertical-align:top;white-space:nowrap}
td{white-space:pre-wrap;word-break:break-all}.s0{fill:#2e9e4f}.s1{fill:#d0342c}.s2{fill:#8a8a8a}
.s3{fill:#2f6fd6}.s4{fill:#e0a800}.s5{fill:#e8c860}.s6{fill:#a070d0}.s7{fill:#555}
</style></head><body><h1 id="title"></h1><div id="head"></div><div id="legend"></div>
<button id="zi">zoom +</button> <button id="zo">zoom &minus;</button><div id="wrap">
<svg id="tl"></svg></div><div id="info"></div>
<script type="application/json" id="data">@@data</script><script>
"use strict";
const $ = i => document.getElementById(i), D = JSON.parse($("data").textContent), J = D.jobs;
const S = D.states, svg = $("tl"), info = $("info"), free = {};
const el = (tag, text, parent) => parent.appendChild(Object.assign(document.createElement(tag),
  {textContent: text}));
const most = (list, f) => list.reduce((m, x) => Math.max(m, f(x)), 0);
const stop = j => j[5] ?? (j[6] < 3 ? j[4] ?? j[3] : D.now);  // not ended: now
const begin = j => Math.min(...[j[4], ...j[15].map(r => r[0])].filter(t => t !== null));
const dur = s => s < 60 ? s.toFixed(1) + "s" : s < 3600 ? Math.floor(s / 60) + "m" +
  Math.floor(s % 60) + "s" : Math.floor(s / 3600) + "h" + Math.floor(s % 3600 / 60) + "m";
const gap = (a, b) => a === null || b === null ? null : dur(b - a);
const at = t => t === null ? null : new Date((D.t0 + t) * 1000).toISOString().replace(".000", "");
const label = J.map(j => j[1] + " " + (j[2] ?? "waiting"));  // no slot: packed by start below
J.map((j, i) => i).filter(i => J[i][2] === null && begin(J[i]) < Infinity)
  .sort((a, b) => begin(J[a]) - begin(J[b])).forEach(i => {
    const j = J[i], ends = free[j[1]] = free[j[1]] || [];
    let k = ends.findIndex(e => e <= begin(j));
    k = k < 0 ? ends.push(0) - 1 : k;
    ends[k] = Math.max(begin(j), stop(j)); label[i] = j[1] + " #" + (k + 1); });
const lanes = [...new Set(label)].sort((a, b) => a.localeCompare(b, undefined, {numeric: true}));
const index = new Map(lanes.map((s, k) => [s, k])), lane = label.map(s => index.get(s));
const n = lanes.length, span = Math.max(most(J, stop), .001);
const runs = J.flatMap(j => [[j[4], stop(j)], ...j[15]]).filter(r => r[0] !== null && r[1] !== null)
  .map(r => r.slice(0, 2));
const busy = runs.reduce((s, r) => s + r[1] - r[0], 0);
const took = most(runs, r => r[1]) - runs.reduce((m, r) => Math.min(m, r[0]), Infinity);
const slots = lanes.filter(s => !s.endsWith(" waiting")).length;
document.title = $("title").textContent = D.title;
for (const [k, v] of [["jobs", J.length], ...S.map((s, k) => [s, J.filter(j => j[6] === k).length])
  .filter(c => c[1]), ["wall time", dur(span)], ["run time", dur(busy)], ["slot utilisation",
  took > 0 ? Math.round(100 * busy / slots / took) + "% of " + slots + " lanes" : "-"],
  ["generated", at(D.now)]]) el("b", k + " ", el("span", "", $("head"))).after(String(v));
for (const k of [...new Set(J.map(j => j[6]))].sort()) { const e = el("span", "", $("legend"));
  e.innerHTML = '<svg width="9" height="9"><rect class="s' + k + '" width="9" height="9"/></svg> ';
  e.append(S[k]); }
if (J.some(j => j[15].length || parseInt(j[7]) > 1))
  el("span", "dashed edge: run again (retried, requeued); faint: its earlier runs", $("legend"));
const L = 170, H = n > 400 ? 4 : n > 150 ? 8 : n > 24 ? 18 : 26, pad = H > 9 ? 2 : .5;
let zoom = 1, pinned = null;
function draw() {
  const W = Math.max(400, innerWidth - L - 40) * zoom, m = [], thin = [], faint = [], bars = [];
  const x = t => (L + t / span * W).toFixed(1);
  const bar = (c, i, a, b, min, y, h) => '<rect class="' + c + '" data-i="' + i + '" x="' +
    x(a) + '" y="' + y + '" width="' + Math.max(min, (b - a) / span * W).toFixed(1) +
    '" height="' + h + '"/>';
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200]
    .find(s => s / span * W >= 110) || 86400 * Math.ceil(110 * span / W / 86400);
  for (let t = 0; t <= span; t += step) { const c = new Date((D.t0 + t) * 1000).toISOString();
    m.push('<line class="ax" x1="' + x(t) + '" x2="' + x(t) + '" y1="14" y2="' + (20 + n * H) +
      '"/><text x="' + x(t) + '" y="11">' + c.slice(span < 86400 ? 11 : 5, 19) + "</text>"); }
  for (let k = 0; k < n; k++) m.push((k % 2 ? '<rect class="ln" x="0" y="' + (20 + k * H) +
    '" width="' + (L + W) + '" height="' + H + '"/>' : "") +
    (H > 9 ? '<text class="lb" x="2" y="' + (15 + k * H + H) + '"></text>' : ""));
  J.forEach((j, i) => { const y = 20 + lane[i] * H, open = j[4] === null;
    if (j[3] !== null) thin.push(bar("w s" + j[6], i, j[3], open ? stop(j) : j[4], 1,
      y + H / 2 - (open ? 2 : 1), open ? 4 : 2));
    for (const r of j[15]) if (r[0] !== null) faint.push(bar("r s" + r[2], i, r[0], r[1] ?? r[0],
      2, y + pad, H - 2 * pad));
    if (!open) bars.push(bar("b s" + j[6] + (j[15].length || parseInt(j[7]) > 1 ? " rt" : ""), i,
      j[4], stop(j), 2, y + pad, H - 2 * pad)); });
  svg.setAttribute("width", L + W + 10); svg.setAttribute("height", 24 + n * H);
  svg.innerHTML = m.join("") + thin.join("") + faint.join("") + bars.join("");
  svg.querySelectorAll("text.lb").forEach((t, k) => { t.textContent = lanes[k].slice(0, 28); });
  pinned = null; info.replaceChildren(); }
function show(i) { const j = J[i], t = document.createElement("table"), end = j[6] < 3;
  const before = j[15].map(r => S[r[2]] + (r[3] === null ? "" : " exit " + r[3]) +
    (r[4] === null ? "" : " signal " + r[4]) + " " + (gap(r[0], r[1]) || ""));
  for (const [k, v] of [["job", j[0]], ["group", j[14]], ["lane", lanes[lane[i]]],
    ["status", S[j[6]]], ["attempt", j[7]], ["submitted", at(j[3])], ["started", at(j[4])],
    ["ended", at(j[5])], ["waited", gap(j[3], j[4])],
    [end ? "duration" : "so far", gap(j[4], stop(j))],
    ["exit code", j[8]], ["signal", j[9]], ["peak memory", j[10] === null ? null
      : (j[10] / 2 ** 20).toFixed(1) + " MiB"], ["cpu time", j[11] === null ? null : dur(j[11])],
    ["call", j[13]], ["error", j[12]], ["earlier runs", before.join("; ") || null]])
    if (v !== null) { const r = el("tr", "", t); el("th", k, r); el("td", String(v), r); }
  info.replaceChildren(t); }
svg.addEventListener("mouseover", e => {
  if (!pinned && e.target.dataset.i) show(e.target.dataset.i); });
svg.addEventListener("mouseout", () => { if (!pinned) info.replaceChildren(); });
svg.addEventListener("click", e => { if (pinned) pinned.classList.remove("sel");
  pinned = e.target.dataset.i ? e.target : null; if (!pinned) return info.replaceChildren();
  pinned.classList.add("sel"); show(pinned.dataset.i); });
$("zi").onclick = () => { zoom *= 2; draw(); };
$("zo").onclick = () => { zoom = Math.max(1, zoom / 2); draw(); };
draw();
requestAnimationFrame(() => setTimeout(() => {  // drawn: the tests read it
  document.body.dataset.drawnMs = Math.round(performance.now()); }));
</script></body></html>
"""

_REPORT_STATES = ("completed", "failed", "cancelled", "running", "waiting", "queued", "prepared",
                  "unknown")  # the page's colours, in this order; the first three have ended
def _cmd_config(args: Any) -> int:
    path, chosen_by = user_config_location()
    rows = _config_rows(args.host)
    hosts = sorted(read_user_config().get("hosts") or {})
    said = {"STACKOPS_CONFIG": "from STACKOPS_CONFIG", "XDG_CONFIG_HOME": "in XDG_CONFIG_HOME",
            "default": "its default place"}[chosen_by]
    where = f"{collapse_home(path)} ({said}" + ("" if path.exists() else "; there is none") + ")"
    if args.json:
        _print_json({"file": collapse_home(path), "chosen_by": chosen_by,
                     "exists": path.exists(), "host": args.host or "localhost", "hosts": hosts,
                     "settings": [{"setting": name, "value": value, "from": source}
                                  for name, value, source in rows]})
        return 0
    print(f"config file  {where}")
    print(f"settings of  {args.host or 'localhost'} jobs" + (
        "" if args.host is None or args.host in hosts else " (no entry of its own)"))
    _print_table([[name, value if isinstance(value, str) else json.dumps(value), source]
                  for name, value, source in rows], ["SETTING", "VALUE", "FROM"])
    if hosts:
        print(f"hosts with an entry: {', '.join(hosts)} (stackops config --host H)")
    return 0


def _config_rows(host: str | None) -> list[tuple[str, Any, str]]:
    """Each setting for jobs on ``host`` (None: here): (name, value, where it comes from)."""
    path = user_config_location()[0]
    found = _user_settings_from(host or "localhost")
    data = read_user_config()
    text = path.read_text(encoding="utf-8") if data else ""
    here = host in (None, "localhost")
    python = collapse_home(sys.executable) if here else "python3"
    builtin = {"max_jobs": 1, "python": python, "copy_repo": False, "slurm": "-", "env": "-",
               "default_email_address": "-", "default_email_config": "-"}
    for key in ("default_email_address", "default_email_config"):
        if key in data:
            found[key] = (data[key], [key])
    rows = []
    for key, default in builtin.items():
        names = [name for name in found if name == key or name.startswith(key + ".")]
        for name in names:
            value, keys = found[name]
            line = _json_key_line(text, keys)
            rows.append((name, value, f"{collapse_home(path)}:{line} {'.'.join(keys)}"))
        if not names:
            rows.append((key, default, "not set" if default == "-" else "built-in default"))
    return rows


def render_report(rows: list[dict[str, Any]], title: str) -> str:
    """One self-contained HTML page (it fetches nothing) that draws ``rows`` as a timeline (see
    docs/report.md). A row is a plain dict; any key may be missing or None, and a value of the
    wrong type is left out. ``job_id``, ``host``; ``slot`` ("slot-0", "gpu-1", a Slurm task;
    without one, the host's jobs are packed into lanes); ``group`` (its sweep, cluster or array);
    ``status`` (completed, failed, cancelled, running, waiting, queued, prepared); ``submitted``,
    ``started``, ``ended`` (ISO-8601; without a zone, UTC); ``attempt`` ("2/3"); ``exit_code``,
    ``signal``, ``max_rss_bytes`` (ints); ``cpu_seconds``; ``error`` (the error's last line);
    ``call`` (the kwargs as compact JSON, or the command line); ``runs``, the earlier runs
    (retries, requeues), each a dict of ``started``, ``ended``, ``status``, ``exit_code``,
    ``signal``. Texts reach the page as inert text: one JSON blob, every ``<`` in it escaped."""
    now = _utcnow().timestamp()
    jobs = [_report_job(row if isinstance(row, dict) else {}) for row in rows]
    times = [t for job in jobs for t in (*job[3:6], *(t for run in job[15] for t in run[:2]))
             if t is not None]
    t0 = min(times, default=now)
    for job in jobs:  # seconds since the first time on the page
        for part, ends in [(job, slice(3, 6)), *((run, slice(0, 2)) for run in job[15])]:
            part[ends] = [None if t is None else round(t - t0, 3) for t in part[ends]]
    data = {"title": str(title), "t0": t0, "now": round(now - t0, 3), "states": _REPORT_STATES,
            "jobs": jobs}
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return render_template(REPORT_TEMPLATE, data=blob.replace("<", "\\u003c"))


def _report_job(row: dict[str, Any]) -> list[Any]:
    """A row as the page reads it: id, host, slot, submitted, started, ended (seconds since the
    epoch), state, attempt, exit code, signal, peak RSS, CPU s, error, call, group, earlier runs
    (started, ended, state, exit code, signal)."""
    def seconds(value: Any) -> float | None:
        moment = _parse_iso(value.replace("Z", "+00:00")) if isinstance(value, str) else None
        if moment is not None and moment.tzinfo is None:
            moment = moment.replace(tzinfo=_dt.timezone.utc)
        return moment.timestamp() if moment is not None else None

    def number(value: Any) -> Any:
        plain = isinstance(value, (int, float)) and not isinstance(value, bool)
        return value if plain and -1e18 < value < 1e18 else None  # neither NaN nor infinite

    def state(value: Any) -> int:
        return _REPORT_STATES.index(value) if value in _REPORT_STATES else len(_REPORT_STATES) - 1

    text = [None if row.get(key) in (None, "") else _shorten(str(row[key]), 120)  # 10,000 in 5 MB
            for key in ("job_id", "host", "slot", "attempt", "error", "call", "group")]
    runs = [[seconds(run.get("started")), seconds(run.get("ended")), state(run.get("status")),
             number(run.get("exit_code")), number(run.get("signal"))]
            for run in row.get("runs") or [] if isinstance(run, dict)]
    return [text[0] or "?", text[1] or "?", text[2],
            *(seconds(row.get(key)) for key in ("submitted", "started", "ended")),
            state(row.get("status")), text[3],
            *(number(row.get(key)) for key in ("exit_code", "signal", "max_rss_bytes",
                                               "cpu_seconds")), *text[4:], runs]


def _report_rows(ids: list[str], last: int | None, host: str | None, base_dir: str,
                 timeout: float = 10.0) -> list[dict[str, Any]]:
    """render_report's rows: the jobs of ``ids`` in their order (jobs, sweeps, clusters, Slurm
    arrays, cloud jobs; an unknown id is refused), else the ``last`` newest (of ``host``), the
    oldest first. Built from today's views; the engine's JobStatus fields are read if there."""
    members: dict[str, tuple[str | None, str | None]] = {}  # job id: (its group, its slot)
    for job_id in ids:
        with _load_job_or_cluster(job_id, base_dir) as target:
            members.update(_report_members(target))
    listed = [row for row in list_job_rows(base_dir, timeout)  # newest first
              if (not ids or row["job_id"] in members) and host in (None, row["host"])]
    if host is not None and not listed:
        raise ConfigError(f"no jobs on host {host!r} here", hint=f"{_prog()} list shows the jobs")
    listed = listed[last - 1::-1] if last else listed[::-1]
    place = {job_id: k for k, job_id in enumerate(members)}
    listed.sort(key=lambda row: place.get(row["job_id"], 0))  # by index in a sweep or array
    roots = {os.path.basename(root): Path(root) for root, _ in _job_folders(base_dir)}
    rows = []
    for row in listed:
        report, (group, slot) = row["report"], members.get(row["job_id"], (row["cluster"], None))
        new = {name: getattr(report, name, None)  # the fields the engine's JobStatus adds
               for name in ("exit_code", "signal", "max_rss_bytes", "cpu_seconds", "slot", "runs")}
        rows.append(dict(new, job_id=report.job_id, host=row["host"], group=group,
                         slot=new["slot"] or slot, status=report.status, attempt=report.attempt,
                         submitted=report.submission_time, started=report.start_time,
                         ended=report.end_time, error=_last_line(report.error_message),
                         call=_report_call(roots.get(row["job_id"]))))
    return rows


def _report_members(target: Any) -> dict[str, tuple[str | None, str | None]]:
    """{job id: (group, slot)} of what an id names (an array's tasks are its slots)."""
    if isinstance(target, RemoteMachine) and not target.array_parts:
        return {target.job_id: (None, None)}
    tasks = isinstance(target, RemoteMachine)
    return {job.job_id: (target.job_id, f"task-{k}" if tasks else None)
            for k, job in enumerate(_members(target))}


def _report_call(root: Path | None) -> str | None:
    """A job's kwargs as compact JSON, from its folder."""
    with _suppress(OSError, ValueError, TypeError):
        kwargs = json.loads((root / KWARGS_JSON).read_text(encoding="utf-8"))  # type: ignore
        return json.dumps(kwargs, ensure_ascii=False, separators=(",", ":"))
    return None


def _cmd_report(args: Any) -> int:
    if bool(args.job_ids) == bool(args.last or args.host) or (args.last or 1) < 1:
        raise ConfigError("report needs IDs, or --last N (N >= 1) and/or --host H",
                          hint=f"e.g. {_prog()} report SWEEP_ID -o sweep.html")
    output = None if args.output == "-" else Path(args.output).expanduser()
    where = "-o FILE.html in a folder of yours that exists (- for stdout)"
    if output is not None and (output.is_dir() or not output.parent.is_dir() or not os.access(
            output if output.exists() else output.parent, os.W_OK)):
        raise ConfigError(f"cannot write the report to {args.output}", hint=where)
    rows = _report_rows(args.job_ids, args.last, args.host, args.base_dir, args.timeout)
    what = " ".join(args.job_ids) or f"the last {args.last or len(rows)} jobs"
    page = render_report(rows, f"stackops: {what}" + (f" on {args.host}" if args.host else ""))
    if output is None:
        sys.stdout.write(page)
        return 0
    try:
        _atomic_write_text(output, page, 0o644)
    except OSError as exc:  # a folder that takes no new file (/proc), a full disk
        raise StackopsError(f"cannot write the report to {args.output}: "
                            f"{exc.strerror or exc}", hint=where) from exc
    print(f"{collapse_home(output)}: {len(rows)} jobs, {len(page.encode()) / 1e3:,.0f} kB")
    return 0


def _add_progress_arg(sub: Any) -> None:
    """``--progress json`` on the commands that transfer (see _Progress)."""
    sub.add_argument("--progress", choices=("auto", "json"), default="auto",
                     help="auto: a progress line on a terminal, else a summary per transfer "
                          "longer than a second (none with -q); json: one JSON object a line "
                          "on stderr (begin, progress, end), for tools that wrap stackops")


def _progress(args: Any) -> _Progress | None:
    """How the command line shows transfers: see _Progress; nothing with -q (but json)."""
    mode = getattr(args, "progress", "auto")
    if mode == "json":
        return _Progress("json")
    level = args.verbose + getattr(args, "verbose_after", 0)
    if level - args.quiet - getattr(args, "quiet_after", 0) < 0:
        return None
    return _Progress("line" if sys.stderr.isatty() else "summary")


class _Progress:
    """The CLI's side of a transfer's progress (the library calls ``begin``, then the callback
    with the bytes done, then ``end``: see _Meter), on stderr. ``line``: on a terminal, percent
    of the known total, rate and time left, cleared when the transfer ends; ``summary``: one line
    per transfer that took over a second; ``json``: one object a line."""

    def __init__(self, mode: str) -> None:
        self.mode, self.what = mode, ""
        self.total: int | None = None
        self.started = self.shown = 0.0
        self.done = 0

    def begin(self, what: str, total: int | None) -> None:
        if what != self.what or not self.started:  # a second begin only tells the total
            self.what, self.started, self.done = what, time.monotonic(), 0
            self._json("begin")
        self.total = total

    def __call__(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.shown < (0.5 if self.mode == "json" else 0.2):
            return
        self.shown = now
        if self.mode == "json":
            self._json("progress")
        elif self.mode == "line":
            width = max(shutil.get_terminal_size().columns - 1, 20)
            sys.stderr.write("\r\x1b[K" + self._line(now, width))
            sys.stderr.flush()

    def end(self, done: int, ok: bool) -> None:
        self.done = done
        elapsed = time.monotonic() - self.started
        if self.mode == "json":
            self._json("end", ok=ok)
        elif self.mode == "line":
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        elif ok and elapsed > 1.0:
            print(f"stackops: {self.what}: {_mib(done)} in {elapsed:.1f} s "
                  f"({_mib(done / elapsed)}/s)", file=sys.stderr)
        self.started = 0.0

    def _line(self, now: float, width: int) -> str:
        """The line, at most ``width`` wide: the sizes go first, then the rate, then the name
        shrinks; the percent and the time left stay. No rate (nor time left) in the first second,
        where a few buffered bytes would say gigabytes a second."""
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed >= 1.0 else 0.0
        rate_text = f"{_mib(rate)}/s" if rate else ""
        parts = {"percent": "", "sizes": _mib(self.done), "rate": rate_text, "left": ""}
        if self.total:
            parts["percent"] = f"{min(100.0, 100.0 * self.done / self.total):3.0f}%"
            parts["sizes"] += f" of {_mib(self.total)}"
        if self.total and rate:
            seconds = int(max(self.total - self.done, 0) / rate)
            parts["left"] = f"{seconds // 60}:{seconds % 60:02d} left"
        for dropped in ((), ("sizes",), ("sizes", "rate")):
            tail = "  ".join(text for key, text in parts.items() if text and key not in dropped)
            if len(self.what) + len(tail) + 4 <= width:
                return f"  {self.what}  {tail}"
        room = max(width - len(tail) - 4, 8)
        return _shorten(f"  {_squeeze(self.what, room)}  {tail}", width)

    def _json(self, event: str, **extra: Any) -> None:
        if self.mode != "json":
            return
        elapsed = time.monotonic() - self.started
        record = {"event": event, "what": self.what, "done": self.done, "total": self.total,
                  "elapsed": round(elapsed, 3), "rate": round(self.done / max(elapsed, 1e-6)),
                  **extra}
        print(json.dumps(record), file=sys.stderr, flush=True)


def _squeeze(text: str, width: int) -> str:
    """``text`` in ``width`` characters, its middle given up first (a path's end says most)."""
    if len(text) <= width:
        return text
    head = max((width - 3) // 3, 1)
    return text[:head] + "..." + text[len(text) - (width - 3 - head):]


def _mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def _cmd_ssh(args: Any) -> int:
    command = " ".join(args.command) if len(args.command) != 1 else args.command[0]
    if not command:
        raise ConfigError("no command given", hint=f"{_prog()} ssh HOST -- COMMAND")
    connect = {"timeout": args.timeout} if args.timeout else {}  # also the most connecting may take
    with SSH.from_config_file(args.host, accept_new_host_key=args.accept_new, **connect) as ssh:
        response = ssh.run_shell_cmd_on_remote(command, timeout=args.timeout, strict=False)
    sys.stdout.write(response.stdout)
    sys.stderr.write(response.stderr)
    return response.returncode


_REMOTE_ARG = _LazyPattern(r"(?P<host>[^/:\s]+):(?P<path>.*)\Z")


def _split_remote(text: str) -> tuple[str, str] | None:
    match = _REMOTE_ARG.match(text)
    if match is None or os.path.exists(text):
        return None
    return match["host"], match["path"] or "~"


def _cmd_copy(args: Any) -> int:
    target = _split_remote(args.target)
    sides = [side for side in (_split_remote(args.source), target) if side is not None]
    if len(sides) != 1:
        raise ConfigError("copy needs exactly one side on a host (HOST:PATH) and one here",
                          hint="e.g. copy ./results gpu-box:~/backup -r, or copy gpu-box:~/x ./x")
    host, path = sides[0]
    with SSH.from_config_file(host, accept_new_host_key=args.accept_new) as ssh:
        if target is not None:
            remote = path + (Path(args.source).name if path.endswith("/") else "")
            where = ssh.copy_from_here(args.source, remote, args.compress, args.recursive,
                                       args.overwrite, _progress(args))
            print(f"{host}:{where}")
        else:
            local = args.target + (Path(path).name if args.target.endswith("/") else "")
            print(collapse_home(ssh.copy_to_here(path, local, args.compress, args.recursive,
                                                 args.overwrite, _progress(args))))
    return 0


def _cmd_send_key(args: Any) -> int:
    try:
        ssh = SSH.from_config_file(args.host, accept_new_host_key=args.accept_new)
    except StackopsConnectionError as exc:  # a password-only host is what send-key is for
        refused = isinstance(exc.__cause__, _paramiko().AuthenticationException)
        if not refused or not sys.stdin.isatty():
            raise
        import getpass

        prompt = f"{args.host}: key login failed; password (used once, to install the key): "
        password = getpass.getpass(prompt)
        ssh = SSH.from_config_file(args.host, accept_new_host_key=args.accept_new,
                                   password=password)
    with ssh:
        added = ssh.send_ssh_key(args.key)
    print(f"key {'added to' if added else 'already in'} {args.host}:~/.ssh/authorized_keys")
    return 0


def _cmd_cluster_run(args: Any) -> int:
    config = RemoteStackOpsConfig(parallelize=args.parallelize, data=args.data,
                                  accept_new_host_key=args.accept_new, **_given_settings(args))
    threads = ThreadLoadCalculator(args.threads, LoadCriterion[args.criterion])
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    target = _run_target(args)
    with Cluster(target, hosts, config, parse_kwargs(args.kwargs), threads, not args.strict,
                 args.description, args.job_id, args.base_dir, args.max_num) as cluster:
        cluster.run()
        for host, error in cluster.unavailable.items():
            print(f"left out {host}: {_last_line(error)}", file=sys.stderr)
        _print_table([[host, f"{wp.idx_start}..{wp.idx_end}", str(wp.jobs)]
                      for host, wp in cluster.workloads.items()], ["HOST", "SHARE", "THREADS"])
        print(f"cluster {cluster.job_id} launched on {len(cluster.machines)} host(s); "
              f"{_prog()} cluster status {cluster.job_id}")
        if args.wait:
            return _wait_cluster(cluster, args.host_timeout)
    return 0


def _wait_cluster(cluster: Cluster, host_timeout: float = 120.0) -> int:
    """Follow every host's job until it ends, saying on stderr what it waits for; a host that has
    not answered for ``host_timeout`` seconds is given up (reported, and the exit status is 1)."""
    import threading

    jobs = ", ".join(f"{m.job_id} on {host}" for host, m in cluster.machines.items())
    print(f"stackops: waiting for {len(cluster.machines)} job(s) to end: {jobs}; a host that "
          f"does not answer for {host_timeout:g}s is given up (Ctrl-C stops waiting, the jobs "
          "go on)", file=sys.stderr)
    answers: dict[str, Any] = {}  # each host's latest answer: a JobStatus, or the error instead
    heard = dict.fromkeys(cluster.machines, time.monotonic())  # when it last answered
    given_up: dict[str, StackopsError] = {}
    polls: dict[str, threading.Thread] = {}

    def poll(host: str) -> None:
        try:
            answers[host] = cluster.machines[host].get_status(0)
            heard[host] = time.monotonic()
        except Exception as exc:  # an unreachable host answers with its error
            answers[host] = exc

    waiting = set(cluster.machines)
    while waiting:
        for host in waiting:
            if host not in polls or not polls[host].is_alive():
                polls[host] = threading.Thread(target=poll, args=(host,), daemon=True)
                polls[host].start()
        time.sleep(0.5)
        for host in sorted(waiting):
            answer = answers.get(host)
            if isinstance(answer, JobStatus) and answer.finished:
                waiting.discard(host)
                print(f"stackops: {host}: job {answer.job_id} {answer.status}", file=sys.stderr)
            elif (silent := time.monotonic() - heard[host]) > host_timeout:
                waiting.discard(host)
                why = _last_line(str(answer)) if isinstance(answer, Exception) else "no answer"
                print(f"stackops: {host}: giving up, unreachable for {silent:.0f}s ({why})",
                      file=sys.stderr)
                given_up[host] = StackopsConnectionError(f"unreachable for {silent:.0f}s: {why}")
    return _show_cluster(cluster, {**answers, **given_up}, as_json=False)


def _show_cluster(cluster: Cluster, statuses: dict[str, Any], as_json: bool) -> int:
    if as_json:
        _print_json({host: s.to_dict() if isinstance(s, JobStatus) else {"error": str(s)}
                     for host, s in statuses.items()})
    else:
        rows = []
        for host, status in statuses.items():
            wp = cluster.workloads.get(host)
            share = f"{wp.idx_start}..{wp.idx_end}" if wp else "-"
            if isinstance(status, JobStatus):
                rows.append([host, share, status.status, _duration(status),
                             _last_line(status.error_message) or "-"])
            else:
                rows.append([host, share, "unreachable", "-", _last_line(str(status))])
        rows += [[host, "-", "left out", "-", _last_line(error)] for host,
                 error in cluster.unavailable.items()]
        _print_table(rows, ["HOST", "SHARE", "STATUS", "DURATION", "ERROR"])
    ok = all(isinstance(s, JobStatus) and s.status != "failed" for s in statuses.values())
    return 0 if ok else 1


def _cmd_cluster_status(args: Any) -> int:
    with Cluster.load(args.cluster_id, args.base_dir) as cluster:
        return _show_cluster(cluster, cluster.check_job_status(), args.json)


def _cmd_cluster_download(args: Any) -> int:
    with Cluster.load(args.cluster_id, args.base_dir) as cluster:
        print(collapse_home(cluster.download_results(args.to)))
    return 0


def _cmd_cluster_logs(args: Any) -> int:
    with Cluster.load(args.cluster_id, args.base_dir) as cluster:
        hosts = list(cluster.machines)
        if args.part is None and args.follow and len(hosts) > 1:
            raise ConfigError("-f follows one part: name it with --part",
                              hint=f"parts: {', '.join(hosts)}")
        if args.part is not None:
            numbered = args.part.isdigit() and 0 < int(args.part) <= len(hosts)
            chosen = hosts[int(args.part) - 1] if numbered else args.part
            if chosen not in cluster.machines:
                raise ConfigError(f"cluster {cluster.job_id} has no part {args.part!r}",
                                  hint=f"parts: {', '.join(hosts)} (or 1 to {len(hosts)})")
            hosts = [chosen]
        machines = {host: cluster.machines[host] for host in hosts}
        names = {machine.job_id: f"{host} ({machine.job_id})" for host, machine in machines.items()}
        return _follow_logs(list(machines.values()), args, names if len(hosts) > 1 else None)


def _add_cluster_args(cluster: Any) -> None:
    sub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION")
    sub.required = True
    default_base = DEFAULT_BASE_DIR.rsplit("/", 1)[0]
    for name, handler, text in (
            ("run", _cmd_cluster_run,
             "launch a function on several hosts, each on its share of [0, MAX)"),
            ("status", _cmd_cluster_status, "one line per host: share, status, times"),
            ("download", _cmd_cluster_download, "every host's results into one folder"),
            ("logs", _cmd_cluster_logs, "a part's output (every part's, without --part)")):
        action = sub.add_parser(name, help=text)
        action.set_defaults(handler=handler)
        if name == "run":
            _add_cluster_run_args(action)
        else:
            action.add_argument("cluster_id", help="the cluster's id")
        if name == "status":
            action.add_argument("--json", action="store_true")
        elif name == "download":
            action.add_argument("--to",
                                help="the local folder (default: the cluster's results folder)")
        elif name == "logs":
            action.add_argument("--part", metavar="K",
                                help="the part: its host, or its number (1, 2, ...)")
            action.add_argument("-f", "--follow", action="store_true",
                                help="keep printing while the part runs")
            action.add_argument("-n", "--lines", type=int, metavar="N", help=_LINES_HELP)
        action.add_argument("--base-dir", default=default_base,
                            help=f"where clusters live (default {default_base})")


def _add_cluster_run_args(run: Any) -> None:
    _add_target_arg(run, "cluster run", "path/to/module.py:func; it gets workload_params (its "
                                        "slice) and the kwargs. Or after -- a command: its slice "
                                        "is in STACKOPS_IDX_START and STACKOPS_IDX_END")
    run.add_argument("--hosts", required=True,
                     help="comma-separated ~/.ssh/config aliases or user@host[:port]")
    run.add_argument("--kwargs", default="{}", metavar="JSON",
                     help="keyword arguments (JSON object or @file)")
    run.add_argument("--criterion", default="cpu", choices=[c.name for c in LoadCriterion],
                     help="what a host's share and threads follow (default cpu)")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="parts a host like this one runs; others scale by the criterion "
                          "(default 1)")
    run.add_argument("--parallelize", action="store_true",
                     help="run each host's parts in parallel processes, at most one per CPU "
                          "of the host")
    run.add_argument("--max-num", type=int, default=1000,
                     help="the index range [0, MAX) to split (default 1000)")
    run.add_argument("--strict", action="store_true",
                     help="refuse to launch anywhere if a host is unreachable")
    _add_setting_args(run, "slots per host", "each job runs its own snapshot of the repo")
    run.add_argument("--data", action="append", default=[], metavar="PATH",
                     help="sync a file or folder to the same place on every host (only files "
                          "that differ travel)")
    run.add_argument("--accept-new", action="store_true", help="trust and record unknown host keys")
    run.add_argument("--job-id", help="the cluster's id (a safe name)")
    run.add_argument("--description", default="")
    run.add_argument("--wait", action="store_true",
                     help="block until every host's job ended (exit status 1 if one failed or a "
                          "host stayed unreachable)")
    run.add_argument("--host-timeout", type=float, default=120.0, metavar="SECONDS",
                     help="with --wait: give up on a host silent this long (default 120)")


def _cmd_cloud_submit(args: Any) -> int:
    allowed = [w.strip() for w in args.allowed.split(",")] if args.allowed else None
    config = RemoteStackOpsConfig(job_id=args.job_id or _random_job_id(), copy_repo=args.copy_repo,
                                  transfer_method="cloud", cloud_name=args.cloud,
                                  launch_method="cloud_manager",
                                  allowed_remotes=allowed, python=args.python,
                                  workload_params=_parse_workload(args.workload or "0:1000"))
    units = RemoteMachine(_run_target(args), config,
                          parse_kwargs(args.kwargs)).submit_to_cloud(args.split)
    print(f"queued {len(units)} unit(s) on {cloud_base(args.cloud)}/units: {', '.join(units)}")
    return 0


def _cmd_cloud_status(args: Any) -> int:
    rows = CloudQueue(args.cloud).report()
    if args.json:
        _print_json(rows)
        return 0
    _print_table([[r["unit"], r["state"], r.get("worker") or "-", r.get("host") or "-",
                   _format_duration(r["duration_seconds"])
                   if r.get("duration_seconds") is not None else
                   (f"seen {r['last_seen_seconds']}s ago" if "last_seen_seconds" in r else "-")]
                  for r in rows],
                 ["UNIT", "STATE", "WORKER", "HOST", "DURATION"])
    return 0


def _cmd_worker(args: Any) -> int:
    done = run_worker(args.cloud, args.name, args.max_jobs, args.poll, args.until_idle, args.settle,
                      args.lease)
    print(f"worker finished {done} unit(s)")
    return 0


def _add_cloud_args(cloud: Any) -> None:
    sub = cloud.add_subparsers(dest="cloud_command", metavar="ACTION")
    sub.required = True
    submit = sub.add_parser("submit", help="split a job into work units and queue them on the "
                                           "cloud remote")
    submit.set_defaults(handler=_cmd_cloud_submit)
    _add_target_arg(submit, "cloud submit", "path/to/module.py:func (or a script, with --split "
                                            "1), or after -- a command: each unit's slice is in "
                                            "STACKOPS_IDX_START and STACKOPS_IDX_END")
    submit.add_argument("--cloud", required=True, metavar="REMOTE[:PATH]", help="the rclone remote")
    submit.add_argument("--split", type=int, required=True, help="how many work units")
    submit.add_argument("--kwargs", default="{}", metavar="JSON")
    submit.add_argument("--workload", metavar="START:END[:PARTS]",
                        help="the range to split (default 0:1000)")
    submit.add_argument("--copy-repo", action="store_true", help="the units carry the repo")
    submit.add_argument("--allowed", metavar="W1,W2", help="only these workers may run the units")
    submit.add_argument("--python", help="interpreter on the workers (default python3)")
    submit.add_argument("--job-id")
    status = sub.add_parser("status", help="each unit: queued, running (where), stale, completed "
                                           "or failed")
    status.set_defaults(handler=_cmd_cloud_status)
    status.add_argument("--cloud", required=True, metavar="REMOTE[:PATH]")
    status.add_argument("--json", action="store_true")


def _add_worker_args(worker: Any) -> None:
    worker.add_argument("--cloud", required=True, metavar="REMOTE[:PATH]")
    worker.add_argument("--max-jobs", type=int, default=1,
                        help="units run at once on this machine (default 1)")
    worker.add_argument("--name", help="this worker's name (default HOST-PID); see --allowed")
    worker.add_argument("--poll", type=float, default=5.0,
                        help="seconds between looks at an idle queue")
    worker.add_argument("--until-idle", action="store_true", help="stop once every unit is done")
    worker.add_argument("--lease", type=float, default=CLOUD_LEASE,
                        help="seconds a silent claim stays valid")
    worker.add_argument("--settle", type=float, default=CLOUD_SETTLE,
                        help="seconds a claim waits for rivals")


def _cmd_ip(args: Any) -> int:
    if args.action == "switch":
        success, address, seen = switch_public_ip_address_with_log(
            args.max_trials, args.wait, args.target or None, args.endpoint, args.timeout)
        if args.json:
            _print_json({"success": success, "ip": address, "attempted": seen})
        else:
            print(f"{'switched to' if success else 'could not switch; last address'} "
                  f"{address or '-'}")
            if seen:
                print("attempted: " + ", ".join(seen))
        return 0 if success else 1
    if args.public:
        info = get_public_ip_address(args.endpoint, 5.0 if args.timeout is None else args.timeout)
        if args.json:
            _print_json(info)
        else:
            _print_table([[key, str(value)] for key, value in info.items()])
        return 0
    table = interface_table()
    lan = choose_lan_ipv4(table, args.prefer_vpn)
    if args.json:
        _print_json({"interfaces": [dataclasses.asdict(row) for row in table],
                     "lan": lan.ipv4_address if lan else None})
        return 0
    _print_table([[row.interface, row.ipv4_address, row.mac_address or "-",
                   "LAN" if row == lan else ""]
                  for row in table], ["INTERFACE", "IPV4", "MAC", ""])
    return 0


def _add_ip_args(sub: Any) -> None:
    sub.add_argument("action", nargs="?", choices=["switch"],
                     help="rotate the public IP with warp-cli")
    sub.add_argument("--public", action="store_true",
                     help="the public address and what is known of it")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--prefer-vpn", action="store_true",
                     help="let VPN/tunnel interfaces compete for the LAN choice")
    sub.add_argument("--endpoint", help="JSON endpoint of the public-IP lookup, http:// or "
                                        "https:// (default: ipinfo CLI or ipinfo.io)")
    sub.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="the most one public-IP lookup (default 5) or one warp-cli call "
                          "(default 30) may take")
    sub.add_argument("--max-trials", type=int, default=10,
                     help="switch: registrations to try (default 10)")
    sub.add_argument("--wait", type=float, default=2.0,
                     help="switch: seconds to wait after each step (default 2)")
    sub.add_argument("--target", action="append", default=[], metavar="IP",
                     help="switch: stop at one of these")


def _add_target_arg(parser: Any, command: str, help_text: str) -> None:
    """TARGET, or else a command after ``--`` (main() takes it off the line: _split_command)."""
    parser.usage = f"stackops {command} [options] (TARGET | -- COMMAND [ARGS...])"
    parser.add_argument("target", nargs="?", help=help_text)


def _add_run_args(parser: Any) -> None:
    _add_ids(parser, None)
    _add_target_arg(parser, "run", "a script (path/to/train.py), a function (path/to/module.py:"
                                   "func), or after -- any command, run in this folder of its repo")
    parser.add_argument("--host", help="run on this SSH host (~/.ssh/config alias or "
                                       "user@host[:port]); default: this machine")
    _add_setting_args(parser, "at most N jobs hold a slot on the machine at once; the rest "
                              "queue", "run a snapshot of the repo as it is here, in the job's "
                                       "own folder (without .git, virtual environments and "
                                       "caches; only new files travel)")
    parser.add_argument("--transfer", choices=TRANSFER_METHODS, default="sftp",
                        help="how the job reaches the host: over SSH (sftp, default) or through "
                             "cloud storage")
    parser.add_argument("--cloud", metavar="REMOTE[:PATH]",
                        help="the rclone remote for --transfer cloud (REMOTE means "
                             "REMOTE:stackops)")
    parser.add_argument("--accept-new", action="store_true",
                        help="trust and record the host's key if it is unknown (a changed key is "
                             "always refused)")
    parser.add_argument("--ssh-timeout", type=float, default=15.0, metavar="SECONDS",
                        help="give up connecting, or on a transfer that stalls, after this long "
                             "(default 15)")
    parser.add_argument("--kwargs", default="{}", metavar="JSON",
                        help="keyword arguments: a JSON object, or @file.json (scripts see them as "
                             "func_kwargs)")
    parser.add_argument("--sweep", metavar="FILE.jsonl",
                        help="a sweep: one job per line of FILE (a JSON object of kwargs, laid "
                             "over --kwargs), ids ID-0000, ID-0001, ..., sharing one copy of the "
                             "code; wait ID and cancel ID act on all")
    parser.add_argument("--job-id", help="a safe name: letters, digits, '._-' (default: a random "
                                         "readable name)")
    parser.add_argument("--description", default="", help="free text kept with the job")
    parser.add_argument("--no-lock", action="store_true",
                        help="start at once, without taking a slot")
    parser.add_argument("--workload", metavar="START:END[:PARTS]",
                        help="call the function with workload_params covering [START, END) in "
                             "PARTS parts")
    parser.add_argument("--parallelize", action="store_true",
                        help="with --workload: run the PARTS in parallel processes, at most one "
                             "per CPU of the machine; the result is their list")
    parser.add_argument("--try-except", action="store_true",
                        help="catch the job's exception inside the wrapper (kept with its "
                             "traceback)")
    parser.add_argument("--interactive", action="store_true",
                        help="run with python -i in a tmux session named after the job")
    parser.add_argument("--update-repo", action="store_true",
                        help="git pull the host's own clone before the job (not with --copy-repo)")
    parser.add_argument("--install-repo", action="store_true",
                        help="pip install -e the repo before the job")
    parser.add_argument("--data", action="append", default=[], metavar="PATH",
                        help="sync a file or folder to the same place on the host (only files that "
                             "differ travel)")
    parser.add_argument("--python", help="interpreter that runs the job (default: the user "
                                         "config's python, else python3 on a host, and this "
                                         "interpreter here)")
    _add_run_start_args(parser)


def _add_setting_args(parser: Any, slots: str, copy_repo: str) -> None:
    """The options the user config file gives defaults for (see ``stackops config``)."""
    parser.add_argument("--max-jobs", type=int, metavar="N",
                        help=f"{slots} (default: the user config's max_jobs, else 1)")
    parser.add_argument("--copy-repo", action="store_true", default=None,
                        help=f"{copy_repo} (default: the user config's copy_repo)")
    parser.add_argument("--no-copy-repo", dest="copy_repo", action="store_false", default=None,
                        help="do not, whatever the user config says")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a variable of the job's environment (repeatable), over the user "
                             "config's env")


def _add_run_start_args(parser: Any) -> None:
    """run's options for when and how the job starts and ends: resources, order, Slurm, e-mail."""
    parser.add_argument("--gpus", type=int, default=0, metavar="N",
                        help="wait for N of the machine's GPUs (nvidia-smi, or "
                             "STACKOPS_GPUS=0,1,...) and get exactly them in CUDA_VISIBLE_DEVICES; "
                             "jobs without --gpus never wait behind these")
    parser.add_argument("--group", metavar="NAME",
                        help="a named pool with its own --max-jobs (e.g. --group io --max-jobs 8)")
    parser.add_argument("--retries", type=int, default=0, metavar="N",
                        help="repeat a failed run in place up to N times (status shows the "
                             "attempt)")
    parser.add_argument("--retry-delay", type=float, default=0.0, metavar="S",
                        help="seconds between attempts")
    parser.add_argument("--after", metavar="ID[,ID...]", default="",
                        help="start only once these jobs completed; if one fails the job ends "
                             "cancelled")
    parser.add_argument("--notify", action="store_true",
                        help="e-mail when the job ends (SMTP settings on the executing machine, "
                             "see docs/notify.md)")
    parser.add_argument("--email", metavar="ADDR",
                        help="with --notify: the address (default: your user config's)")
    parser.add_argument("--on-end", metavar="CMD",
                        help="a bash command run once when the job ends, on the machine it ran "
                             "on; {job_id} {status} {exit_code} {host} {duration} are filled in, "
                             "each as one quoted word (e.g. curl -d {status} ntfy.sh/mytopic)")
    parser.add_argument("--slurm", action="store_true",
                        help="hand the job to Slurm with sbatch (here, or on the --host login "
                             "node)")
    parser.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="an sbatch long option for --slurm, e.g. partition=gpu, time=02:00:00 "
                             "(repeatable; over the user config's slurm options)")
    parser.add_argument("--show-scripts", action="store_true", help="print the generated scripts")
    parser.add_argument("--no-launch", action="store_true",
                        help="prepare everything and print the launch command; start nothing")
    parser.add_argument("--wait", action="store_true",
                        help="block until the job ends; exit 1 if it failed")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    _add_progress_arg(parser)


# -- shell completion: made from the parser, job ids from a listing of the job folders -----------

COMPLETION_BASH = r"""# bash completion of stackops @@version, made from its parser by
# `stackops completion bash`. Load it with: source <(stackops completion bash); or save it as
# ~/.local/share/bash-completion/completions/stackops. Ids come from a listing of job folders.
_stackops_ids() {  # $1: jobs, clusters or both; $2: the --base-dir given, if any
    local base=${2:-@@job_base} d
    [[ $1 == clusters ]] && base=${2:-@@cluster_base}
    base=${base/#\~/$HOME}
    if [[ $1 != clusters ]]; then
        for d in "$base"/queued/*/; do [[ -d $d ]] && d=${d%/} && echo "${d##*/}"; done
        base=${base%/*}
    fi
    if [[ $1 != jobs ]]; then
        for d in "$base"/job_id__*/; do [[ -d $d ]] && d=${d%/} && echo "${d##*/job_id__}"; done
    fi
}
_stackops_hosts() {  # the aliases of ~/.ssh/config, not its patterns
    [[ -r ~/.ssh/config ]] && awk 'tolower($1) == "host" {
        for (i = 2; i <= NF; i++) if ($i !~ /[*?!]/) print $i }' ~/.ssh/config
}
_stackops() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local path= base= words= kind= opts= valued= i w
    for ((i = 1; i < COMP_CWORD; i++)); do  # the command (and action): its first plain words
        w=${COMP_WORDS[i]}
        [[ $w == --base-dir ]] && base=${COMP_WORDS[i+1]}
        [[ $w == -* ]] && continue
        case "$path" in
            '') path=$w;;
            @@nested) path="$path $w";;
        esac
    done
    case "$path" in
@@commands
    esac
    case "$path $prev" in
@@values
    esac
    [[ " $valued " == *" $prev "* ]] && return  # a free value, or a file (-o default)
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ $kind == jobs || $kind == clusters || $kind == both ]]; then
        COMPREPLY=($(compgen -W "$(_stackops_ids "$kind" "$base")" -- "$cur"))
    elif [[ $kind == hosts ]]; then
        COMPREPLY=($(compgen -W "$(_stackops_hosts)" -- "$cur"))
    elif [[ -n $words ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    fi  # else the shell's own completion (files), from -o default
}
complete -o default -F _stackops stackops
"""


def _completion_tree() -> dict[str, dict[str, Any]]:
    """Each command by its path ("", "cluster run"): its options, values, help, arguments."""
    argparse = _argparse()
    tree: dict[str, dict[str, Any]] = {}
    todo = [("", _full_parser())]
    while todo:
        path, parser = todo.pop(0)
        node: dict[str, Any] = {"options": {}, "values": {}, "kind": "", "words": {}}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # the ones --help lists
                node["words"] = {pseudo.dest: pseudo.help for pseudo in action._choices_actions}
                todo += [(f"{path} {name}".strip(), action.choices[name]) for name in node["words"]]
            elif action.option_strings:
                for option in action.option_strings:
                    node["options"][option] = action.help or ""
                    if action.nargs != 0:
                        node["values"][option] = _value_kind(action)
            elif not node["kind"] and not node["words"]:
                node["kind"], words = _argument_kind(path, action)
                node["words"] = dict.fromkeys(words, "")
        tree[path] = node
    return tree


def _value_kind(action: Any) -> tuple[str, list[str]]:
    """What completes an option's value: "words" (its choices), "jobs", "hosts", "files" or ""."""
    if action.choices or action.dest == "status":
        return "words", [str(word) for word in action.choices or STATUSES]
    if str(action.metavar).startswith("ID"):
        return "jobs", []
    if action.dest in ("host", "hosts"):
        return "hosts", []
    files = action.dest in ("base_dir", "data", "to", "key", "python", "sweep")
    return ("files" if files else ""), []


def _argument_kind(path: str, action: Any) -> tuple[str, list[str]]:
    """What completes a command's arguments ("jobs", "both", "clusters", ...), and its words."""
    if action.dest in ("job_id", "job_ids"):
        return ("both" if path in ("cancel", "wait", "rerun") else "jobs"), []
    if action.dest == "cluster_id":
        return "clusters", []
    words = ["bash", "zsh", "fish"] if action.dest == "shell" else action.choices or []
    return ("hosts" if action.dest == "host" else "files"), [str(word) for word in words]


def _bash_completion(tree: dict[str, dict[str, Any]]) -> str:
    commands, values = [], []
    replies = {"jobs": '"$(_stackops_ids jobs "$base")"', "hosts": '"$(_stackops_hosts)"'}
    for path, node in tree.items():
        opts, words = " ".join(node["options"]), " ".join(node["words"])
        commands.append(f"        {shlex.quote(path)}) opts={shlex.quote(opts)}"
                        f" valued={shlex.quote(' '.join(node['values']))} kind={node['kind']}"
                        f" words={shlex.quote(words)};;")
        for option, (kind, choices) in node["values"].items():
            reply = shlex.quote(" ".join(choices)) if kind == "words" else replies.get(kind)
            if reply is not None:
                values.append(f"        {shlex.quote(f'{path} {option}')}) "
                              f'COMPREPLY=($(compgen -W {reply} -- "$cur")); return;;')
    nested = "|".join(shlex.quote(path) for path, node in tree.items()
                      if path and " " not in path and node["words"] and not node["kind"])
    return render_template(COMPLETION_BASH, version=__version__, values="\n".join(values),
                           commands="\n".join(commands), nested=nested or "''",
                           job_base=DEFAULT_BASE_DIR.replace("~", "$HOME", 1),
                           cluster_base=DEFAULT_BASE_DIR.rsplit("/", 1)[0].replace("~", "$HOME", 1))


def _fish_completion(tree: dict[str, dict[str, Any]]) -> str:
    """The same completion for fish: one ``complete`` line per command, option and value."""
    def said(text: str) -> str:
        return shlex.quote(_shorten(" ".join(str(text or "").split()), 70))

    job_base = DEFAULT_BASE_DIR.replace("~", "$HOME", 1)
    lines = [f"# fish completion of stackops {__version__} (`stackops completion fish`, made "
             "from its parser).",
             "# Load it with: stackops completion fish | source; or save it as "
             "~/.config/fish/completions/stackops.fish",
             "function __stackops_is --description 'the command (and action) typed is $argv'",
             "    set -l path",
             "    for word in (commandline -opc)[2..-1]",
             "        string match -q -- '-*' $word; and continue",
             "        if test (count $path) -eq 0; or begin; test (count $path) -eq 1; "
             "and contains -- $path[1] cluster cloud; end",
             "            set -a path $word",
             "        end",
             "    end",
             '    test "$path" = "$argv"',
             "end",
             "function __stackops_ids --description 'ids of jobs, clusters or both: a listing'",
             f"    contains -- $argv[1] jobs both; and for folder in {job_base}/queued/*/",
             "        basename $folder",
             "    end",
             f"    contains -- $argv[1] clusters both; and for folder in "
             f"{job_base.rsplit('/', 1)[0]}/job_id__*/",
             "        string replace -r '^job_id__' '' (basename $folder)",
             "    end",
             "end",
             "function __stackops_hosts --description 'the aliases of ~/.ssh/config'",
             "    test -r ~/.ssh/config; and awk 'tolower($1) == \"host\" "
             "{ for (i = 2; i <= NF; i++) if ($i !~ /[*?!]/) print $i }' ~/.ssh/config",
             "end",
             "complete -c stackops -e"]
    for path, node in tree.items():
        when = f"-n {shlex.quote(f'__stackops_is {path}'.strip())}"
        for word, text in node["words"].items():
            lines.append(f"complete -c stackops {when} -f -a {shlex.quote(word)} -d {said(text)}")
        if node["kind"] in ("jobs", "clusters", "both"):
            lines.append(f"complete -c stackops {when} -f -a '(__stackops_ids {node['kind']})'")
        elif node["kind"] == "hosts":
            lines.append(f"complete -c stackops {when} -f -a '(__stackops_hosts)'")
        for option, text in node["options"].items():
            kind, choices = node["values"].get(option, ("none", []))
            flag = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
            value = {"none": "", "files": " -r -F", "": " -x",
                     "jobs": " -x -a '(__stackops_ids jobs)'",
                     "hosts": " -x -a '(__stackops_hosts)'",
                     "words": f" -x -a {shlex.quote(' '.join(choices))}"}[kind]
            lines.append(f"complete -c stackops {when} {flag}{value} -d {said(text)}")
    return "\n".join(lines) + "\n"


_ZSH_PRELUDE = """# zsh completion of stackops: the bash one, through zsh's bashcompinit.
# Load it with: source <(stackops completion zsh)
(( $+functions[compdef] )) || { autoload -U +X compinit && compinit; }
autoload -U +X bashcompinit && bashcompinit
"""


def _cmd_completion(args: Any) -> int:
    if args.shell not in ("bash", "zsh", "fish"):
        raise ConfigError(f"no completion for {args.shell!r}: there is one for bash, zsh and fish",
                          hint=f"e.g. source <({_prog()} completion bash)")
    tree = _completion_tree()
    if args.shell == "fish":
        sys.stdout.write(_fish_completion(tree))
    else:
        sys.stdout.write((_ZSH_PRELUDE if args.shell == "zsh" else "") + _bash_completion(tree))
    return 0


def _add_completion_args(sub: Any) -> None:
    sub.add_argument("shell", metavar="SHELL", help="bash, zsh or fish")


_LIST_HELP = ("every job and cluster part with its host and status, in the order submitted; remote "
              "rows are asked of their hosts (in parallel)")


def _add_ids(sub: Any, what: str | None = "the job's id", many: bool = False) -> None:
    """The id (or ids) a job command takes, if ``what`` says what it is, and --base-dir."""
    if what is not None and many:
        sub.add_argument("job_ids", nargs="+", metavar="ID", help=what)
    elif what is not None:
        sub.add_argument("job_id", metavar="ID", help=what)
    sub.add_argument("--base-dir", default=DEFAULT_BASE_DIR,
                     help=f"where jobs live (default {DEFAULT_BASE_DIR})")


def _add_list_args(sub: Any) -> None:
    _add_ids(sub, None)
    sub.add_argument("--json", action="store_true", help="one JSON object a job (same filters)")
    sub.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                     help="how long to wait for the hosts; a row not refreshed says when it was "
                          "last seen")
    sub.add_argument("--host", help="only the jobs on this host, read there (whoever submitted "
                                    "them); localhost: this machine's")
    sub.add_argument("--status", action="append", default=[], metavar="S[,S...]",
                     help=f"only jobs in these states ({', '.join(STATUSES)}); repeatable")
    sub.add_argument("--since", metavar="AGE", help="only jobs submitted in the last AGE "
                                                    "(e.g. 30m, 2h, 7d)")
    sub.add_argument("--last", type=int, metavar="N",
                     help="only the last N jobs submitted (after the other filters)")
    sub.add_argument("--sweep", metavar="ID", help="only the jobs of this sweep, in index order")


_REPORT_HELP = ("one self-contained HTML page with a timeline of jobs: a sweep, a cluster, a Slurm "
                "array, some jobs, the newest (--last) or a host's")


def _add_report_args(sub: Any) -> None:
    _add_ids(sub, None)
    sub.add_argument("job_ids", nargs="*", metavar="ID",
                     help="jobs, sweeps, clusters or Slurm arrays (their ids)")
    sub.add_argument("--last", type=int, metavar="N", help="the N jobs submitted last")
    sub.add_argument("--host", help="the jobs submitted to this host (the alias used; "
                                    "localhost for this machine)")
    sub.add_argument("-o", "--output", default="stackops-report.html", metavar="FILE.html",
                     help="where to write it (default stackops-report.html; - for stdout)")
    sub.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                     help="how long to wait for the hosts (a job not refreshed is drawn as "
                          "last seen)")


def _add_status_args(sub: Any) -> None:
    _add_ids(sub)
    sub.add_argument("-n", "--lines", type=int, default=0, help="also show the last N log lines")
    sub.add_argument("--json", action="store_true")


def _add_logs_args(sub: Any) -> None:
    _add_ids(sub)
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing while the job runs")
    sub.add_argument("-n", "--lines", type=int, metavar="N", help=_LINES_HELP)


_LINES_HELP = "only the last N lines (0: none; with -f, only what comes next)"


def _add_queue_args(sub: Any) -> None:
    sub.add_argument("--history", type=int, default=10, metavar="N",
                     help="show the last N finished jobs")
    sub.add_argument("--host", help="the queue of this host, read there in one round trip")
    sub.add_argument("--json", action="store_true")


def _add_download_args(sub: Any) -> None:
    _add_ids(sub)
    sub.add_argument("--to", help="target path (default: the same path, if the job's own results)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing target")
    _add_progress_arg(sub)


def _add_cancel_args(sub: Any) -> None:
    _add_ids(sub, "a job, sweep or cluster id (a sweep's or cluster's: all its jobs; a cloud "
                  "job's: its units)", many=True)
    sub.add_argument("--grace", type=float, default=10.0, metavar="S",
                     help="seconds between SIGTERM and SIGKILL (default 10)")


def _add_wait_args(sub: Any) -> None:
    _add_ids(sub, "a job, sweep or cluster id (a sweep or cluster ends when all its jobs have)",
             many=True)
    sub.add_argument("--timeout", type=float, default=None, metavar="S",
                     help="give up after S seconds (exit 124)")


def _add_rerun_args(sub: Any) -> None:
    _add_ids(sub, "an ended job's id, or a cluster's with --failed")
    sub.add_argument("--failed", action="store_true",
                     help="for a cluster id: only the parts that failed")
    sub.add_argument("--fresh", action="store_true",
                     help="take the code as it is now (default: the snapshot the job ran)")
    sub.add_argument("--wait", action="store_true",
                     help="block until it ends; exit 1 if it did not complete")


def _add_delete_args(sub: Any) -> None:
    _add_ids(sub, "an ended job's id (or a sweep's, a cluster's: all its jobs)", many=True)
    sub.add_argument("--results", action="store_true", help="also delete their own results folders")


def _add_prune_args(sub: Any) -> None:
    _add_ids(sub, None)
    sub.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 12h, 7d, 2w")
    sub.add_argument("--status", help="only jobs that ended so (completed, failed, cancelled)")
    sub.add_argument("--host", help="only jobs on this host (the alias used; localhost for this "
                                    "machine)")
    sub.add_argument("--results", action="store_true", help="also delete their own results folders")


def _add_ssh_args(sub: Any) -> None:
    sub.add_argument("host", help="~/.ssh/config alias or user@host[:port]")
    sub.add_argument("command", nargs="*", help="the command (after --)")
    sub.add_argument("--timeout", type=float, default=None,
                     help="give up connecting, or on the command, after this many seconds")
    _add_accept_new(sub)


def _add_copy_args(sub: Any) -> None:
    sub.add_argument("source")
    sub.add_argument("target")
    sub.add_argument("-r", "--recursive", action="store_true", help="copy folders")
    sub.add_argument("-z", "--compress", action="store_true", help="compress on the wire")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing target")
    _add_accept_new(sub)
    _add_progress_arg(sub)


def _add_send_key_args(sub: Any) -> None:
    sub.add_argument("host")
    sub.add_argument("--key", help="the public key file (default: ~/.ssh/id_ed25519.pub, then "
                                   "id_rsa.pub)")
    _add_accept_new(sub)


def _add_accept_new(sub: Any) -> None:
    sub.add_argument("--accept-new", action="store_true",
                     help="trust and record an unknown host key")


def _add_config_args(sub: Any) -> None:
    sub.add_argument("--host", help="the settings of jobs on this host (default: this machine)")
    sub.add_argument("--json", action="store_true")


def _command_table() -> tuple[tuple[str, Callable[[Any], int] | None, str, Any], ...]:
    """Every command: name, handler, line in ``stackops --help``, what adds its arguments."""
    return (
        ("run", _cmd_run, "run a script, function or command as a detached job", _add_run_args),
        ("status", _cmd_status, "status, times, results and error of a job", _add_status_args),
        ("list", _cmd_list, _LIST_HELP, _add_list_args),
        ("logs", _cmd_logs, "the job's output", _add_logs_args),
        ("queue", _cmd_queue, "slots in use, who waits in what order, recent history",
         _add_queue_args),
        ("download", _cmd_download, "copy a finished job's results folder", _add_download_args),
        ("delete-results", _cmd_delete_results, "delete a finished job's own results folder",
         _add_ids),
        ("cancel", _cmd_cancel, "stop jobs (or every part of a cluster): SIGTERM, SIGKILL after "
                                "--grace; a waiting job leaves the queue", _add_cancel_args),
        ("wait", _cmd_wait, "block until the jobs end: exit 0 if all completed, 1 if not, 124 on "
                            "timeout", _add_wait_args),
        ("start", _cmd_start, "launch a job prepared with run --no-launch", _add_ids),
        ("rerun", _cmd_rerun, "run an ended job again as <id>-r1 (a cluster: --failed parts)",
         _add_rerun_args),
        ("delete", _cmd_delete, "remove ended jobs' folders, here and where they ran",
         _add_delete_args),
        ("prune", _cmd_prune, "delete the jobs that ended longer ago than --older-than",
         _add_prune_args),
        ("ssh", _cmd_ssh, "run a command on a host; its exit status is passed through",
         _add_ssh_args),
        ("copy", _cmd_copy, "copy a file or folder to or from a host (HOST:PATH on one side)",
         _add_copy_args),
        ("send-key", _cmd_send_key, "install your public key in a host's authorized_keys (once)",
         _add_send_key_args),
        ("cluster", None, "split one workload over several hosts by CPU/RAM", _add_cluster_args),
        ("cloud", None, "a queue of work units on an rclone remote, for any worker",
         _add_cloud_args),
        ("worker", _cmd_worker, "claim and run work units from a cloud queue", _add_worker_args),
        ("ip", _cmd_ip, "local addresses and the LAN one; --public: the public IP; switch: rotate "
                        "it", _add_ip_args),
        ("config", _cmd_config, "the settings jobs take from the user config file, and where "
                                "each comes from", _add_config_args),
        ("completion", _cmd_completion, "a shell's completion of stackops: source <(stackops "
                                        "completion bash|zsh), or fish", _add_completion_args),
        ("report", _cmd_report, _REPORT_HELP, _add_report_args),
    )


class _LazyParsers(dict):  # type: ignore[type-arg]
    """argparse's map of commands to parsers, each built when looked up (one per command line)."""

    def __init__(self, action: Any) -> None:
        table = {row[0]: row for row in _command_table()}
        super().__init__(dict.fromkeys(table))
        self.action, self.table = action, table
        for name, _, help_text, _ in table.values():  # its line in the top-level help
            action._choices_actions.append(action._ChoicesPseudoAction(name, (), help_text))

    def __getitem__(self, name: str) -> Any:
        parser = dict.__getitem__(self, name)
        if parser is None:
            _, handler, help_text, add = self.table[name]
            dict.__delitem__(self, name)  # add_parser refuses a name it has already (3.11)
            parser = self.action.add_parser(name, description=help_text)
            if handler is not None:
                parser.set_defaults(handler=handler)
            add(parser)
            _add_verbosity_everywhere(parser)
        return parser


_PARSER_CLASS: list[Any] = []  # made once, by _parser_class


def _parser_class() -> Any:
    """ArgumentParser (its sub-parsers too) wrapping help by words: textwrap is 2 ms of --help."""
    if not _PARSER_CLASS:
        argparse = _argparse()

        class Formatter(argparse.HelpFormatter):  # type: ignore[misc,name-defined]
            def __init__(self, prog: str, indent_increment: int = 2,
                         max_help_position: int = 24, width: int | None = None) -> None:
                width = _terminal_columns() - 2 if width is None else width  # (not shutil's)
                super().__init__(prog, indent_increment, max_help_position, width)

            def _split_lines(self, text: str, width: int) -> list[str]:
                lines = [""]
                for word in text.split():
                    if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
                        lines.append(word)
                    else:
                        lines[-1] = f"{lines[-1]} {word}".lstrip()
                return lines if lines[-1] else lines[:-1]

            def _fill_text(self, text: str, width: int, indent: str) -> str:
                return "\n".join(indent + line
                                 for line in self._split_lines(text, width - len(indent)))

        class Parser(argparse.ArgumentParser):  # type: ignore[misc,name-defined]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("formatter_class", Formatter)
                super().__init__(*args, **kwargs)

        _PARSER_CLASS.append(Parser)
    return _PARSER_CLASS[0]


def _terminal_columns() -> int:
    """shutil.get_terminal_size's columns ($COLUMNS, stdout's, 80) without shutil (2 ms)."""
    columns = 0
    with _suppress(ValueError):
        columns = int(os.environ.get("COLUMNS", ""))
    if columns <= 0:
        with _suppress(AttributeError, ValueError, OSError):
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore
    return columns if columns > 0 else 80


def _build_parser() -> Any:
    """The command line's parser; each command's own is built when the command is looked up."""
    parser = _parser_class()(
        prog="stackops", description="Run a Python function or script detached, capped by slots, "
                                     "and follow it.")
    parser.add_argument("--version", action="version", version=f"stackops {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more diagnostics (-vv: tracebacks)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="fewer diagnostics")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.choices = commands._name_parser_map = _LazyParsers(commands)
    return parser


def _full_parser() -> Any:
    """The parser with every command's built (for completion, and the tests)."""
    parser = _build_parser()
    for action in _subcommands(parser):
        for name in list(action.choices):
            action.choices[name]
    return parser


def _subcommands(parser: Any) -> list[Any]:
    """The sub-command actions of ``parser`` (one, or none)."""
    argparse = _argparse()
    return [action for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)]


def _add_verbosity_everywhere(parser: Any) -> None:
    """-v/-q after the command too (``status JOB -v``), counted apart: main() adds them."""
    argparse = _argparse()
    parser.add_argument("-v", "--verbose", dest="verbose_after", action="count",
                        default=argparse.SUPPRESS, help="more diagnostics (-vv: tracebacks)")
    parser.add_argument("-q", "--quiet", dest="quiet_after", action="count",
                        default=argparse.SUPPRESS, help="fewer diagnostics")
    for action in _subcommands(parser):
        for sub in action.choices.values():
            _add_verbosity_everywhere(sub)


def _cli_level(level: int) -> int:
    """The logger's level for -v/-q counted ``level``: ERROR, WARNING, INFO or DEBUG."""
    return {-1: 40, 0: 30, 1: 20}.get(max(-1, min(level, 2)), 10)


def _configure_logging_later(level: int) -> Callable[[], None]:
    """_configure_logging once logging is used (see _Logger: 4 ms of a start); the undo."""
    if "logging" in sys.modules:  # (a program calling main(): it costs nothing now)
        return _configure_logging(level)
    undo: list[Callable[[], None]] = []
    late = (_cli_level(level), lambda logger: undo.append(_configure_logging(level)))
    _LATE_HANDLER.append(late)

    def undo_later() -> None:
        if late in _LATE_HANDLER:
            _LATE_HANDLER.remove(late)
        for step in undo:
            step()

    return undo_later


def _configure_logging(level: int) -> Callable[[], None]:
    """One stderr handler for stackops, replaced (not added to) by every main() call; paramiko's
    log (a traceback from its thread) only with -vv; stackops' lines not propagated meanwhile (a
    program calling main() would see them twice). Returns the undo, which restores the loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("stackops: %(message)s"))
    quiet_paramiko: logging.Handler = logging.NullHandler() if level < 2 else handler
    installed = ((log, handler), (logging.getLogger("paramiko"), quiet_paramiko))
    saved = [(logger, logger.level, logger.propagate) for logger, _ in installed]
    for logger, new in installed:
        for old in [h for h in logger.handlers if getattr(h, "_stackops_cli", False)]:
            logger.removeHandler(old)
        new._stackops_cli = True  # type: ignore[attr-defined]
        logger.addHandler(new)
    log.propagate = False
    log.setLevel(_cli_level(level))

    def undo() -> None:
        for logger, new in installed:
            logger.removeHandler(new)
        for logger, level_before, propagate in saved:
            logger.setLevel(level_before)
            logger.propagate = propagate

    return undo


def _take_ssh_command(args: Any, extras: list[str], parser: Any) -> None:
    """``ssh HOST --timeout 5 -- CMD``: argparse has given HOST an empty command before it met
    the option, so the command comes back as extra words; anything else extra is an error."""
    if extras and getattr(args, "handler", None) is _cmd_ssh and not args.command:
        words = extras[1:] if extras[0] == "--" else extras
        if extras[0] == "--" or not extras[0].startswith("-"):
            args.command = words
            return
    if extras:
        more = ""
        if getattr(args, "handler", None) in (_cmd_run, _cmd_cluster_run):
            more = " (a command and its arguments go after --: run [options] -- COMMAND ...)"
        parser.error(f"unrecognized arguments: {' '.join(extras)}{more}")


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 success, 1 failure, 2 bad input, 130 interrupted."""
    sys.modules.setdefault("stackops", _this_module())
    _note_program(sys.argv[0] if sys.argv else "")
    _argparse()  # before the parser is built: argparse without gettext
    parser = _build_parser()
    words, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    try:
        args, extras = parser.parse_known_args(words)
        args.job_command = command
        _take_ssh_command(args, extras, parser)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    quiet = args.quiet + getattr(args, "quiet_after", 0)
    undo_logging = _configure_logging_later(verbose - quiet)
    _CLI.append(True)  # errors name the command line's options (see _option)
    import gc

    collecting = gc.isenabled()  # (list and status pause it: _pause_gc)
    try:
        return _dispatch(args, verbose)
    finally:
        _CLI.pop()
        undo_logging()
        if collecting:
            gc.enable()


def _interrupted(signum: int, frame: Any) -> None:
    """Ctrl-C in a command: a KeyboardInterrupt, as always; while bytes move it is taken between
    two chunks (see _CALM), unless it is pressed again before that."""
    if _CALM[0] and not _CALM[1]:
        _CALM[1] = True
        return
    _CALM[1] = False
    raise KeyboardInterrupt


def _dispatch(args: Any, verbose: int) -> int:
    """Run the command's handler, Ctrl-C taken as _interrupted says (see _handled)."""
    with _suppress(ValueError, TypeError):  # not in the main thread (main() called by a program)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupted)
    try:
        return _handled(args, verbose)
    finally:
        with _suppress(ValueError, TypeError):
            if signal.getsignal(signal.SIGINT) is _interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)


def _handled(args: Any, verbose: int) -> int:
    """_dispatch's body: the handler's exit code, or what it raised said in one line."""
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # a buffered stdout (a pipe) fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `stackops list | head`: the reader has all it wanted
        with _suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # none at exit
        return 141
    except StackopsError as exc:
        if verbose >= 2:
            traceback.print_exc()
        print(f"stackops: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"stackops: hint: {exc.hint}", file=sys.stderr)
        bad_input = isinstance(exc, ConfigError) or getattr(exc, "unknown_key", False)
        return 2 if bad_input else 1  # an unknown host key: nothing was written or started
    except KeyboardInterrupt:
        print("stackops: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError, EOFError) as exc:
        failure: BaseException = exc
        line, hint = _plain_error(exc)
    except Exception as exc:  # paramiko's own exceptions, where no caller wrapped them
        if not type(exc).__module__.startswith("paramiko"):
            raise
        failure = exc
        line, hint = f"SSH: {exc or type(exc).__name__}", "is the host reachable? -vv shows where"
    if verbose >= 2:
        traceback.print_exception(type(failure), failure, failure.__traceback__)
    print(f"stackops: error: {line}", file=sys.stderr)
    print(f"stackops: hint: {hint}", file=sys.stderr)
    return 1


def _plain_error(exc: BaseException) -> tuple[str, str]:
    """One line and a hint for an OSError, MemoryError or EOFError that reached main()."""
    if isinstance(exc, MemoryError):
        return "out of memory", "give it less to hold at once (smaller --kwargs, data as files)"
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        if not paths:
            return what, "run again with -vv to see where it happened"
        return f"{what}: {paths}", ("check that path (its permissions, its free space, that its "
                                    "folders exist)")
    return "the connection was closed by the other side", "is the host reachable? -vv shows where"


# ============================================================================================
# 18. serve: the executing side's one entry
# ============================================================================================
#
# Everything a host runs for stackops is this file, through serve(): the job's wrapper calls
# run_job, and every other step (a hand-over, a fire, the status of many jobs, a cancel, a delete,
# a log, the queue, list --host, the dispatcher, the end's report) is an action: a request of
# plain data in, one answer of plain data out (or an error record the client raises again).
# Here, the same actions are called in this process, so a job is the same wherever it runs.

def _reports_of(roots: Sequence[Path | str], lines: int = 0,
                tasks: list[list[str] | None] | None = None,
                cache: _RecordCache | None = None) -> list[dict[str, Any]]:
    """For each job folder: its judged state, its log tail, its place in line (and an array's
    tasks, the same way: those its record names, or ``tasks[i]``, the ids the submitter follows
    once failed tasks were run again). With ``cache``, records are read through it. A folder
    may be given as text (list and status of 10,000 jobs: a Path each is a tenth of their time)."""
    states = [cache.state(root) if cache else read_state(root) for root in roots]
    places: dict[str, dict[str, int]] = {}  # each queue's listing, read once
    answers = []
    for index, (root, state, shown) in enumerate(zip(roots, _judge_records(roots, states),
                                                       _collapsed(roots))):
        if not state and not os.path.lexists(root):
            state = {"status": "failed", "error": _gone(Path(root))}
        answer: dict[str, Any] = {"root": shown, "state": state}
        answer["place"], answer["tail"] = _place_and_tail(root, state, lines, places)
        own = (tasks[index] if tasks and index < len(tasks) else None) or state.get("tasks")
        if own:
            answer["tasks"] = _reports_of([Path(root).parent / check_safe_name(task)
                                           for task in own], cache=cache)
        answers.append(answer)
    return answers


def _collapsed(roots: Sequence[Path | str]) -> list[str]:
    """collapse_home of each of ``roots``, the folder they are in worked out once."""
    folders: dict[str, str] = {}
    shown = []
    for root in roots:
        folder, _, name = str(root).rpartition("/")  # (os.path.split, for 10,000 roots)
        folder = folder or "/"
        if folder not in folders:
            folders[folder] = collapse_home(folder)
        inside = folders[folder].startswith("~") and name not in ("", ".", "..")
        shown.append(f"{folders[folder].rstrip('/')}/{name}" if inside else collapse_home(root))
    return shown


def report_from(answer: dict[str, Any]) -> JobStatus:
    """The JobStatus of one answer of _reports_of (an array's: its tasks combined; its results
    are its folder, which holds theirs)."""
    state = answer["state"]
    report = _status_of(answer["root"].rsplit("/", 1)[-1], state, answer.get("tail", ""),
                        answer.get("place"))
    if answer.get("tasks"):
        report.results_path = answer["root"]
        report = _combine([report_from(task) for task in answer["tasks"]], report)
    return report


def _roots(request: dict[str, Any]) -> list[Path]:
    return [expand_home(root) for root in request["roots"]]


def _act_cancel(request: dict[str, Any], _io: Any) -> list[dict[str, Any]]:
    roots = _roots(request)
    marked = [_mark_cancel(root) for root in roots]  # all first: the queue starts none meanwhile
    return [_cancel(root, state, float(request.get("grace", 10.0)))
            for root, state in zip(roots, marked)]


def _act_delete(request: dict[str, Any], _io: Any) -> list[str]:
    removed = []
    for root in _roots(request):
        if request.get("results") and read_state(root).get("status") == "completed":
            with _suppress(StackopsError):
                delete_own_results(root)
        removed.append(delete_job(root))
        if request.get("results"):  # an unfinished command's, made empty at its start
            with _suppress(OSError):
                os.rmdir(expand_home(f"{DEFAULT_RESULTS_DIR}/{root.name}"))
    return removed


def _act_check_email(request: dict[str, Any], _io: Any) -> bool:
    load_email_config(str(request.get("name") or ""))
    return True


def _act_logs(request: dict[str, Any], _io: Any) -> dict[str, Any]:
    """A slice of a job's log: from byte ``offset`` (following it; a log now shorter than it is
    read from its start, ``truncated``), else its last ``lines`` (0: none, only where it ends);
    whether more was there (``more``: ask again at once), and whether the job had ended before
    it was read (a follower stops once such a read is empty). A character cut by the slice's end
    waits for the next read, unless the job has ended and the log was read to its end."""
    root = _roots(request)[0]
    ended = judge_jobs([root])[0].get("status") in TERMINAL_STATUSES
    offset = request.get("offset")
    data, more, truncated = b"", False, False
    with _suppress(FileNotFoundError), open(root / OUTPUT_LOG, "rb") as handle:
        if offset is None:
            data, offset = _log_tail(handle, int(request.get("lines", 20)))
        else:
            truncated = int(offset) > os.fstat(handle.fileno()).st_size
            offset = 0 if truncated else int(offset)
            handle.seek(offset)
            data = handle.read(_LOG_CHUNK)
            more = len(data) == _LOG_CHUNK
    if offset and not data and not os.path.exists(root / OUTPUT_LOG):
        truncated, offset = True, 0  # the log is gone: read it from the start once it is back
    if more or not ended:
        data = data[:_complete_utf8(data)]
    offset = (offset or 0) + len(data)
    return {"text": data.decode("utf-8", "replace"), "offset": offset, "ended": ended,
            "more": more, "truncated": truncated}


_LOG_CHUNK = 1 << 20  # what one read of a log answers at most


def _log_tail(handle: Any, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` lines of an open log, read backwards in blocks (a huge log costs only
    its tail; lines longer than 8 reads in all, a progress bar's, only their last 8 MiB), and the
    offset where they start."""
    end = handle.seek(0, os.SEEK_END)
    if lines <= 0:
        return b"", end
    start, blocks, found = end, [], 0
    while start > 0 and found <= lines and end - start < 8 * _LOG_CHUNK:
        step = min(start, 1 << 16)
        start -= step
        handle.seek(start)
        blocks.append(handle.read(step))
        found += blocks[-1].count(b"\n")
    data = b"".join(reversed(blocks))
    head = data[:-1].rsplit(b"\n", lines)
    cut = len(head[0]) + 1 if len(head) > lines else 0
    return data[cut:], start + cut


def _complete_utf8(data: bytes) -> int:
    """How much of ``data`` ends with a whole UTF-8 character: a sequence cut at its end is left
    for the next read (bytes that are no UTF-8 at all are not held: they show replaced)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the start of the last sequence
            need = 1
            if 0xC2 <= byte <= 0xF4:
                need = 2 + (byte >= 0xE0) + (byte >= 0xF0)
            return len(data) - back if need > back else len(data)
    return len(data)


def _act_list(request: dict[str, Any], _io: Any) -> list[dict[str, Any]]:
    """Each job folder under the base folder and the clusters' here, whoever sent it, judged."""
    base = expand_home(request.get("base_dir") or DEFAULT_BASE_DIR)
    roots = []
    for queued in [base / "queued", *sorted(base.parent.glob("job_id__*/queued"))]:
        roots += [queued / name for name in sorted(os.listdir(queued)) if not name.startswith(".")
                  and (queued / name / FILE_MANAGER_JSON).exists()
                  and not os.path.islink(queued / name)] if queued.is_dir() else []
    return _reports_of(roots, 0)


def _act_handover(request: dict[str, Any], io: Any) -> dict[str, Any]:
    """A job (or a sweep's or array's shared folder and members) arrives, and may be fired:
    see the section's comment. Writes its intermediate answers (the plan, blobs to send again)
    as lines of their own; returns what was placed and fired."""
    stream, say = io
    plan = _handover_plan(request)
    say({"plan": plan})
    header = json.loads(stream.readline() or b"{}")
    if header.get("abort") or not header:
        return {"placed": []}
    if header.get("shared"):  # this machine sees the sender's files: they are used in place
        roots = [expand_home(root) for root in header.get("roots") or [request["job_root"]]]
    else:
        roots = _handover_commit(request, header, stream, say)
        with _suppress(OSError, StackopsError):
            collect_snapshots(_store(), roots[0].parent, SNAPSHOT_KEEP_SECONDS)
    try:
        if request.get("email"):
            load_email_config(request["email"])
        if request.get("gate"):  # placed: wait for the word of the others (Cluster.run)
            say({"placed": True})
            word: dict[str, Any] = {"wait": True}
            while word.get("wait"):
                word = _json_line(stream.readline())
            if word.get("go") is not True:
                raise StackopsError("the hand-over was called off")
        fired = fire_jobs([expand_home(root) for root in request.get("fire") or []]) \
            if request.get("fire") else {}
    except BaseException:
        if not header.get("shared"):
            for root in roots:
                shutil.rmtree(root, ignore_errors=True)
        raise
    return {"placed": [collapse_home(root) for root in roots], "fired": fired}


def _act_cloud_fetch(request: dict[str, Any], _io: Any) -> str:
    """A job that travelled through the cloud: its archive fetched with this machine's rclone,
    checked against the SHA-256 recorded at upload, unpacked as a unit is (nothing outside the
    job folder and its data), put in place; the archive is removed from the bucket."""
    root = expand_home(request["root"])
    if os.path.lexists(root):
        if _read_text(root / LOGS / "archive_sha256.txt") == request["sha256"]:
            return collapse_home(root)  # fetched before by a fire that failed later
        raise ConfigError(f"job folder {collapse_home(root)} already exists on this host")
    source = f"{cloud_base(request['cloud'])}/jobs/{check_safe_name(root.name)}.tar"
    _fetch_archive(source, root, str(request["sha256"]))
    if request.get("email"):
        load_email_config(request["email"])
    with _suppress(StackopsError):
        _rclone("deletefile", source, what=f"removal of {source}")
    return collapse_home(root)


def _act_cloud_results(request: dict[str, Any], _io: Any) -> dict[str, Any]:
    """A job's results up to the bucket with this machine's rclone (a download's own prefix)."""
    results = expand_home(request["results"])
    target = request["target"] + ("" if results.is_dir() else f"/{results.name}")
    _rclone("copy" if results.is_dir() else "copyto", str(results), target,
            what="upload of the results")
    return {"target": request["target"], "left_out": _not_carried(results)}


def _not_carried(results: Path) -> list[str]:
    """What rclone leaves out of a results folder: links (whichever way they point), FIFOs,
    devices, sockets; their names, relative to it."""
    left_out = []
    for parent, folders, files in os.walk(results):
        for name in folders + files:
            path = os.path.join(parent, name)
            if os.path.islink(path) or not (os.path.isdir(path) or os.path.isfile(path)):
                left_out.append(os.path.relpath(path, results))
    return left_out  # (named in order where they are told: _warn_left_out)


_ACTIONS: dict[str, Callable[[dict[str, Any], Any], Any]] = {
    "status": lambda request, _io: _reports_of(_roots(request), int(request.get("lines") or 0),
                                               request.get("tasks")),
    "cancel": _act_cancel, "delete": _act_delete,
    "delete_results": lambda request, _io: delete_own_results(_roots(request)[0]),
    "check_email": _act_check_email, "fire": lambda request, _io: fire_jobs(_roots(request)),
    "facts": lambda request, _io: _facts(list(request.get("facts") or [])),
    "logs": _act_logs, "list": _act_list, "handover": _act_handover,
    "queue": lambda request, _io: _queue_view(Slots(), int(request.get("history") or 0)),
    "cloud_fetch": _act_cloud_fetch, "cloud_results": _act_cloud_results}


def _answer(request: Any, stream: Any, say: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One request's answer: ``{"ok": value}``, or ``{"error": record}`` (errors as data: the
    client raises the same StackopsError again, with a crash's traceback as its evidence)."""
    try:
        if not isinstance(request, dict) or request.get("action") not in _ACTIONS:
            raise ConfigError(f"unknown request {_shorten(repr(request), 80)}")
        return {"ok": _ACTIONS[request["action"]](request, (stream, say))}
    except StackopsError as exc:
        return {"error": _error_record(exc)}
    except Exception as exc:
        return {"error": _error_record(exc, traceback.format_exc())}


def serve(argv: list[str] | None = None) -> int:
    """The executing side's one entry, as execnet's serve is. ``argv`` (``stackops.py --serve
    ACTION ARG``): a dispatcher or an end's report, started detached by the executing side
    itself. Without: JSON request lines on stdin, each answered by one JSON line on stdout (see
    _answer), until stdin ends or brings an empty line."""
    args = list(sys.argv[2:] if argv is None else argv)
    detached = {"dispatch": run_dispatcher, "notify": notify_job_end}
    if len(args) == 2 and args[0] in detached:
        detached[args[0]](args[1])
        return 0
    if args:
        raise ConfigError(f"stackops --serve: unknown action {' '.join(args)!r}")
    stream, out = sys.stdin.buffer, sys.stdout.buffer

    def say(message: dict[str, Any]) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    while True:
        line = stream.readline()
        if not line.strip():
            return 0
        say(_answer(_json_line(line) or None, stream, say))


def _script_status(run: Callable[[], Any]) -> int:
    """The exit status ``run`` ends with (its return value or its SystemExit's code), as
    sys.exit would make it; the file run as a script then leaves without tearing down its
    interpreter (_leave: some 7 ms of every command)."""
    try:
        code = run()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # (Ctrl-C at start-up, before the command takes it as its own)
        print("stackops: interrupted", file=sys.stderr)
        return 130
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _installed_command() -> None:
    """The installed ``stackops`` command (pyproject's console script): main(), then it leaves
    as ``python -m stackops`` does, its interpreter not torn down (3 ms of every command)."""
    _leave(_script_status(main))


if __name__ == "__main__":
    sys.modules.setdefault("stackops", _this_module())
    _leave(_script_status(lambda: serve(sys.argv[2:]) if sys.argv[1:2] == ["--serve"] else main()))
