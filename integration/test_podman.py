"""podman runs a container in a namespace our pasta serves (contrib/podman/podman-pasta).

Debian 12's podman (4.3) has no pasta support of its own; it runs the
container with `--network ns:PATH` in the namespace pasta configured, which
is what podman 4.4+ does after starting pasta.  The image is made here from
busybox-static (no registry involved) and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from integration.conftest import GW4, HOST4, HOST6, run, unique, wait_for

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "podman" / "podman-pasta"
APPLETS = ("sh", "ip", "wget", "httpd", "sleep", "echo", "cat", "nc")
# this kind of machine mounts cgroup v1 only, which crun refuses: runc and explicit limits
PODMAN_PREFIX = "--runtime runc"
RUN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    for tool in ("podman", "runc"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (tools/test.sh installs it)")
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    (root / "tmp").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    tar = root.parent / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        for entry in root.iterdir():
            t.add(entry, arcname=entry.name)
    tag = f"localhost/passt-py-test:{unique('bb')}"
    run(["podman", "import", "-q", str(tar), tag], timeout=120)
    yield tag
    run(["podman", "rmi", "-f", tag], check=False, timeout=120)


def test_container_in_pasta_namespace(topo, procs, pasta, tmp_path, image):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from the host\n")
    web = procs.start(topo.host.cmd("busybox", "httpd", "-f", "-p", "127.0.0.1:8088",
                                    "-h", str(tmp_path / "www")))
    wait_for(lambda: "8088" in topo.host.run("ss", "-Hltn").stdout, what="host web server")
    env = dict(os.environ, PASTA=" ".join(topo.host.cmd(*pasta)),
               PODMAN_RUN_PREFIX=PODMAN_PREFIX)
    script = ("echo in-container > /tmp/i.txt; httpd -p 80 -h /tmp; "
              f"ip -o addr show eth0; wget -q -O- http://{GW4}:8088/hello.txt; sleep 6")
    c = procs.start([str(CONTRIB), "-t", "8080:80", "-u", "none", "-T", "none", "-U", "none",
                     "--", "--rm", *RUN_LIMITS, image, "sh", "-c", script], env=env, text=True)
    # the forwarded port reaches the container's web server, from another host on the link
    got = wait_for(lambda: run(topo.router.cmd("busybox", "wget", "-q", "-O-",
                                               f"http://{HOST4}:8080/i.txt"),
                               check=False).stdout, timeout=30, what="container web server")
    assert got.strip() == "in-container"
    out, err = c.communicate(timeout=60)
    assert c.returncode == 0, err
    assert f"inet {HOST4}/24" in out and f"inet6 {HOST6}/64" in out, out
    assert "hello from the host" in out, out
    web.terminate()
    # podman-pasta removed the namespace file: no namespace left behind
    assert not [n for n in os.listdir("/run/netns") if n.startswith("podman-pasta-")]
