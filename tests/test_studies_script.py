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


def test_keep_studies_commits_the_new_records_and_the_regenerated_results_only(tmp_path):
    """scripts/keep_studies.sh in a scratch repository with a stand-in interpreter (its report.py writes
    docs/results.md): the new records, the detection results and docs/results.md are committed; another staged or
    unstaged change is not; a second run has nothing new."""
    project = tmp_path
    (project / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "keep_studies.sh", project / "scripts" / "keep_studies.sh")
    stub = project / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/usr/bin/env bash\nmkdir -p docs && ls results >> docs/results.md\n')
    stub.chmod(0o755)
    git = lambda *a: subprocess.run(["git", *a], cwd=project, check=True, capture_output=True, text=True).stdout  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (project / ".gitignore").write_text(".venv/\n")
    (project / "notes.txt").write_text("draft")
    git("add", ".gitignore", "notes.txt")
    git("commit", "-q", "-m", "start")
    (project / "results" / "retrained" / "lds").mkdir(parents=True)
    for name in ("m000_s0", "m000_s1"):
        (project / "results" / "retrained" / "lds" / f"{name}.json.gz").write_bytes(b"x")
    (project / "results" / "ptb_detection.json").write_text("{}")
    (project / "notes.txt").write_text("edited, not to be committed")
    (project / "other.txt").write_text("staged, not to be committed")
    git("add", "other.txt")
    run = lambda: subprocess.run(["bash", "scripts/keep_studies.sh"], cwd=project, capture_output=True, text=True,  # noqa: E731
                                 timeout=60)
    first = run()
    assert first.returncode == 0 and "new model records: 2" in first.stdout, first.stdout + first.stderr
    assert sorted(git("show", "--name-only", "--format=", "HEAD").split()) == [
        "docs/results.md", "results/ptb_detection.json", "results/retrained/lds/m000_s0.json.gz",
        "results/retrained/lds/m000_s1.json.gz"]
    assert "other.txt" in git("diff", "--cached", "--name-only") and "notes.txt" in git("diff", "--name-only")
    second = run()
    assert second.returncode == 0 and "nothing new" in second.stdout
