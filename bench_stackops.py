"""Benchmarks of stackops against the OpenSSH tools, measured alternately in the same run.

    python bench_stackops.py [--quick] [--json out.json] [--runs N]

It starts its own sshd on loopback (as root: logging in as a dedicated account, so that no
shell start-up file of root's distorts the figures), runs every case several times, and prints
the median of each side and their ratio (stackops / reference; below 1.0 means stackops is faster).
Needs: openssh-server, openssh-client (ssh, scp), rsync, and paramiko.
"""

from __future__ import annotations

import argparse
import json
import os
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
ACCOUNT = "stackopsbench"  # not the test suite's account: both may run at once


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Bed:
    """A loopback sshd, an ssh_config for both OpenSSH and stackops, and a private local home."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="stackops-bench-"))
        self.base.chmod(0o755)
        self.local_home = self.base / "local-home"
        self.local_home.mkdir()
        self.remote_home = self.base / "remote-home"
        self.remote_home.mkdir()
        self.user = self._account()
        self.port = free_port()
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.base / name)], check=True)
        keys = self.base / "keys"
        keys.mkdir(mode=0o711)
        shutil.copy(self.base / "client_key.pub", keys / "authorized")
        (keys / "authorized").chmod(0o644)
        config = self.base / "sshd.conf"
        config.write_text(textwrap.dedent(f"""
            Port {self.port}
            ListenAddress 127.0.0.1
            HostKey {self.base / "host_key"}
            PidFile none
            AuthorizedKeysFile {keys / "authorized"}
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            MaxSessions 100
            Subsystem sftp internal-sftp
        """) + ("" if os.geteuid() == 0 else f"SetEnv HOME={self.remote_home}\n"))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_port()
        host_key = " ".join((self.base / "host_key.pub").read_text().split()[:2])
        (self.base / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_key}\n")
        self.ssh_config = self.base / "ssh_config"
        self.ssh_config.write_text(textwrap.dedent(f"""
            Host tb
              HostName 127.0.0.1
              Port {self.port}
              User {self.user}
              IdentityFile {self.base / "client_key"}
              IdentitiesOnly yes
              BatchMode yes
              UserKnownHostsFile {self.base / "known_hosts"}
              StrictHostKeyChecking yes
              ControlPath {self.base / "cm-%C"}
        """))
        os.environ["HOME"] = str(self.local_home)
        os.environ["STACKOPS_SSH_CONFIG"] = str(self.ssh_config)

    def _account(self) -> str:
        if os.geteuid() != 0:
            return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        if subprocess.run(["id", ACCOUNT], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-M", "-s", "/bin/bash", "-d", str(self.remote_home), ACCOUNT], check=True)
        subprocess.run(["usermod", "-d", str(self.remote_home), "-p", "*", ACCOUNT], check=True)
        shutil.chown(self.remote_home, ACCOUNT, ACCOUNT)
        return ACCOUNT

    def _wait_port(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start")

    def ssh(self, *args: str) -> list[str]:
        """ssh without connection sharing (an explicit ControlMaster=no -o ControlPath=... re-enables it)."""
        return ["ssh", "-F", str(self.ssh_config), "-o", "ControlPath=none", *args]

    def ssh_shared(self, *args: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), *args]

    def close(self) -> None:
        subprocess.run(self.ssh_shared("-O", "exit", "tb"), capture_output=True)
        self.sshd.kill()  # ours, by pid
        self.sshd.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def compare(name: str, ours, reference, runs: int, reference_name: str, setup=None) -> dict:
    """Run both sides alternately ``runs`` times; medians and ratio."""
    mine, theirs = [], []
    for i in range(runs):
        if setup:
            setup(i)
        mine.append(timed(lambda i=i: ours(i)))
        if setup:
            setup(i)
        theirs.append(timed(lambda i=i: reference(i)))
    row = {"case": name, "stackops_s": statistics.median(mine), "reference": reference_name,
           "reference_s": statistics.median(theirs)}
    row["ratio"] = row["stackops_s"] / row["reference_s"]
    print(f"{name:44s} {row['stackops_s'] * 1000:9.1f} ms  {reference_name:28s} {row['reference_s'] * 1000:9.1f} ms"
          f"  ratio {row['ratio']:5.2f}", flush=True)
    return row


def run(bed: Bed, quick: bool, runs: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    import stackops

    rows = []
    run_cmd = lambda cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731

    def connect_and_true(_):
        with stackops.SSH.from_config_file("tb") as ssh:
            ssh.run_shell_cmd_on_remote("true")

    rows.append(compare("connect + run `true`", connect_and_true, lambda _: run_cmd(bed.ssh("tb", "true")), runs,
                        "ssh host true"))
    subprocess.Popen(bed.ssh_shared("-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-N", "-f", "tb")).wait()
    with stackops.SSH.from_config_file("tb") as ssh:
        rows.append(compare("run `true`, connection open", lambda _: ssh.run_shell_cmd_on_remote("true"),
                            lambda _: run_cmd(bed.ssh_shared("-o", "ControlMaster=no", "tb", "true")), runs * 3,
                            "ssh true via ControlMaster"))

        size = (50 if quick else 200) * 2**20
        blob = bed.local_home / "blob.bin"
        with open(blob, "wb") as handle:
            for _ in range(size // 2**20):
                handle.write(os.urandom(2**20))
        mib = size // 2**20

        def clear(_):
            subprocess.run(bed.ssh("tb", "rm -rf ~/blob-up ~/blob-scp"), check=True)
            for path in ("blob-down", "blob-scp-down"):
                (bed.local_home / path).unlink(missing_ok=True)

        rows.append(compare(f"{mib} MiB upload", lambda _: ssh.copy_from_here(blob, "~/blob-up"),
                            lambda _: run_cmd(["scp", "-q", "-F", str(bed.ssh_config), str(blob), "tb:blob-scp"]),
                            max(3, runs // 2), "scp", setup=clear))
        ssh.copy_from_here(blob, "~/blob-src", overwrite_existing=True)
        rows.append(compare(f"{mib} MiB download",
                            lambda _: ssh.copy_to_here("~/blob-src", bed.local_home / "blob-down"),
                            lambda _: run_cmd(["scp", "-q", "-F", str(bed.ssh_config), "tb:blob-src",
                                               str(bed.local_home / "blob-scp-down")]),
                            max(3, runs // 2), "scp", setup=clear))

        files = 500 if quick else 2000
        tree = bed.local_home / "tree"
        for i in range(files):
            folder = tree / f"d{i % 20:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"f{i}.bin").write_bytes(os.urandom(4096))

        def clear_trees(_):
            subprocess.run(bed.ssh("tb", "rm -rf ~/tree-up ~/tree-rsync"), check=True)

        rows.append(compare(f"{files} x 4 KiB folder upload",
                            lambda _: ssh.copy_from_here(tree, "~/tree-up", recursive=True),
                            lambda _: run_cmd(["rsync", "-a", "-e", f"ssh -F {bed.ssh_config}", f"{tree}/",
                                               "tb:tree-rsync/"]),
                            runs, "rsync -a", setup=clear_trees))

    project = bed.local_home / "proj"
    project.mkdir()
    (project / "trivial.py").write_text("res = None\n")

    def hand_over(i):
        config = stackops.RemoteStackOpsConfig(job_id=f"bench-{i}-{time.monotonic_ns()}", ssh_host="tb",
                                               copy_repo=True, lock_resources=False)
        with stackops.RemoteMachine(str(project / "trivial.py"), config=config) as machine:
            machine.run()

    rows.append(compare("hand a trivial job over (RemoteMachine.run)", hand_over,
                        lambda _: run_cmd(bed.ssh("tb", "true")), runs, "ssh host true"))

    config = stackops.RemoteStackOpsConfig(job_id="bench-status", ssh_host="tb", copy_repo=True)
    (project / "sleepy.py").write_text("import time\ntime.sleep(120)\n")
    with stackops.RemoteMachine(str(project / "sleepy.py"), config=config) as machine:
        machine.run()
        machine.get_status(0)
        rows.append(compare("status of a running job, connection open", lambda _: machine.get_status(0),
                            lambda _: run_cmd(bed.ssh_shared("-o", "ControlMaster=no", "tb", "true")), runs * 2,
                            "ssh true via ControlMaster"))
        # the launcher leads its own session: end the job's whole process group, by its pid
        subprocess.run(bed.ssh("tb", f"kill -9 -- -{machine.launcher_pid}"), capture_output=True)

    rows.append(compare("CLI start: stackops.py --help",
                        lambda _: run_cmd([sys.executable, str(HERE / "stackops.py"), "--help"]),
                        lambda _: run_cmd([sys.executable, "-c", "pass"]), runs * 2, "python -c pass"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller files and fewer runs (a smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="runs per case (default 7, quick 3)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    for tool in ("/usr/sbin/sshd", shutil.which("ssh"), shutil.which("scp"), shutil.which("rsync")):
        if not tool or not os.path.exists(tool):
            print("bench needs openssh-server, openssh-client and rsync", file=sys.stderr)
            return 2
    runs = args.runs or (3 if args.quick else 7)
    bed = Bed()
    try:
        print(f"stackops benchmark: {runs} runs per case, medians; ratio = stackops / reference\n", flush=True)
        rows = run(bed, args.quick, runs)
    finally:
        bed.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
