"""scripts/studies.sh's orchestration with a stand-in interpreter (every stage a no-op that records its call): a
failing stage is logged with its exit code and its worker goes on, worker a trains the application models only
once the rankings exist, the final scores run, and a second instance refuses to start while one runs."""

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!/usr/bin/env bash
echo "$*" >> calls.log
case "$*" in
  *"applications.py --stage status"*) [ -f rank.done ] && exit 0 || exit 3 ;;
  *"applications.py --stage rank"*) sleep 1; touch rank.done ;;
  *"detection.py --stage score"*) exit 5 ;;
  *"lds.py --stage choose"*) [ -f hold ] && sleep 30 ;;
  *) sleep 0.1 ;;
esac
exit 0
"""


def _project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "studies.sh", tmp_path / "scripts" / "studies.sh")
    stub = tmp_path / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB)
    stub.chmod(0o755)
    return tmp_path


def _run(project: Path, **kw):
    env = {**os.environ, "STUDIES_POLL_S": "0.2", "STUDIES_TICK_S": "0.2"}
    return subprocess.run(["bash", "scripts/studies.sh"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def test_a_failing_stage_is_logged_and_the_workers_go_on(tmp_path):
    project = _project(tmp_path)
    done = _run(project)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = (project / "logs" / "studies_failed.txt").read_text()
    assert "FAILED (exit 5): .venv/bin/python experiments/detection.py --stage score" in failed
    calls = (project / "calls.log").read_text().splitlines()
    rank = calls.index("experiments/applications.py --stage rank")
    trains = [i for i, c in enumerate(calls) if c == "experiments/applications.py --stage train"]
    assert len(trains) == 2 and min(trains) > rank  # both workers, after the rankings
    assert calls.count("experiments/lds.py --stage removals") == 2
    final = calls[max(trains) + 1:]
    scores = [c for c in final if c.endswith("--stage score")]
    assert scores == ["experiments/applications.py --stage score", "experiments/detection.py --stage score",
                      "experiments/lds.py --stage score"]


def test_a_second_instance_refuses_to_start(tmp_path):
    project = _project(tmp_path)
    (project / "hold").touch()  # the first instance waits in its first stage
    first = subprocess.Popen(["bash", "scripts/studies.sh"], cwd=project, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(100):
            if (project / "calls.log").exists():
                break
            time.sleep(0.1)
        second = _run(project)
        assert second.returncode == 1 and "already running" in second.stdout
    finally:
        os.killpg(first.pid, 9)
        first.wait()
