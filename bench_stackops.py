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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
USER_ENV = dict(os.environ)  # before the bed points HOME and the SSH config at its own
ACCOUNT = f"sob{os.getpid()}"  # a login of this run's own: two runs (or a run and the tests) never share it
_fresh = itertools.count()


def _free_subnet(second: int) -> str:
    """A /24 ``10.<second>.<x>`` that no interface here is in: the namespaces of a run that was
    killed stay behind with theirs, and a host key of one of them must not meet ours."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for step in range(200):
        third = (os.getpid() + step) % 200 + 1
        if f" 10.{second}.{third}." not in used:
            return f"10.{second}.{third}"
    raise RuntimeError(f"every 10.{second}.x/24 is in use here")


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
        subnet = _free_subnet(232) if self.netns else ""
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

    def share_connection(self) -> None:
        """One open connection for the OpenSSH tools (ControlMaster), started once: a second
        `-o ControlMaster=yes -N -f` would find the socket taken and stay as a plain session that
        `-O exit` cannot reach, outliving the bench."""
        if subprocess.run(self.ssh_shared("-O", "check", "tb"), capture_output=True).returncode != 0:
            run_cmd(self.ssh_shared("-o", "ControlMaster=yes", "-o", "ControlPersist=600", "-N", "-f", "tb"))

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


def compare(name: str, ours, reference, runs: int, reference_name: str, between=None) -> dict:
    """Run both sides alternately ``runs`` times (``between``, untimed, after each of ours);
    medians and ratio, and the load average of the machine at the end."""
    mine, theirs = [], []
    for _ in range(runs):
        mine.append(timed(ours))
        if between is not None:
            between()
        theirs.append(timed(reference))
    row = {"case": name, "stackops_s": statistics.median(mine), "reference": reference_name,
           "reference_s": statistics.median(theirs), "samples": runs, "load": os.getloadavg()[0]}
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
    bed.share_connection()
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
        bed.share_connection()
        python = bed.ssh_shared("-o", "ControlMaster=no", "tb", "python3 -S -c pass")
        rows.append(compare("status of a running job, connection open", lambda: machine.get_status(0),
                            lambda: run_cmd(python), runs * 2,
                            "ControlMaster python3 -S -c pass (<= +50 ms)"))
        rows[-1]["difference_s"] = rows[-1]["stackops_s"] - rows[-1]["reference_s"]
        print(f"{'  difference':48s} {rows[-1]['difference_s'] * 1000:9.1f} ms  (target <= 50 ms)", flush=True)
        machine.cancel(grace=0)  # the job's whole process group, judged and killed on the host
    return rows


# A file written less than 2 s (stackops.RACY_NS) before it is used is hashed at every use, never
# trusted by its stamps (git's racy rule); the hand-over cases wait that long after writing their
# trees, as a user's files are older than that, so that "unchanged" measures the shortcut.
RACY_WAIT = 2.2


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
        time.sleep(RACY_WAIT)  # as a user's files are: not written within the racy window
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


def big_repo_case(bed: Bed, stackops, quick: bool, runs: int) -> list[dict]:
    """A job with a repo of 5,000 files (quick: 1,000; 2 KiB each, a fresh repo each round) handed
    over to a host: the first time, against `tar c | ssh host tar x` of the same folder, and
    again unchanged, against `ssh host true`."""
    files = 1000 if quick else 5000
    firsts, seconds, tars, trues = [], [], [], []
    for k in range(max(2, min(runs, 4))):
        repo = bed.local_home / f"bigrepo{k}"
        for i in range(files):
            (repo / f"pkg{i % 50}").mkdir(parents=True, exist_ok=True)
            (repo / f"pkg{i % 50}" / f"m{i}.py").write_bytes(os.urandom(2048))
        (repo / "main.py").write_text("def noop():\n    return None\n")
        run_cmd(["git", "-C", str(repo), "init", "-q"])
        time.sleep(RACY_WAIT)  # as a user's files are: not written within the racy window

        def hand_over() -> None:
            config = stackops.RemoteStackOpsConfig(job_id=f"big-{next(_fresh)}", ssh_host="tb", copy_repo=True,
                                                   lock_resources=False)
            with stackops.RemoteMachine(f"{repo / 'main.py'}:noop", config=config) as machine:
                machine.run()

        firsts.append(timed(hand_over))
        seconds.append(timed(hand_over))
        target = f"~/tarcopy-{next(_fresh)}"
        tar = f"tar c -C {shlex.quote(str(repo))} . | {shlex.join(bed.ssh('tb', f'mkdir {target} && tar x -C {target}'))}"
        tars.append(timed(lambda: run_cmd(["bash", "-c", tar])))
        trues.append(timed(lambda: run_cmd(bed.ssh("tb", "true"))))
        shutil.rmtree(repo)
    first, second = statistics.median(firsts), statistics.median(seconds)
    rows = []
    for name, mine, theirs, peer in ((f"submit with a {files}-file repo: first", firsts, tars,
                                      "tar c | ssh host tar x"),
                                     (f"submit with a {files}-file repo: unchanged", seconds, trues,
                                      "ssh host true")):
        row = {"case": name, "stackops_s": statistics.median(mine), "reference": peer,
               "reference_s": statistics.median(theirs), "samples": len(mine), "load": os.getloadavg()[0]}
        row["ratio"] = row["stackops_s"] / row["reference_s"]
        print(f"{name:48s} {row['stackops_s'] * 1000:9.1f} ms  {peer:30s} {row['reference_s'] * 1000:9.1f} ms"
              f"  ratio {row['ratio']:5.2f}", flush=True)
        rows.append(row)
    print(f"{'  unchanged / first':48s} {second / first:9.3f}    (target <= 0.1)", flush=True)
    return rows


def proptest_case(runs: int = 10) -> list[dict]:
    """The property tests (`-k "property or state_machine or every_place"`: the hypothesis tests and state
    machines, 2 pytest workers) run ``runs`` times while CPU hogs (two busy loops per core, and two
    more) keep the load average at 6 or above: how many passed, and the load average at the start
    and the end of each run. A test that fails only under load shows here, never as a timed
    assertion."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 * (os.cpu_count() or 2) + 2)]
    results, loads = [], []
    try:
        time.sleep(60)  # the load average follows over a minute: let it climb
        for _ in range(runs):
            loads.append(os.getloadavg()[0])
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                                   "test_stackops.py", "-k", "property or state_machine or every_place"],
                                  cwd=HERE, capture_output=True, text=True, env=USER_ENV)
            loads.append(os.getloadavg()[0])
            print(f"  run {len(results) + 1}: {done.stdout.strip().splitlines()[-1]} "
                  f"(load {loads[-2]:.1f} at its start, {loads[-1]:.1f} at its end)", flush=True)
            results.append(done.returncode == 0)
            if done.returncode != 0:
                print("\n".join(line for line in done.stdout.splitlines() if line.startswith(("FAILED", "E "))),
                      flush=True)
    finally:
        for hog in hogs:  # ours, by pid
            hog.kill()
            hog.wait()
    note = (f"{sum(results)} of {runs} runs passed; load average {min(loads):.1f}-{max(loads):.1f} "
            "(target: all pass at load >= 6)")
    print(f"{'property tests under a CPU hog':48s} {note}", flush=True)
    return [{"case": "property tests under a CPU hog", "unit": "runs", "passed": sum(results), "runs": runs,
             "load_min": min(loads), "load_max": max(loads), "note": note}]


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


