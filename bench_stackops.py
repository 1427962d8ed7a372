"""Benchmarks of stackops against the OpenSSH tools, measured alternately in the same run.

    python bench_stackops.py [--quick] [--disk] [--json out.json] [--runs N]
    python bench_stackops.py --only report --report-png docs/report.png   # the report's figures

It starts its own sshd on loopback (as root: logging in as a dedicated account, so that no shell
start-up file of root's distorts the figures) and, for the cluster case, four more hosts (network
namespaces as root, 127.0.0.2x otherwise). Every case runs several times, alternating stackops and
the reference tool, and prints the median of each side and their ratio (stackops / reference; below
1.0 means stackops is faster). Cases without a reference print an absolute median.

Both homes live on tmpfs (/dev/shm) unless ``--disk`` is given: both tools create the same files,
and on a disk mounted with ``discard`` (this VM's) creating files after any large delete stalls for
a random 0.3-1.5 s that belongs to neither tool. Every transfer writes to a fresh target; targets are
deleted after each case, outside the timing.

Needs: openssh-server, openssh-client (ssh, scp), rsync, and paramiko.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ACCOUNT = f"sob{os.getpid()}"  # a login of this run's own: two runs (or a run and the tests) never share it
_fresh = itertools.count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(address: str, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd on {address}:{port} exited") from None
            time.sleep(0.05)
    raise RuntimeError(f"sshd on {address}:{port} did not start")


class Bed:
    """Loopback sshd (and extra hosts on demand), an ssh_config that both OpenSSH and stackops
    read, and a private local home."""

    def __init__(self, disk: bool = False) -> None:
        memory = None if disk or not os.path.isdir("/dev/shm") else "/dev/shm"
        self.base = Path(tempfile.mkdtemp(prefix="stackops-bench-", dir=memory))
        self.where = "tmpfs" if memory else f"disk ({self.base.parent})"
        self.base.chmod(0o755)
        self.local_home = self.base / "local-home"
        self.local_home.mkdir()
        self.remote_home = self.base / "remote-home"
        self.remote_home.mkdir()
        self.user = self._account()
        self.netns = os.geteuid() == 0 and shutil.which("ip") is not None
        self.tag = f"sb{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.servers: list[subprocess.Popen] = []
        for name in ("client_key",):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.base / name)], check=True)
        keys = self.base / "keys"
        keys.mkdir(mode=0o711)
        shutil.copy(self.base / "client_key.pub", keys / "authorized")
        (keys / "authorized").chmod(0o644)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.ssh_config = self.base / "ssh_config"
        self.known_hosts = self.base / "known_hosts"
        self.port = free_port()
        self.add_host("tb", "127.0.0.1", self.port)
        os.environ["HOME"] = str(self.local_home)
        os.environ["STACKOPS_SSH_CONFIG"] = str(self.ssh_config)

    def _account(self) -> str:
        if os.geteuid() != 0:
            return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        with contextlib.suppress(OSError):  # accounts of earlier runs that were killed (their pid is gone)
            for line in Path("/etc/passwd").read_text().splitlines():
                name = line.split(":", 1)[0]
                if name.startswith("sob") and name[3:].isdigit() and not Path(f"/proc/{name[3:]}").exists():
                    subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["useradd", "-M", "-s", "/bin/bash", "-p", "*", "-d", str(self.remote_home), ACCOUNT],
                       check=True)
        shutil.chown(self.remote_home, ACCOUNT, ACCOUNT)
        return ACCOUNT

    def add_host(self, alias: str, address: str, port: int, prefix: tuple[str, ...] = ()) -> None:
        """Start an sshd on ``address:port`` (inside ``prefix``, e.g. a namespace) known as ``alias``."""
        key = self.base / f"host_key_{alias}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        config = self.base / f"sshd_{alias}.conf"
        config.write_text(textwrap.dedent(f"""
            Port {port}
            ListenAddress {address}
            HostKey {key}
            PidFile none
            AuthorizedKeysFile {self.base / "keys" / "authorized"}
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            MaxSessions 100
            MaxStartups 100:30:200
            Subsystem sftp internal-sftp
        """) + ("" if os.geteuid() == 0 else f"SetEnv HOME={self.remote_home}\n"))
        proc = subprocess.Popen([*prefix, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.servers.append(proc)
        wait_port(address, port, proc)
        host_key = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        with open(self.known_hosts, "a") as handle:
            handle.write(f"{address if port == 22 else f'[{address}]:{port}'} {host_key}\n")
        with open(self.ssh_config, "a") as handle:
            handle.write(textwrap.dedent(f"""
                Host {alias}
                  HostName {address}
                  Port {port}
                  User {self.user}
                  IdentityFile {self.base / "client_key"}
                  IdentitiesOnly yes
                  BatchMode yes
                  UserKnownHostsFile {self.known_hosts}
                  StrictHostKeyChecking yes
                  ControlPath {self.base / "cm-%C"}
            """))

    def add_nodes(self, count: int) -> list[str]:
        """``count`` more hosts: network namespaces on a private bridge as root, else 127.0.0.2x."""
        subnet = f"10.232.{os.getpid() % 200 + 1}"
        if self.netns:
            self._ip("link", "add", f"{self.tag}br", "type", "bridge")
            self._ip("addr", "add", f"{subnet}.1/24", "dev", f"{self.tag}br")
            self._ip("link", "set", f"{self.tag}br", "up")
        aliases = []
        for i in range(1, count + 1):
            prefix: tuple[str, ...] = ()
            address = f"127.0.0.{20 + i}"
            if self.netns:
                ns, address = f"{self.tag}n{i}", f"{subnet}.{10 + i}"
                self._ip("netns", "add", ns)
                self.namespaces.append(ns)
                self._ip("link", "add", f"{self.tag}v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._ip("link", "set", f"{self.tag}v{i}", "master", f"{self.tag}br", "up")
                self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                prefix = ("ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc")
            self.add_host(f"n{i}", address, 22 if self.netns else self.port, prefix)
            aliases.append(f"n{i}")
        return aliases

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def ssh(self, *args: str) -> list[str]:
        """ssh without connection sharing (an explicit ControlMaster=no -o ControlPath=... re-enables it)."""
        return ["ssh", "-F", str(self.ssh_config), "-o", "ControlPath=none", *args]

    def ssh_shared(self, *args: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), *args]

    def close(self) -> None:
        subprocess.run(self.ssh_shared("-O", "exit", "tb"), capture_output=True, check=False)
        for proc in self.servers:  # ours, by pid
            proc.kill()
            proc.wait()
        for i, ns in enumerate(self.namespaces, 1):
            subprocess.run(["ip", "link", "del", f"{self.tag}v{i}"], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if self.netns and self.namespaces:
            subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True, check=False)
        if os.geteuid() == 0:
            subprocess.run(["userdel", ACCOUNT], capture_output=True, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def compare(name: str, ours, reference, runs: int, reference_name: str) -> dict:
    """Run both sides alternately ``runs`` times; medians and ratio."""
    mine, theirs = [], []
    for _ in range(runs):
        mine.append(timed(ours))
        theirs.append(timed(reference))
    row = {"case": name, "stackops_s": statistics.median(mine), "reference": reference_name,
           "reference_s": statistics.median(theirs)}
    row["ratio"] = row["stackops_s"] / row["reference_s"]
    print(f"{name:48s} {row['stackops_s'] * 1000:9.1f} ms  {reference_name:30s} {row['reference_s'] * 1000:9.1f} ms"
          f"  ratio {row['ratio']:5.2f}", flush=True)
    return row


def absolute(name: str, values: list[float], unit: str = "ms", note: str = "") -> dict:
    value = statistics.median(values)
    shown = value * 1000 if unit == "ms" else value
    print(f"{name:48s} {shown:9.1f} {unit}  {note}", flush=True)
    return {"case": name, "stackops_s" if unit == "ms" else "value": value, "unit": unit, "note": note,
            "samples": len(values)}


def run_cmd(cmd: list[str], **kwargs) -> None:
    subprocess.run(cmd, check=True, capture_output=True, **kwargs)


# -- cases ---------------------------------------------------------------------------------------

def ssh_cases(bed: Bed, stackops, runs: int) -> list[dict]:
    def connect_and_true():
        with stackops.SSH.from_config_file("tb") as ssh:
            ssh.run_shell_cmd_on_remote("true")

    rows = [compare("connect + run `true`", connect_and_true, lambda: run_cmd(bed.ssh("tb", "true")), runs,
                    "ssh host true")]
    # from here on the OpenSSH tools share one open connection, as stackops does
    run_cmd(bed.ssh_shared("-o", "ControlMaster=yes", "-o", "ControlPersist=600", "-N", "-f", "tb"))
    with stackops.SSH.from_config_file("tb") as ssh:
        rows.append(compare("run `true`, connection open", lambda: ssh.run_shell_cmd_on_remote("true"),
                            lambda: run_cmd(bed.ssh_shared("-o", "ControlMaster=no", "tb", "true")), runs * 3,
                            "ssh true via ControlMaster"))
    return rows


def peak_python_memory(action) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def transfer_cases(bed: Bed, stackops, quick: bool, runs: int) -> list[dict]:
    """Folder upload first, big files after; everything is deleted once, at the end (see the top)."""
    rows = []
    scp = ["scp", "-q", "-F", str(bed.ssh_config)]  # the config's ControlPath: through the open master
    down = bed.local_home / "down"
    down.mkdir()
    there = bed.remote_home  # absolute: scp and rsync start in the passwd home, not in $HOME
    with stackops.SSH.from_config_file("tb") as ssh:
        files = 500 if quick else 2000
        tree = bed.local_home / "tree"
        for i in range(files):
            folder = tree / f"d{i % 20:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"f{i}.bin").write_bytes(os.urandom(4096))
        rsync = ["rsync", "-a", "-e", f"ssh -F {bed.ssh_config}", f"{tree}/"]
        rows.append(compare(f"{files} x 4 KiB folder upload",
                            lambda: ssh.copy_from_here(tree, f"~/up-{next(_fresh)}", recursive=True),
                            lambda: run_cmd([*rsync, f"tb:{there}/scp-{next(_fresh)}/"]), runs,
                            "rsync -a (open connection)"))
        mib = 50 if quick else 200
        blob = bed.local_home / "blob.bin"
        with open(blob, "wb") as handle:
            for _ in range(mib):
                handle.write(os.urandom(2**20))
        transfers = max(3, runs // 2)
        rows.append(compare(f"{mib} MiB upload", lambda: ssh.copy_from_here(blob, f"~/up-{next(_fresh)}"),
                            lambda: run_cmd([*scp, str(blob), f"tb:{there}/scp-{next(_fresh)}"]),
                            transfers,
                            "scp (open connection)"))
        run_cmd(bed.ssh("tb", "rm -rf ~/up-* ~/scp-*"))
        ssh.copy_from_here(blob, "~/blob-src", overwrite_existing=True)
        rows.append(compare(f"{mib} MiB download",
                            lambda: ssh.copy_to_here("~/blob-src", down / f"ours-{next(_fresh)}"),
                            lambda: run_cmd([*scp, f"tb:{there}/blob-src",
                                             str(down / f"scp-{next(_fresh)}")]),
                            transfers, "scp (open connection)"))
        shutil.rmtree(down)
        down.mkdir()
        rows.append(memory_row(ssh, blob, down, mib))
        run_cmd(bed.ssh("tb", "rm -rf ~/up-* ~/scp-* ~/blob-src"))
    shutil.rmtree(down)
    blob.unlink()
    return rows


def memory_row(ssh, blob: Path, down: Path, mib: int) -> dict:
    """Peak Python memory of an upload and a download, for the whole file and a quarter of it."""
    small = blob.with_name("quarter.bin")
    with open(blob, "rb") as source, open(small, "wb") as target:
        target.write(source.read(blob.stat().st_size // 4))
    ssh.copy_from_here(small, "~/up-quarter")
    peaks = {}
    for label, path, remote in (("quarter", small, "~/up-quarter"), ("whole", blob, "~/blob-src")):
        peaks[f"upload_{label}"] = peak_python_memory(
            lambda path=path: ssh.copy_from_here(path, f"~/up-{next(_fresh)}"))
        peaks[f"download_{label}"] = peak_python_memory(
            lambda remote=remote: ssh.copy_to_here(remote, down / f"m-{next(_fresh)}"))
    small.unlink()
    note = (f"upload {peaks['upload_quarter'] / 2**20:.1f} / {peaks['upload_whole'] / 2**20:.1f} MiB, "
            f"download {peaks['download_quarter'] / 2**20:.1f} / {peaks['download_whole'] / 2**20:.1f} MiB "
            f"for {mib // 4} / {mib} MiB files")
    print(f"{'peak Python memory during transfers':48s} {note}", flush=True)
    return {"case": "peak Python memory during transfers", "unit": "bytes", "note": note, **peaks}


def job_cases(bed: Bed, stackops, runs: int) -> list[dict]:
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "trivial.py").write_text("res = None\n")

    def hand_over():
        config = stackops.RemoteStackOpsConfig(job_id=f"bench-{next(_fresh)}", ssh_host="tb", copy_repo=True,
                                               lock_resources=False)
        with stackops.RemoteMachine(str(project / "trivial.py"), config=config) as machine:
            machine.run()

    rows = [compare("hand a trivial job over (RemoteMachine.run)", hand_over, lambda: run_cmd(bed.ssh("tb", "true")),
                    runs, "ssh host true")]
    config = stackops.RemoteStackOpsConfig(job_id="bench-status", ssh_host="tb", copy_repo=True)
    (project / "sleepy.py").write_text("import time\ntime.sleep(120)\n")
    with stackops.RemoteMachine(str(project / "sleepy.py"), config=config) as machine:
        machine.run()
        while machine.get_status(0).status != "running":
            time.sleep(0.05)
        rows.append(compare("status of a running job, connection open", lambda: machine.get_status(0),
                            lambda: run_cmd(bed.ssh_shared("-o", "ControlMaster=no", "tb", "true")), runs * 2,
                            "ssh true via ControlMaster"))
        machine.cancel(grace=0)  # the job's whole process group, judged and killed on the host
    return rows


def snapshot_cases(bed: Bed, stackops, quick: bool, runs: int) -> list[dict]:
    """Hand-over of a job with a repo (500 files, 5 MB) and data (200 MiB; quick: 20 MiB): the first
    time (everything new to the host), the second time (nothing changed), and a job with neither."""
    mib = 20 if quick else 200
    plain = bed.local_home / "plainproj"
    plain.mkdir(exist_ok=True)
    (plain / "noop.py").write_text("def noop():\n    return None\n")
    there = bed.remote_home / "plainproj"  # a job without repo finds its code on the host already
    there.mkdir(exist_ok=True)
    shutil.copy(plain / "noop.py", there / "noop.py")
    if os.geteuid() == 0:
        for path in (there, there / "noop.py"):
            shutil.chown(path, bed.user, bed.user)
    firsts, seconds, plains = [], [], []

    def hand_over(func: str, **kw) -> float:
        config = stackops.RemoteStackOpsConfig(job_id=f"bench-{next(_fresh)}", ssh_host="tb", lock_resources=False,
                                               **kw)
        with stackops.RemoteMachine(func, config=config) as machine:
            return timed(machine.run)

    for k in range(min(runs, 5)):
        repo, data = bed.local_home / f"snaprepo{k}", bed.local_home / f"snapdata{k}"
        for i in range(500):  # fresh content each round: the first hand-over finds nothing on the host
            (repo / f"pkg{i % 10}").mkdir(parents=True, exist_ok=True)
            (repo / f"pkg{i % 10}" / f"m{i}.py").write_bytes(os.urandom(10000))
        (repo / "main.py").write_text("def noop():\n    return None\n")
        run_cmd(["git", "-C", str(repo), "init", "-q"])
        data.mkdir()
        for i in range(4):
            (data / f"part{i}.bin").write_bytes(os.urandom(mib * 1024 * 1024 // 4))
        func = f"{repo / 'main.py'}:noop"
        firsts.append(hand_over(func, copy_repo=True, data=[f"~/{data.name}"]))
        seconds.append(hand_over(func, copy_repo=True, data=[f"~/{data.name}"]))
        plains.append(hand_over(f"{plain / 'noop.py'}:noop"))
        shutil.rmtree(data)
        shutil.rmtree(bed.remote_home / data.name, ignore_errors=True)
    name = f"repo 500 files/5 MB + {mib} MiB data"
    rows = [absolute(f"hand-over, {name}: first", firsts),
            absolute(f"hand-over, {name}: second, unchanged", seconds),
            absolute("hand-over of a job without repo or data", plains)]
    first, second, bare = (statistics.median(v) for v in (firsts, seconds, plains))
    print(f"{'  second / first':48s} {second / first:9.3f}    (target <= 0.1)\n"
          f"{'  second / without repo or data':48s} {second / bare:9.3f}    (target <= 1.3)", flush=True)
    rows.append({"case": "hand-over ratios", "second_over_first": second / first,
                 "second_over_plain": second / bare, "unit": "ratio"})
    return rows


def _local_jobs(stackops, script: Path, count: int, slots: int) -> list:
    """Fire ``count`` jobs of ``script`` here with ``slots`` slots (a private state folder); wait for all."""
    os.environ["STACKOPS_STATE_DIR"] = str(Path(tempfile.mkdtemp(dir=os.environ["HOME"])))
    machines = []
    for _ in range(count):
        config = stackops.RemoteStackOpsConfig(job_id=f"local-{next(_fresh)}", max_simultaneous_jobs=slots)
        machines.append(stackops.RemoteMachine(str(script), config=config).run())
    for machine in machines:
        machine.wait(timeout=600)
    return machines


def _times(machine) -> tuple[float, float]:
    from datetime import datetime

    state = json.loads(machine.file_manager.path("logs/state.json").read_text())
    return tuple(datetime.fromisoformat(state[name]).timestamp()  # type: ignore[return-value]
                 for name in ("started", "ended"))


def slot_cases(bed: Bed, stackops, quick: bool) -> list[dict]:
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "nap.py").write_text("import time\ntime.sleep(0.4)\n")
    (project / "trivial.py").write_text("res = None\n")
    chain = sorted(_times(m) for m in _local_jobs(stackops, project / "nap.py", 5 if quick else 12, 1))
    gaps = [later[0] - earlier[1] for earlier, later in zip(chain, chain[1:])]
    rows = [absolute("slot hand-off: one job ends, the next starts", gaps, note="(target <= 100 ms)")]
    count, slots = (20, 4) if quick else (50, 4)
    started = time.time()
    machines = _local_jobs(stackops, project / "trivial.py", count, slots)
    fired = time.time() - started
    wall = max(_times(m)[1] for m in machines) - started
    rows.append(absolute(f"{count} trivial jobs, {slots} slots: wall per job", [wall / count],
                         note=f"(all fired in {fired:.2f} s, last ended after {wall:.2f} s)"))
    os.environ.pop("STACKOPS_STATE_DIR")
    return rows


_STOP_QUEUE = ('rm -rf -- "$S"/queue/*; read -r p t < "$S/dispatcher.pid" 2>/dev/null '
               '&& kill "$p" 2>/dev/null; true')  # a queue the bench filled: entries, then dispatcher


def sweep_cases(bed: Bed, stackops, quick: bool, runs: int) -> list[dict]:
    """A sweep submitted here (in-process queue entries, one dispatcher) and one sent to a host
    (one stream), against `ssh host true` plus sending the same bytes over ssh."""
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "sweepjob.py").write_text("def point(x):\n    return None\n")
    sys.path.insert(0, str(project))
    import sweepjob

    count = 1000 if quick else 10000
    state = Path(tempfile.mkdtemp(dir=os.environ["HOME"]))
    os.environ["STACKOPS_STATE_DIR"] = str(state)
    config = stackops.RemoteStackOpsConfig(job_id=f"sweep-{next(_fresh)}", max_simultaneous_jobs=4)
    grid = [{"x": index} for index in range(count)]
    try:
        took = timed(lambda: stackops.run_sweep(sweepjob.point, config, grid))
    finally:
        run_cmd(["bash", "-c", f"S={state}; {_STOP_QUEUE}"])
        os.environ.pop("STACKOPS_STATE_DIR")
    rows = [absolute(f"sweep of {count} trivial jobs, submit here", [took], unit="s",
                     note=f"({took / count * 1000:.2f} ms per job; target <= 10 s, <= 1 ms per job)")]
    hosted = 200 if quick else 1000
    grid = [{"x": index} for index in range(hosted)]
    payload = bed.base / "sweep-payload"
    payload.write_bytes(b"x" * len(json.dumps([[f"s-{i:04d}", {"a": json.dumps({"x": i}), "b": "f" * 260}]
                                               for i in range(hosted)])))

    def to_host():
        cfg = stackops.RemoteStackOpsConfig(job_id=f"hsweep-{next(_fresh)}", ssh_host="tb", copy_repo=True,
                                            max_simultaneous_jobs=4)
        with stackops.run_sweep(sweepjob.point, cfg, grid):
            pass
        every = f"for S in ~/tmp_results/remote_machines/file_manager/*/; do {_STOP_QUEUE}; done"
        run_cmd(bed.ssh("tb", f"bash -c {shlex.quote(every)}"))

    def reference():
        run_cmd(bed.ssh("tb", "true"))
        with open(payload, "rb") as source:
            run_cmd(bed.ssh("tb", "cat > /dev/null"), stdin=source)

    rows.append(compare(f"sweep of {hosted} jobs to a host", to_host, reference, max(1, runs // 2),
                        "ssh true + same bytes (<= 3x)"))
    return rows


def _clone_jobs(stackops, template, count: int) -> list:
    """``count`` prepared copies of a prepared job (hard links: the same files, their own ids), as a
    sweep makes them; returns their FileManagers."""
    root = template.file_manager.job_root
    managers = []
    for i in range(count):
        folder = root.parent / f"{root.name}-{i:05d}"
        shutil.copytree(root, folder, copy_function=os.link)
        for relative in (stackops.FILE_MANAGER_JSON, stackops.CONFIG_JSON, stackops.REMOTE_MACHINE_JSON):
            data = json.loads((root / relative).read_text())
            data["job_id"] = folder.name
            for part in ("config", "file_manager"):  # the job's own record holds both
                if isinstance(data.get(part), dict):
                    data[part]["job_id"] = folder.name
            (folder / relative).unlink()
            (folder / relative).write_text(json.dumps(data))
        managers.append(stackops.FileManager.from_job_root(folder))
    return managers


def _procs_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _ended(managers: list) -> list[tuple[float, float]]:
    from datetime import datetime

    times = []
    for manager in managers:
        try:
            state = json.loads(manager.path("logs/state.json").read_text())
            times.append(tuple(datetime.fromisoformat(state[name]).timestamp()
                               for name in ("started", "ended")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(times)


def queue_cases(bed: Bed, stackops, quick: bool) -> list[dict]:
    """A queue of 10,000 (quick: 200) trivial jobs on this machine, fired while all four slots are
    held from here: what the queue holds, the views, then the hand-off on one slot and the wall
    time on four."""
    count = 200 if quick else 10000
    state = Path(tempfile.mkdtemp(dir=os.environ["HOME"]))
    os.environ["STACKOPS_STATE_DIR"] = str(state)
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "trivial.py").write_text("res = None\n")
    config = stackops.RemoteStackOpsConfig(job_id=f"sweep{next(_fresh)}", max_simultaneous_jobs=4)
    template = stackops.RemoteMachine(str(project / "trivial.py"), config=config).run(run=False)
    managers = _clone_jobs(stackops, template, count)
    slots = stackops.Slots(state)
    slots._ensure()
    held = [stackops._try_flock(slots.slots / f"slot-{i}.lock") for i in range(4)]
    started = time.perf_counter()
    stackops.fire_jobs([m.job_root for m in managers])
    fired = time.perf_counter() - started
    time.sleep(1.0)
    pids = _procs_naming(str(state))
    rows = [absolute(f"memory held by {count} queued jobs", [sum(_rss_mib(pid) for pid in pids)], unit="MiB",
                     note=f"{len(pids)} process(es); fired in {fired:.1f} s (target <= 50 MiB)")]
    env = dict(os.environ, HOME=str(bed.local_home))
    for what in (["list", "--json"], ["queue"]):
        times = [timed(lambda what=what: run_cmd([sys.executable, "-m", "stackops", *what], cwd=HERE, env=env))
                 for _ in range(3)]
        rows.append(absolute(f"`{' '.join(what)}` with {count} jobs on the machine", times,
                             note="(target <= 500 ms)"))
    os.close(held.pop(0))  # one slot: each job's end hands it to the next
    while len(_ended(managers[:40])) < 31:
        time.sleep(0.2)
    chain = _ended(managers[:40])[:31]
    gaps = [later[0] - earlier[1] for earlier, later in zip(chain, chain[1:])]
    rows.append(absolute(f"slot hand-off with {count} queued", gaps, note="(median; target <= 50 ms)"))
    done_before = len(_ended(managers))
    released = time.time()
    for fd in held:
        os.close(fd)
    while slots.entries() or slots.holders():
        time.sleep(0.5)
    last = max(end for _, end in _ended(managers))
    ran = count - done_before
    rows.append(absolute(f"{count} trivial jobs on 4 slots: wall per job", [(last - released) / ran],
                         note=f"({ran} jobs in {last - released:.1f} s)"))
    listing = [sys.executable, "-m", "stackops", "list", "--json"]
    first = timed(lambda: run_cmd(listing, cwd=HERE, env=env))  # reads every ended job once
    times = [timed(lambda: run_cmd(listing, cwd=HERE, env=env)) for _ in range(3)]
    rows.append(absolute(f"`list --json` with {count} ended jobs", times,
                         note=f"(target <= 500 ms; the first list, which reads them all: "
                              f"{first * 1000:.0f} ms)"))
    os.environ.pop("STACKOPS_STATE_DIR")
    return rows


def cluster_case(bed: Bed, stackops, quick: bool, runs: int) -> list[dict]:
    """Cluster.run on 4 (and, unless quick, 16) hosts against the same on 1; the hosts' shells
    start in no time (no rc file)."""
    hosts = bed.add_nodes(4 if quick else 16)
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "work.py").write_text("def work(workload_params):\n    return workload_params.idx_start\n")

    def launch(on: list[str]):
        config = stackops.RemoteStackOpsConfig(copy_repo=True, lock_resources=False)
        with stackops.Cluster(f"{project}/work.py:work", on, config, job_id=f"cl-{next(_fresh)}") as cluster:
            cluster.run()

    launch(hosts)  # the first hand-over to each host sends the repo; the rows time unchanged ones
    rows = [compare("launch on 4 hosts vs 1 host (Cluster.run)", lambda: launch(hosts[:4]),
                    lambda: launch(hosts[:1]), runs, "the same on 1 host")]
    if len(hosts) >= 16:
        rows.append(compare("launch on 16 hosts vs 1 host (Cluster.run)", lambda: launch(hosts[:16]),
                            lambda: launch(hosts[:1]), runs, "the same on 1 host"))
    return rows


def slow_shell_cases(bed: Bed, stackops, runs: int) -> list[dict]:
    """A host as most GPU boxes are: its ~/.bashrc (conda or pyenv init) costs 100 ms, and every
    remote command pays it. The CLI's run and the API's run against one command on that host."""
    rc = bed.remote_home / ".bashrc"
    rc.write_text("sleep 0.1\n")
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "slowjob.py").write_text("res = None\n")
    there = bed.remote_home / "proj"  # a job without --copy-repo finds its file on the host
    there.mkdir(exist_ok=True)
    shutil.copy(project / "slowjob.py", there / "slowjob.py")
    if os.geteuid() == 0:
        for path in (rc, there, there / "slowjob.py"):
            shutil.chown(path, bed.user, bed.user)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as users run it

    def cli(*extra: str) -> None:
        run_cmd([sys.executable, str(HERE / "stackops.py"), "run", "proj/slowjob.py", "--host", "tb",
                 "--job-id", f"slow-{next(_fresh)}", *extra], cwd=bed.local_home, env=env)

    def api(ssh) -> None:
        config = stackops.RemoteStackOpsConfig(job_id=f"slow-{next(_fresh)}", ssh_host="tb")
        machine = stackops.RemoteMachine(str(project / "slowjob.py"), config=config)
        machine._ssh = ssh  # the open connection
        machine.run()

    try:
        cli("--copy-repo")  # the repo reaches the host once: the rows time an unchanged repo
        ssh_true = bed.ssh("tb", "true")
        rows = [compare("CLI run --host, host shell start 100 ms", cli, lambda: run_cmd(ssh_true), runs,
                        "ssh host true"),
                compare("CLI run --host --copy-repo (unchanged), shell 100 ms", lambda: cli("--copy-repo"),
                        lambda: run_cmd(ssh_true), runs, "ssh host true")]
        with stackops.SSH.from_config_file("tb") as ssh:
            rows.append(compare("RemoteMachine.run(), open connection, shell 100 ms", lambda: api(ssh),
                                lambda: ssh.run_shell_cmd_on_remote("true"), runs,
                                "`true` on that connection"))
    finally:
        rc.unlink()
    return rows


def cli_cases(stackops, runs: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as users run it
    run_cmd([sys.executable, "-m", "stackops", "--help"], cwd=HERE, env=env)  # writes the bytecode cache
    rows = [compare("CLI start: python stackops.py --help",
                    lambda: run_cmd([sys.executable, str(HERE / "stackops.py"), "--help"], env=env),
                    lambda: run_cmd([sys.executable, "-c", "pass"], env=env), runs * 2, "python -c pass")]
    rows.append(compare("CLI start: python -m stackops --help (cached)",
                        lambda: run_cmd([sys.executable, "-m", "stackops", "--help"], cwd=HERE, env=env),
                        lambda: run_cmd([sys.executable, "-c", "pass"], env=env), runs * 2, "python -c pass"))
    return rows


def cancel_case(bed: Bed, stackops, runs: int) -> list[dict]:
    """Cancel a running job here: from the call until its process group is gone and the status
    reads cancelled (SIGTERM honoured, so no grace is spent)."""
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "sleepy_cancel.py").write_text("import time\ntime.sleep(120)\n")
    values = []
    for _ in range(runs):
        config = stackops.RemoteStackOpsConfig(job_id=f"bench-cancel-{next(_fresh)}", lock_resources=False)
        machine = stackops.RemoteMachine(str(project / "sleepy_cancel.py"), config=config).run()
        while machine.get_status(0).status != "running":
            time.sleep(0.02)
        values.append(timed(machine.cancel))
    return [absolute("cancel a running job (here)", values, note="target: gone within 1 s")]


def slurm_case(bed: Bed, runs: int) -> list[dict]:
    """Hand-over to Slurm, CLI to CLI: `stackops run --slurm` against `sbatch --wrap true`, on a
    one-node cluster of the bench's own (the test suite's SlurmCluster; root only)."""
    needed = ("slurmctld", "slurmd", "sbatch")
    if os.geteuid() != 0 or not all(shutil.which(name) for name in needed) or not os.path.exists("/usr/sbin/munged"):
        print(f"{'Slurm hand-over':48s} skipped (needs root, slurm-wlm and munge)", flush=True)
        return []
    sys.path.insert(0, str(HERE))
    from test_stackops import SlurmCluster

    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="sb-slurm-")))
    home = bed.local_home
    (home / "slurmjob.py").write_text("def noop():\n    return None\n")
    # as the installed `stackops` runs: the module with its bytecode cached
    env = {k: v for k, v in cluster.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(HOME=str(home), PYTHONPATH=str(HERE))
    counter = itertools.count()
    reference = ["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"]
    try:
        def ours():
            run_cmd([sys.executable, "-m", "stackops", "run", "slurmjob.py:noop", "--slurm",
                     "--job-id", f"sl{next(counter)}"], cwd=home, env=env)

        def api():
            import stackops

            config = stackops.RemoteStackOpsConfig(job_id=f"sla{next(counter)}", launch_method="slurm")
            stackops.RemoteMachine(str(home / "slurmjob.py") + ":noop", config).run()

        ours()
        saved = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            rows = [compare("hand-over to Slurm (CLI, run --slurm)", ours,
                            lambda: run_cmd(reference, env=env), runs, "sbatch --wrap true"),
                    compare("hand-over to Slurm (RemoteMachine.run(), in process)", api,
                            lambda: run_cmd(reference, env=env), runs, "sbatch --wrap true")]
        finally:
            if saved is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = saved
        return rows
    finally:
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)


REPORT_JOB = """import os, time

