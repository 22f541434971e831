"""The job lock in one process (flock locks belong to open files, so two `job_lock`s on one folder
conflict here as two processes would): a second holder waits for the first, or refuses naming it.
The cross-process behaviour (a killed workflow, a second CLI process) is in test_preemption.py."""
import os
import socket
import threading
import time

import pytest

from hybridmim.jobguard import JobLockedError, attempt_log, job_lock


def test_second_holder_waits_for_the_first(tmp_path):
    acquired = []

    def second():
        with job_lock(tmp_path, wait_s=30):
            acquired.append(time.monotonic())

    with job_lock(tmp_path, wait_s=0):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.5)
        assert not acquired, "the second holder did not wait"
        released = time.monotonic()
    thread.join(timeout=30)
    assert acquired and acquired[0] >= released


def test_second_holder_refuses_after_its_wait_naming_pid_and_host(tmp_path):
    with job_lock(tmp_path, wait_s=0):
        start = time.monotonic()
        with pytest.raises(JobLockedError, match=f"already running as PID {os.getpid()} on host "
                                                 f"{socket.gethostname()}"):
            with job_lock(tmp_path, wait_s=1):
                pass
        assert time.monotonic() - start >= 1
    with job_lock(tmp_path, wait_s=0):  # released on exit
        pass


def test_each_attempt_keeps_its_own_log(tmp_path):
    import logging

    for text in ("first attempt", "second attempt"):
        with attempt_log(tmp_path):
            logging.getLogger("hybridmim.test").info(text)
        time.sleep(1.1)  # attempt logs are named by the second they start
    logs = sorted((tmp_path / "attempts").glob("*.log"))
    assert [p.read_text().count("attempt") for p in logs] == [1, 1]
    assert "first attempt" in logs[0].read_text() and "second attempt" in logs[1].read_text()