TRIVIAL_JOB = "def point(x):\n    return None\n"


def _module_call(folder: Path, x: str) -> str:
    """The trivial job as one Python line: the same function call the stackops jobs make."""
    return f"import sys; sys.path.insert(0, {str(folder)!r}); import trivialjob; trivialjob.point({x})"


def local_peer_cases(bed: Bed, quick: bool, runs: int) -> list[dict]:
    """200 trivial Python jobs (the same function, the same interpreter), 4 at a time: a stackops
    sweep from the command line (submit, then `wait`) against GNU parallel -j4 and task-spooler
    -S 4 (each started by a shell loop, as a user would), and nq, which runs its queue one at a
    time (its row is beside them for scale). Wall time from the first command to the last job's
    end; alternated, medians."""
    count = 40 if quick else 200
    folder = bed.local_home / "peers"
    folder.mkdir(exist_ok=True)
    (folder / "trivialjob.py").write_text(TRIVIAL_JOB)
    (folder / "grid.jsonl").write_text("".join(json.dumps({"x": x}) + "\n" for x in range(count)))
    python = sys.executable
    env = dict(os.environ, PYTHONPATH=str(HERE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    missing = [tool for tool in ("parallel", "tsp", "nq") if shutil.which(tool) is None]
    if missing:
        print(f"{'local queue vs peers':48s} skipped (missing: {', '.join(missing)}; "
              "apt-get install parallel task-spooler nq)", flush=True)
        return []
    state = bed.base / "peer-state"

    def ours() -> None:
        sweep = f"peer{next(_fresh)}"
        shutil.rmtree(state, ignore_errors=True)
        run_cmd([python, "-m", "stackops", "run", "trivialjob.py:point", "--sweep", "grid.jsonl",
                 "--max-jobs", "4", "--job-id", sweep], cwd=folder, env=dict(env, STACKOPS_STATE_DIR=str(state)))
        run_cmd([python, "-m", "stackops", "wait", sweep], cwd=folder, env=env)

    call = _module_call(folder, "{}")
    parallel = ["parallel", "--will-cite", "-q", "-j4", python, "-c", call, ":::", *map(str, range(count))]
    spool = bed.base / "ts"
    spool.mkdir(exist_ok=True)
    one = shlex.quote(_module_call(folder, "$x"))
    # a fresh server numbers its jobs from 0 (tsp -n prints no id when its output is not a terminal)
    tsp_script = (f'tsp -S 4 && for x in $(seq 0 {count - 1}); do tsp -n {python} -c "{one[1:-1]}"; '
                  f'done && for id in $(seq 0 {count - 1}); do tsp -w "$id" >/dev/null 2>&1; done; tsp -K')
    tsp_env = dict(env, TS_SOCKET=str(spool / "socket"), TMPDIR=str(spool), TS_MAXFINISHED=str(count + 10))
    nq_dir = bed.base / "nq"
    nq_script = (f'rm -rf {nq_dir} && mkdir {nq_dir} && for x in $(seq 0 {count - 1}); do '
                 f'nq -q {python} -c "{one[1:-1]}"; done && nq -w')
    sides = {"stackops": ours,
             "GNU parallel -j4": lambda: run_cmd(parallel, env=env),
             "task-spooler -S 4": lambda: run_cmd(["bash", "-c", tsp_script], env=tsp_env),
             "nq (serial)": lambda: run_cmd(["bash", "-c", nq_script], env=dict(env, NQDIR=str(nq_dir)))}
    walls: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(max(1, runs // 2) if not quick else 1):
        for name, side in sides.items():
            walls[name].append(timed(side))
    mine = statistics.median(walls["stackops"])
    rows = []
    for name in list(sides)[1:]:
        theirs = statistics.median(walls[name])
        row = {"case": f"{count} trivial Python jobs, 4 slots: stackops sweep (CLI)", "stackops_s": mine,
               "reference": name, "reference_s": theirs, "ratio": mine / theirs,
               "samples": len(walls[name]), "load": os.getloadavg()[0]}
        print(f"{row['case']:48s} {mine * 1000:9.1f} ms  {name:30s} {theirs * 1000:9.1f} ms  "
              f"ratio {row['ratio']:5.2f}", flush=True)
        rows.append(row)
    print(f"{'  per job':48s} {mine / count * 1000:9.1f} ms  "
          + "  ".join(f"{name} {statistics.median(v) / count * 1000:.1f} ms" for name, v in walls.items()
                      if name != "stackops"), flush=True)
    _remove_jobs(bed, "peer")
    return rows


def _remove_jobs(bed: Bed, prefix: str) -> None:
    """Delete this bench's ended job folders named ``prefix``* (outside any timing)."""
    queued = bed.local_home / "tmp_results" / "remote_machines" / "jobs" / "queued"
    for folder in queued.glob(f"{prefix}*"):
        shutil.rmtree(folder, ignore_errors=True)


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
    """A sweep of 10,000 (quick: 500) trivial jobs queued on this machine while all four slots are
    held from here: what the queue holds, `list --json` and `status SWEEP` while they wait; the
    hand-off on one slot; then the rest cancelled (one command) and the views of 10,000 ended
    jobs, after a first `list` has read them once."""
    count = 500 if quick else 10000
    state = Path(tempfile.mkdtemp(dir=os.environ["HOME"]))
    os.environ["STACKOPS_STATE_DIR"] = str(state)
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "trivialjob.py").write_text(TRIVIAL_JOB)
    sys.path.insert(0, str(project))
    import trivialjob

    sweep = f"qsweep{next(_fresh)}"
    slots = stackops.Slots(state)
    slots._ensure()
    held = [stackops._try_flock(slots.slots / f"slot-{i}.lock") for i in range(4)]
    config = stackops.RemoteStackOpsConfig(job_id=sweep, max_simultaneous_jobs=4)
    fired = timed(lambda: stackops.run_sweep(trivialjob.point, config, [{"x": x} for x in range(count)]))
    managers = [stackops.FileManager.from_job_root(root) for root in _member_roots(bed, sweep)]
    time.sleep(1.0)
    pids = _procs_naming(str(state))
    rows = [absolute(f"memory held by {count} queued jobs", [sum(_rss_mib(pid) for pid in pids)], unit="MiB",
                     note=f"{len(pids)} process(es); sweep submitted and fired in {fired:.1f} s "
                          "(target <= 50 MiB)")]
    env = dict(os.environ, HOME=str(bed.local_home), PYTHONPATH=str(HERE))
    rows += _views(env, count, sweep, "queued")
    os.close(held.pop(0))  # one slot: each job's end hands it to the next
    while len(_ended(managers[:40])) < 31:
        time.sleep(0.2)
    chain = _ended(managers[:40])[:31]
    gaps = [later[0] - earlier[1] for earlier, later in zip(chain, chain[1:])]
    rows.append(absolute(f"slot hand-off with {count} queued", gaps, note="(median; target <= 50 ms)"))
    cancel = [sys.executable, "-m", "stackops", "cancel", sweep]
    took = timed(lambda: run_cmd(cancel, env=env))
    for fd in held:
        os.close(fd)
    while slots.holders():
        time.sleep(0.2)
    listing = [sys.executable, "-m", "stackops", "list", "--json"]
    first = timed(lambda: run_cmd(listing, env=env))  # reads every ended job once
    rows += _views(env, count, sweep, "ended", f"; cancel of the sweep {took:.1f} s, the first list, "
                                                f"which reads them all, {first * 1000:.0f} ms")
    os.environ.pop("STACKOPS_STATE_DIR")
    _remove_jobs(bed, sweep)
    return rows


def _racy_window_s() -> float:
    import stackops
    return stackops.RACY_NS / 1e9 + 0.1


def _member_roots(bed: Bed, sweep: str) -> list[Path]:
    queued = bed.local_home / "tmp_results" / "remote_machines" / "jobs" / "queued"
    ids = json.loads((queued / sweep / "data" / "sweep.json").read_text())["ids"]
    return [queued / job_id for job_id in ids]


def _views(env: dict, count: int, sweep: str, what: str, note: str = "") -> list[dict]:
    """`list --json` and `status SWEEP` (CLI, module cached) with ``count`` jobs: 3 runs each,
    after one read (untimed) once the records are older than the cache's racy window (a record
    written within it may change unseen in the same clock tick, so it is read, not trusted)."""
    rows = []
    time.sleep(_racy_window_s())
    for argv in (["list", "--json"], ["status", sweep]):
        run_cmd([sys.executable, "-m", "stackops", *argv], env=env)
        times = [timed(lambda argv=argv: run_cmd([sys.executable, "-m", "stackops", *argv], env=env))
                 for _ in range(3)]
        name = "status SWEEP" if argv[0] == "status" else " ".join(argv)
        rows.append(absolute(f"`{name}` with {count} {what} jobs", times, note=f"(target <= 500 ms{note})"))
    return rows


def host_list_case(bed: Bed, stackops, quick: bool, runs: int) -> list[dict]:
    """`list --host` of a host holding 1,000 (quick: 200) jobs: how many round trips it makes
    (SSH channels opened, counted in process), and its time from the command line against
    `ssh host true`."""
    import io
    from contextlib import redirect_stdout

    import paramiko

    count = 200 if quick else 1000
    project = bed.local_home / "proj"
    project.mkdir(exist_ok=True)
    (project / "trivialjob.py").write_text(TRIVIAL_JOB)
    sys.path.insert(0, str(project))
    import trivialjob

    config = stackops.RemoteStackOpsConfig(job_id=f"hl{next(_fresh)}", ssh_host="tb", copy_repo=True,
                                           max_simultaneous_jobs=4)
    with stackops.run_sweep(trivialjob.point, config, [{"x": x} for x in range(count)], run=False):
        pass  # handed over, not started: every one of them is a job folder on the host
    opened: list[str] = []
    original = paramiko.Channel.exec_command

    def counting(channel, command):
        opened.append(command)
        return original(channel, command)

    paramiko.Channel.exec_command = counting
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            stackops.main(["list", "--host", "tb", "--json"])
    finally:
        paramiko.Channel.exec_command = original
    listed = len(json.loads(out.getvalue()))
    rows = [absolute(f"`list --host` of {listed} jobs: round trips", [len(opened)], unit="count",
                     note="(commands run on the host; target 1)")]
    env = dict(os.environ, PYTHONPATH=str(HERE))
    rows.append(compare(f"CLI list --host with {listed} jobs",
                        lambda: run_cmd([sys.executable, "-m", "stackops", "list", "--host", "tb", "--json"], env=env),
                        lambda: run_cmd(bed.ssh("tb", "true")), runs, "ssh host true"))
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
    (project / "slowsleep.py").write_text("import time\ntime.sleep(600)\n")
    there = bed.remote_home / "proj"  # a job without --copy-repo finds its file on the host
    there.mkdir(exist_ok=True)
    for name in ("slowjob.py", "slowsleep.py"):
        shutil.copy(project / name, there / name)
    if os.geteuid() == 0:
        for path in (rc, there, there / "slowjob.py", there / "slowsleep.py"):
            shutil.chown(path, bed.user, bed.user)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as users run it
    env["PYTHONPATH"] = str(HERE)  # the module, its bytecode cached: as the installed command runs
    last: list[str] = []

    def cli(*extra: str) -> None:
        last[:] = [f"slow-{next(_fresh)}"]
        run_cmd([sys.executable, "-m", "stackops", "run", "proj/slowjob.py", "--host", "tb",
                 "--job-id", last[0], *extra], cwd=bed.local_home, env=env)

    def api(ssh) -> None:
        config = stackops.RemoteStackOpsConfig(job_id=f"slow-{next(_fresh)}", ssh_host="tb")
        machine = stackops.RemoteMachine(str(project / "slowjob.py"), config=config)
        machine._ssh = ssh  # the open connection
        machine.run()

    try:
        cli("--copy-repo")  # the repo reaches the host once: the rows time an unchanged repo
        ssh_true = bed.ssh("tb", "true")
        rows = [compare("CLI run --host, host shell start 100 ms", cli, lambda: run_cmd(ssh_true), runs,
                        "ssh host true (target <= 1.3x)"),
                compare("CLI run --host --copy-repo (unchanged), shell 100 ms", lambda: cli("--copy-repo"),
                        lambda: run_cmd(ssh_true), runs, "ssh host true")]
        run_cmd([sys.executable, "-m", "stackops", "run", "proj/slowsleep.py", "--host", "tb", "--job-id",
                 "slow-sleeper"], cwd=bed.local_home, env=env)  # a job that runs: its status asks the host
        status = [sys.executable, "-m", "stackops", "status", "slow-sleeper"]
        rows.append(compare("CLI status of a running job on a host, shell 100 ms",
                            lambda: run_cmd(status, env=env),
                            lambda: run_cmd(ssh_true), runs, "ssh host true (target <= 1.2x)"))
        run_cmd([sys.executable, "-m", "stackops", "cancel", "slow-sleeper"], env=env)
        with stackops.SSH.from_config_file("tb") as ssh:
            rows.append(compare("RemoteMachine.run(), open connection, shell 100 ms", lambda: api(ssh),
                                lambda: ssh.run_shell_cmd_on_remote("true"), runs,
                                "`true` on that connection"))
    finally:
        rc.unlink()
    return rows


def _installed(bed: Bed) -> Path | None:
    """A virtual environment with this checkout installed as a user installs it (pip, a wheel:
    the `stackops` console script, bytecode compiled at install); its bin folder."""
    venv = bed.base / "venv"
    if not (venv / "bin" / "stackops").exists():
        try:  # pip fetches the build backend (setuptools) from the package index once
            run_cmd([sys.executable, "-m", "venv", str(venv)])
            run_cmd([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(HERE)])
        except subprocess.CalledProcessError as exc:
            print(f"{'installed stackops':48s} skipped: {exc.stderr.decode(errors='replace')[-300:]}", flush=True)
            return None
    return venv / "bin"


def cli_cases(bed: Bed, runs: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as users run it
    env["PYTHONPATH"] = str(HERE)
    run_cmd([sys.executable, "-m", "stackops", "--help"], env=env)  # writes the bytecode cache
    bare = [sys.executable, "-c", "pass"]
    rows = [compare("CLI start: python stackops.py --help",
                    lambda: run_cmd([sys.executable, str(HERE / "stackops.py"), "--help"], env=env),
                    lambda: run_cmd(bare, env=env), runs * 2, "python -c pass (target <= 4x)")]
    rows.append(compare("CLI start: python -m stackops --help (cached)",
                        lambda: run_cmd([sys.executable, "-m", "stackops", "--help"], env=env),
                        lambda: run_cmd(bare, env=env), runs * 2, "python -c pass (target <= 1.3x)"))
    folder = bed.local_home / "peers"
    folder.mkdir(exist_ok=True)
    (folder / "trivialjob.py").write_text(TRIVIAL_JOB)
    state = bed.base / "cli-state"

    def one_job() -> None:
        run_cmd([sys.executable, "-m", "stackops", "run", "trivialjob.py:point", "--kwargs", '{"x": 1}',
                 "--job-id", f"clijob{next(_fresh)}"], cwd=folder, env=dict(env, STACKOPS_STATE_DIR=str(state)))

    def settled() -> None:  # the job ran before the next sample (outside the timing)
        while any(True for _ in state.glob("queue/*")) or (state / "dispatcher.pid").exists():
            time.sleep(0.05)

    rows.append(compare("python -m stackops run FILE:F (one job, detached)", one_job,
                        lambda: run_cmd(bare, env=env), runs * 2, "python -c pass (target <= 1.8x)", settled))
    settled()
    _remove_jobs(bed, "clijob")
    bin_dir = _installed(bed)
    if bin_dir is not None:
        plain = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        rows.append(compare("CLI start: installed `stackops --help`",
                            lambda: run_cmd([str(bin_dir / "stackops"), "--help"], env=plain),
                            lambda: run_cmd([str(bin_dir / "python"), "-c", "pass"], env=plain), runs * 2,
                            "its python -c pass (target <= 1.3x)"))
        # pip's console script imports re before it imports stackops: the floor of any such script
        rows.append(compare("CLI start: installed `stackops --help` (floor)",
                            lambda: run_cmd([str(bin_dir / "stackops"), "--help"], env=plain),
                            lambda: run_cmd([str(bin_dir / "python"), "-c", "import re"], env=plain),
                            runs * 2, "its python -c 'import re', pip's script's own import"))
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
            submit = _submitit(home)
            if submit is not None:
                rows.append(compare("Slurm in process (RemoteMachine.run())", api, submit, runs * 2,
                                    "submitit AutoExecutor.submit (<= 0.5x)"))
            rows += _slurm_array(home, env, counter)
        finally:
            if saved is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = saved
        return rows
    finally:
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)


def _submitit(home: Path):
    """submitit's AutoExecutor.submit of the same function on the same cluster (submitit from
    PyPI, installed here when missing); None when it cannot be had."""
    try:
        import submitit
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "submitit"], capture_output=True)
        if done.returncode != 0:
            print(f"{'submitit':48s} skipped (pip install submitit failed)", flush=True)
            return None
        import submitit
    sys.path.insert(0, str(home))
    import slurmjob

    executor = submitit.AutoExecutor(folder=str(home / "submitit" / "%j"), cluster="slurm")
    executor.update_parameters(timeout_min=10)
    return lambda: executor.submit(slurmjob.noop)


def _slurm_array(home: Path, env: dict, counter) -> list[dict]:
    """A 1,000-task array (a workload of 1,000 parts; 2 tasks at a time): the CLI's `status` of
    it, its time and its peak memory (target 1 s and 100 MiB)."""
    import stackops

    tasks = 1000
    (home / "slurmarray.py").write_text("def part(workload_params):\n    return workload_params.idx_start\n")
    workload = stackops.WorkloadParams(idx_min=0, idx_max=tasks, idx_start=0, idx_end=tasks, jobs=tasks)
    config = stackops.RemoteStackOpsConfig(job_id=f"arr{next(counter)}", launch_method="slurm",
                                           workload_params=workload, max_simultaneous_jobs=2)
    submitted = timed(lambda: stackops.RemoteMachine(str(home / "slurmarray.py") + ":part", config).run())
    times, peaks = [], []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "stackops", "status",
                               config.job_id], capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"status of the array failed: {done.stderr[-500:]}")
        peaks.append(int(done.stderr.split()[-1]) / 1024)
    rows = [absolute(f"`status` of a {tasks}-task Slurm array", times,
                     note=f"(target <= 1 s; the array was handed over in {submitted:.1f} s)"),
            absolute(f"`status` of a {tasks}-task Slurm array: peak memory", peaks, unit="MiB",
                     note="(target <= 100 MiB)")]
    run_cmd(["scancel", stackops.RemoteMachine.load(config.job_id).slurm_job_id or "0"], env=env)
    return rows


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
                                                   "bigrepo, slot, local, sweep, queue, slow, hostlist, cluster, "
                                                   "cli, cancel, slurm, report, proptest (default: all but report "
                                                   "and proptest)")
    parser.add_argument("--report-png", help="report: also save a screenshot of the sweep's page here "
                                             "(docs/report.png)")
    args = parser.parse_args()
    for tool in ("/usr/sbin/sshd", shutil.which("ssh"), shutil.which("scp"), shutil.which("rsync")):
        if not tool or not os.path.exists(tool):
            print("bench needs openssh-server, openssh-client and rsync", file=sys.stderr)
            return 2
    runs = args.runs or (3 if args.quick else 7)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: bytecode cached
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: its servers and hosts go too
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
                  "bigrepo": lambda: big_repo_case(bed, stackops, args.quick, runs),
                  "proptest": lambda: proptest_case(3 if args.quick else 10),
                  "local": lambda: local_peer_cases(bed, args.quick, runs),
                  "sweep": lambda: sweep_cases(bed, stackops, args.quick, runs),
                  "queue": lambda: queue_cases(bed, stackops, args.quick),
                  "slow": lambda: slow_shell_cases(bed, stackops, runs),
                  "hostlist": lambda: host_list_case(bed, stackops, args.quick, runs),
                  "cluster": lambda: cluster_case(bed, stackops, args.quick, runs),
                  "cli": lambda: cli_cases(bed, runs), "cancel": lambda: cancel_case(bed, stackops, runs),
                  "slurm": lambda: slurm_case(bed, runs),
                  "report": lambda: report_case(bed, stackops, args.quick, args.report_png)}
        wanted = [name.strip() for name in args.only.split(",") if name.strip()] or \
            [name for name in groups if name not in ("report", "proptest")]  # Chromium; minutes of tests
        for name in wanted:
            rows += groups[name]()
    finally:
        bed.close()
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