def point(x, seconds=0.0):
    time.sleep(seconds or 0.05 + (x * 37 % 11) / 20)
    marker = os.path.expanduser(f"~/report-flaky-{x}")
    if x % 41 == 7 and not os.path.exists(marker):  # fails once, passes when retried
        open(marker, "w").close()
        raise RuntimeError(f"point {x}: the first attempt fails")
    if x % 29 == 3:
        raise ValueError(f"point {x}: the loss went to nan")
    return x
"""


def report_case(bed: Bed, stackops, quick: bool, png: str | None) -> list[dict]:
    """A real sweep here, 1,000 jobs (quick: 100) on 4 slots with --retries 1: some fail, some
    pass when retried, one is cancelled while it runs and the last ten while they wait. Its
    `report` page's size, and how long Chromium takes to draw it and a page of 10,000 jobs (the
    sweep's rows ten times over); ``png``: a screenshot of the sweep's page, a failed job clicked."""
    (bed.local_home / "proj").mkdir(exist_ok=True)
    (bed.local_home / "proj" / "reportjob.py").write_text(REPORT_JOB)
    count, sweep_id = 100 if quick else 1000, f"rsweep-{next(_fresh)}"
    grid = bed.base / "report-grid.jsonl"
    grid.write_text("".join(json.dumps({"x": x, "seconds": 600.0 if x == count // 2 else 0.0}) + "\n"
                            for x in range(count)))
    cli = [sys.executable, str(HERE / "stackops.py")]
    run_cmd([*cli, "run", "proj/reportjob.py:point", "--sweep", str(grid), "--job-id", sweep_id,
             "--max-jobs", "4", "--retries", "1"], cwd=bed.local_home)
    run_cmd([*cli, "cancel", *(f"{sweep_id}-{x:04d}" for x in range(count - 10, count))])
    sleeper = stackops.RemoteMachine.load(f"{sweep_id}-{count // 2:04d}")
    while sleeper.get_status(0).status != "running":
        time.sleep(0.5)
    time.sleep(5.0)
    run_cmd([*cli, "cancel", sleeper.job_id])
    subprocess.run([*cli, "wait", sweep_id], capture_output=True, check=False)
    page = bed.base / "report.html"
    run_cmd([*cli, "report", sweep_id, "-o", str(page)])
    rows = [absolute(f"report of a real sweep of {count} jobs: size", [page.stat().st_size / 1e3], "kB")]
    many = _ten_times(stackops._report_rows([sweep_id], None, None, stackops.DEFAULT_BASE_DIR))
    big = bed.base / "report-10000.html"
    big.write_text(stackops.render_report(many, f"{sweep_id}, ten times over"))
    rows.append(absolute(f"report of {len(many)} jobs: size", [big.stat().st_size / 1e3], "kB",
                         "(target <= 5,000 kB)"))
    return rows + _report_drawn(page, big, png)


def _ten_times(rows: list[dict]) -> list[dict]:
    """A sweep's report rows ten times over, each copy after the one before (ids made unique)."""
    from datetime import datetime, timedelta

    times = [datetime.fromisoformat(row[key]) for row in rows for key in ("submitted", "ended") if row[key]]
    span = max(times) - min(times) + timedelta(seconds=1)

    def shifted(text: str | None, k: int) -> str | None:
        return (datetime.fromisoformat(text) + k * span).isoformat() if text else text

    return [dict(row, job_id=f"{row['job_id']}-{k}", **{key: shifted(row[key], k) for key in
                                                       ("submitted", "started", "ended")})
            for k in range(10) for row in rows]


