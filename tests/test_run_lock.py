"""training/cluster/run_lock.py in this process: a lock another process holds, the lock's release with its holder, and a
filesystem without locks (said, not enforced). The collective path (every rank stops) is in tests/test_train.py."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from cxrdist.errors import UserError
from cxrdist.training.cluster import run_lock
from cxrdist.training.cluster.run_lock import lock_run_dir, release_run_lock

HOLD = ("import sys, time; from cxrdist.training.cluster.run_lock import lock_run_dir; lock_run_dir(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)")


def test_a_lock_held_by_another_process_is_one_error_naming_it_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"another run is training in this directory \\(pid {holder.pid} on "):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    fd = lock_run_dir(tmp_path)  # released by the kernel with its process (kill -9)
    assert fd is not None
    release_run_lock(fd)
    release_run_lock(lock_run_dir(tmp_path))  # and by closing


def test_a_filesystem_without_locks_is_said_not_enforced(tmp_path, monkeypatch, caplog):
    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    with caplog.at_level("WARNING"):
        assert lock_run_dir(tmp_path) is None
    assert "cannot lock" in caplog.text and "make sure no other run trains" in caplog.text
