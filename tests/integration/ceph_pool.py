"""A throwaway Ceph cluster for the integration tests (tests/ceph/cluster.sh), and OnPool: the
mixin that runs a directory test's body against a namespace of that cluster's pool instead.

OnPool keeps the test's own oracle. The test still builds its images in self.dir with qemu-img
and checks them there; mount() first imports into the namespace every file of self.dir that
changed since the last exchange, and when the daemon has exited (unmount, kill, SIGTERM) every
image of the namespace is exported back over self.dir. So qemu-img compares and checks exactly
the bytes the pool held. Names map '@' <-> '~': in a pool '~' separates a snapshot name (RBD
reserves '@' for its own snapshots).
"""
import atexit
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

import harness
from harness import run

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(os.path.dirname(HERE), "ceph", "cluster.sh")
TOOLS = ("ceph-mon", "ceph-osd", "rbd")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(osd_mib=3072):
    """Starts a throwaway cluster; returns (its directory, its ceph.conf)."""
    # The port is free when picked, but another process may bind it before the monitor does
    # (which tries once: ms bind retry count = 1): a new port and directory, up to 3 times.
    errors = []
    for _ in range(3):
        directory = tempfile.mkdtemp(prefix="imgfs-ceph-")
        p = run([CLUSTER, "start", directory, "--port", str(free_port()), "--osd-mib",
                 str(osd_mib)], check=False)
        if p.returncode == 0:
            return directory, p.stdout.strip()
        errors.append(p.stderr)
        stop_cluster(directory)
    raise AssertionError("the test cluster did not start:\n" + "\n---\n".join(errors))


def stop_cluster(directory):
    try:
        with open(os.path.join(directory, "osd.pid")) as f:
            os.kill(int(f.read().strip()), signal.SIGCONT)
    except (OSError, ValueError):
        pass
    run([CLUSTER, "stop", directory], check=False)
    run(["rm", "-rf", directory], check=False)


def osd_space(directory):
    """(total, used) bytes as the cluster's OSD counts them (its admin socket), or None."""
    sock = os.path.join(directory, "run", "ceph-osd.0.asok")
    p = run(["ceph", "--admin-daemon", sock, "perf", "dump"], check=False, timeout=30)
    if p.returncode != 0:
        return None
    counters = json.loads(p.stdout)["osd"]
    return counters["stat_bytes"], counters["stat_bytes_used"]


def check_osd_space(directory):
    """Fails if the OSD's space count is impossible (more used than it has). memstore's count
    once went negative in CI: the OSD then called itself full and blocked every later write
    (the tests hung instead of failing). A clear failure at the test that did it is better."""
    space = osd_space(directory)
    if space is not None and space[1] > space[0]:
        raise AssertionError(f"the test cluster's OSD counts {space[1]} bytes used of "
                             f"{space[0]}: its space accounting broke")


def tools_present():
    return os.geteuid() == 0 and all(
        subprocess.run(["which", t], capture_output=True).returncode == 0 for t in TOOLS)


_shared = {}  # the process's cluster: {"dir": ..., "conf": ...}


def shared_cluster():
    """The cluster every OnPool test of this process uses, started on first use; None if the
    tools are missing (the test's setUp then fails in CI or skips outside it)."""
    if not _shared and tools_present():
        directory, conf = start_cluster(osd_mib=4096)
        _shared.update(dir=directory, conf=conf)
        atexit.register(stop_cluster, directory)
    return _shared.get("conf")


def restore_env(key, value):
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def pool_name(local):
    return local.replace("@", "~")


def local_name(image):
    return image.replace("~", "@")


