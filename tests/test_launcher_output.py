"""LauncherStderr: the launcher's own failure page is dropped, everything the trainers write is kept."""

from __future__ import annotations

import io

import pytest

from cxrdist.training.launcher_output import LauncherStderr

TRAINER_LINE = "cxrdist train: error: data.shards /x: no manifest.json\n"

SIMPLE_PAGE = """Traceback (most recent call last):
  File "/venv/bin/accelerate", line 8, in <module>
    sys.exit(main())
             ^^^^^^
  File "/venv/lib/python3.12/site-packages/accelerate/commands/launch.py", line 1227, in simple_launcher
    raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)
subprocess.CalledProcessError: Command '['/venv/bin/python', 'cxrdist/train.py', '--config', 'c.yaml']' returned non-zero exit status 2.
"""

ELASTIC_PAGE = """E1127 22:01:02.123000 4242 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 2) local_rank: 0 (pid: 4243)
Traceback (most recent call last):
  File "/venv/lib/python3.12/site-packages/torch/distributed/launcher/api.py", line 284, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
cxrdist/train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_22:01:02
  host      : vm
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 4243)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""

# One rank failed (exit 2); elastic then terminated its peer, whose report (SIGTERM, -15) came first.
TERMINATED_PEER_FIRST = ("W1127 22:01:02.100000 4242 torch/distributed/elastic/multiprocessing/api.py:900] "
                         "Sending process 4244 closing signal SIGTERM\n"
                         "E1127 22:01:02.200000 4242 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: -15) local_rank: 1\n"
                         + ELASTIC_PAGE)

TRAINER_BUG = """Traceback (most recent call last):
  File "cxrdist/train.py", line 40, in <module>
    sys.exit(main())
ZeroDivisionError: division by zero
"""


def filtered(text: str, chunk: int = 7) -> tuple[str, LauncherStderr]:
    sink = io.StringIO()
    stderr = LauncherStderr(sink)
    for i in range(0, len(text), chunk):  # arbitrary pipe reads, splitting lines and the word Traceback
        stderr.feed(text[i:i + chunk])
    stderr.close()
    return sink.getvalue(), stderr


@pytest.mark.parametrize("page", [SIMPLE_PAGE, ELASTIC_PAGE, TERMINATED_PEER_FIRST], ids=["one-process", "elastic", "peer-terminated"])
def test_the_launchers_page_is_dropped_and_its_exit_code_kept(page):
    out, stderr = filtered("a warning\n" + TRAINER_LINE + page)
    assert out == "a warning\n" + TRAINER_LINE
    assert stderr.child_code == 2


def test_a_trainers_own_traceback_is_shown():
    out, stderr = filtered(TRAINER_BUG + SIMPLE_PAGE.replace("status 2", "status 1"))
    assert out == TRAINER_BUG and stderr.child_code == 1


def test_progress_bar_redraws_pass_at_once():
    sink = io.StringIO()
    stderr = LauncherStderr(sink)
    stderr.feed("\rtrain: 10%|#")
    assert sink.getvalue() == "\rtrain: 10%|#"
    stderr.feed("#  | 2/10\rtrain: 20%")
    assert sink.getvalue() == "\rtrain: 10%|##  | 2/10\rtrain: 20%"


def test_output_after_the_page_is_kept():
    out, _ = filtered(ELASTIC_PAGE + "later line\n")
    assert out == "later line\n"


def test_cxrdist_train_says_a_trainers_error_in_one_line(tmp_path):
    """End to end, two trainer processes (torch elastic's ChildFailedError page): exit 2 and the trainer's line only."""
    import os
    import subprocess
    import sys

    from trainer_utils import DEMO_CONFIG, REPO, cpu_env, fast_overrides

    env = {**cpu_env(2), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    overrides = fast_overrides(tmp_path / "no-shards", tmp_path / "runs")  # found missing inside the trainers
    result = subprocess.run([sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", "2", *overrides],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-4000:]
    assert len(lines) == 1 and "no-shards" in lines[0] and lines[0].startswith("cxrdist train: error:"), result.stderr[-4000:]