def _report_drawn(page: Path, big: Path, png: str | None) -> list[dict]:
    """Open both pages in a real headless Chromium: the time from navigation to drawn."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        print(f"{'report drawn in Chromium':48s} skipped (needs selenium, chromium, chromium-driver)")
        return []
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1400,820"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    rows = []
    try:
        for path in (page, big):
            drawn = []
            for _ in range(3):
                driver.get(path.as_uri())
                while not driver.execute_script("return document.body.dataset.drawnMs"):
                    time.sleep(0.05)
                drawn.append(int(driver.execute_script("return document.body.dataset.drawnMs")) / 1000)
            jobs = driver.execute_script("return JSON.parse(document.getElementById('data').textContent).jobs.length")
            rows.append(absolute(f"report of {jobs} jobs drawn in Chromium", drawn,
                                 note="from navigation start (target <= 2 s)"))
        if png:
            driver.get(page.as_uri())
            failed = driver.execute_script(
                "const D = JSON.parse(document.getElementById('data').textContent);"
                "return D.jobs.findIndex(j => D.states[j[6]] === 'failed' && j[15].length === 0)")
            bar = driver.find_element("css selector", f'rect.b[data-i="{failed}"]')
            driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", bar)
            driver.save_screenshot(png)
    finally:
        driver.quit()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller files and fewer runs (a smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="runs per case (default 7, quick 3)")
    parser.add_argument("--disk", action="store_true", help="keep both homes on disk instead of tmpfs")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--only", default="", help="comma-separated groups to run: ssh, transfer, job, snapshot, "
                                                   "slot, sweep, queue, slow, cluster, cli, cancel, slurm, "
                                                   "report (default: all but report)")
    parser.add_argument("--report-png", help="report: also save a screenshot of the sweep's page here "
                                             "(docs/report.png)")
    args = parser.parse_args()
    for tool in ("/usr/sbin/sshd", shutil.which("ssh"), shutil.which("scp"), shutil.which("rsync")):
        if not tool or not os.path.exists(tool):
            print("bench needs openssh-server, openssh-client and rsync", file=sys.stderr)
            return 2
    runs = args.runs or (3 if args.quick else 7)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: bytecode cached
    bed = Bed(args.disk)
    sys.path.insert(0, str(HERE))
    import stackops

    rows: list[dict] = []
    try:
        print(f"stackops benchmark: {runs} runs per case, medians; ratio = stackops / reference; homes on "
              f"{bed.where}; extra hosts: {'network namespaces' if bed.netns else 'loopback addresses'}\n",
              flush=True)
        groups = {"ssh": lambda: ssh_cases(bed, stackops, runs),
                  "transfer": lambda: transfer_cases(bed, stackops, args.quick, runs),
                  "job": lambda: job_cases(bed, stackops, runs),
                  "snapshot": lambda: snapshot_cases(bed, stackops, args.quick, runs),
                  "slot": lambda: slot_cases(bed, stackops, args.quick),
                  "sweep": lambda: sweep_cases(bed, stackops, args.quick, runs),
                  "queue": lambda: queue_cases(bed, stackops, args.quick),
                  "slow": lambda: slow_shell_cases(bed, stackops, runs),
                  "cluster": lambda: cluster_case(bed, stackops, args.quick, runs),
                  "cli": lambda: cli_cases(stackops, runs), "cancel": lambda: cancel_case(bed, stackops, runs),
                  "slurm": lambda: slurm_case(bed, runs),
                  "report": lambda: report_case(bed, stackops, args.quick, args.report_png)}
        wanted = [name.strip() for name in args.only.split(",") if name.strip()] or \
            [name for name in groups if name != "report"]  # a sweep of 1,000 real jobs, and Chromium
        for name in wanted:
            rows += groups[name]()
    finally:
        bed.close()
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