class OnPool:
    """Mix in before a harness.ImageDirTest subclass: its tests then serve a Ceph pool."""

    def setUp(self):
        super().setUp()
        harness.require_tools(*TOOLS)
        self.conf = shared_cluster()
        self.assertIsNotNone(self.conf, "the test cluster did not start")
        check_osd_space(_shared["dir"])
        # One namespace per test: RBD namespace names allow letters, digits, '-' and '_'.
        self.ns = "t" + str(abs(hash(self.id())) % 10**9)
        self.rbd("namespace", "create", f"rbd/{self.ns}")
        self.addCleanup(self._drop_namespace)
        self.synced = {}  # local file name -> (mtime_ns, size) when it last matched the pool
        # qemu-img follows backing names of the form rbd:POOL/NS/IMAGE with this configuration.
        self.addCleanup(restore_env, "CEPH_CONF", os.environ.get("CEPH_CONF"))
        os.environ["CEPH_CONF"] = self.conf

    def rbd(self, *args, check=True):
        return run(["rbd", "-c", self.conf, *args], check=check, timeout=300)

    def source(self):
        return f"rbd:rbd/{self.ns}"

    def store_options(self):
        return f"ceph_conf={self.conf}"

    def mount(self, options="", **kw):
        self.sync_store()
        opts = self.store_options() + ("," + options if options else "")
        m = harness.Mount(self.source(), options=opts, on_exit=self._pull, **kw)
        self.mounts.append(m)
        return m.start()

    def images(self):
        return self.rbd("ls", f"rbd/{self.ns}").stdout.split()

    def layer_url(self, name):
        return f"rbd:rbd/{self.ns}/{pool_name(name)}"

    def open_layers(self, m):
        # The daemon opens every layer it serves with a watch on its header; nothing else in a
        # test's namespace keeps an image open while the test looks.
        return {i for i in self.images()
                if "watcher=" in self.rbd("status", f"rbd/{self.ns}/{i}").stdout}

    def describe_open(self, m, names):
        status = {n: self.rbd("status", f"rbd/{self.ns}/{pool_name(n)}", check=False).stdout
                  for n in sorted(names)}
        return f"rbd status: {status}; the daemon's log ends:\n{m.read_log()[-4000:]}"

    def sync_store(self):
        """Imports every file of self.dir that changed since the last exchange (replacing the
        image), and removes images whose file is gone."""
        present = set()
        for name in sorted(os.listdir(self.dir)):
            path = self.img(name)
            if not os.path.isfile(path):
                continue
            present.add(name)
            st = os.stat(path)
            if self.synced.get(name) == (st.st_mtime_ns, st.st_size):
                continue
            if name in self.synced:
                self.rbd("rm", "--no-progress", f"rbd/{self.ns}/{pool_name(name)}")
            # The rbd tool misreads an '@' in the source path as a snapshot name.
            link = os.path.join(self.dir + ".import")
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(path, link)
            try:
                self.rbd("import", "--no-progress", link, f"rbd/{self.ns}/{pool_name(name)}")
            finally:
                os.unlink(link)
            self.synced[name] = (st.st_mtime_ns, st.st_size)
        for name in set(self.synced) - present:
            self.rbd("rm", "--no-progress", f"rbd/{self.ns}/{pool_name(name)}")
            del self.synced[name]

    def pull_store(self):
        self._pull(False)

    def _pull(self, killed):
        """After the daemon exited: the pool's images back over self.dir, and the files of
        images the pool no longer has (a commit or stream removed them) removed."""
        if killed:
            self._wait_unwatched()
        images = self.images()
        for name in set(self.synced) - {local_name(i) for i in images}:
            if os.path.exists(self.img(name)):
                os.unlink(self.img(name))
            del self.synced[name]
        for image in images:
            name = local_name(image)
            tmp = self.img(name + ".pulling")
            self.rbd("export", "--no-progress", f"rbd/{self.ns}/{image}", tmp)
            os.replace(tmp, self.img(name))
            st = os.stat(self.img(name))
            self.synced[name] = (st.st_mtime_ns, st.st_size)

    def _wait_unwatched(self, timeout=60):
        """A killed daemon still holds its images' exclusive locks until Ceph drops its watches
        (osd client watch timeout, 5 s in the test cluster); the next daemon can take a lock
        only then. Waits until no image of the namespace is watched."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            watched = [i for i in self.images()
                       if "watcher=" in self.rbd("status", f"rbd/{self.ns}/{i}").stdout]
            if not watched:
                return
            time.sleep(0.5)
        raise AssertionError(f"images still watched {timeout} s after the kill: {watched}")

    def _drop_namespace(self):
        # Frees the OSD's memory for the next test; a leftover is harmless.
        check_osd_space(_shared["dir"])  # a broken OSD blocks the removals
        for image in self.rbd("ls", f"rbd/{self.ns}", check=False).stdout.split():
            self.rbd("rm", "--no-progress", f"rbd/{self.ns}/{image}", check=False)
        self.rbd("namespace", "remove", f"rbd/{self.ns}", check=False)


def on_both_stores(module_globals, *classes, directory_only=(), heavy=()):
    """Adds to the module, for each of `classes`, a subclass NAMEOnPool running the same tests on
    a pool, without the test methods named in `directory_only`. With IMGFS_POOL_CASES=some (the
    sanitizer run, whose time CI bounds) the classes in `heavy` get no pool variant; the plain
    run has them."""
    if os.environ.get("IMGFS_POOL_CASES") == "some" and heavy:
        print(f"{module_globals['__name__']}: IMGFS_POOL_CASES=some leaves out the pool variants "
              f"of {', '.join(c.__name__ for c in heavy)} (the plain run has them)", flush=True)
        classes = tuple(c for c in classes if c not in heavy)
    for cls in classes:
        attrs = {name: None for name in directory_only if hasattr(cls, name)}
        attrs["__doc__"] = f"{cls.__name__}, served from a Ceph pool."
        attrs["__module__"] = module_globals["__name__"]
        module_globals[cls.__name__ + "OnPool"] = type(cls.__name__ + "OnPool", (OnPool, cls),
                                                        attrs)
