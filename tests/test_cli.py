"""The ddm command: help that teaches, clear one-line errors, a working demo."""

import subprocess
import sys

from ddm.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "ddm.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_explains_the_method_and_commands():
    out = run("--help")
    assert out.returncode == 0
    for text in ("Decentralized Diffusion Models", "router", "demo", "models", "examples:"):
        assert text in out.stdout


def test_demo_help_says_what_it_writes():
    out = run("demo", "--help")
    assert out.returncode == 0 and "samples.png" in out.stdout and "key=value" in out.stdout


def test_bad_config_is_one_clear_line_and_exit_2(capsys):
    assert main(["demo", "num_partitions=0"]) == 2
    err = capsys.readouterr().err
    assert "ddm demo: error: num_partitions must be between 1" in err
    assert "Traceback" not in err


def test_models_lists_presets_with_sizes(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "DiT-XL/2" in out and "674.82M" in out and "MLP-S" in out


def test_train_expert_help_explains_resume():
    out = run("train", "expert", "--help")
    assert out.returncode == 0 and "resumes" in out.stdout and "--partition" in out.stdout


def test_ingest_and_partition_cli(tmp_path, capsys):
    store = str(tmp_path / "run")
    assert main(["ingest", "digits", store, "shard_size=1000"]) == 0
    assert "1797 samples of shape (1, 8, 8)" in capsys.readouterr().out
    assert main(["partition", store, "num_partitions=3", "num_fine=64"]) == 0
    assert "3 partitions" in capsys.readouterr().out
    assert main(["partition", store, "num_partitions=4"]) == 2  # refuses to overwrite
    assert "not overwritten" in capsys.readouterr().err


def test_ctrl_c_ends_with_one_line_saying_how_to_resume(tmp_path):
    """SIGINT during a long command: no traceback, exit 130, and what to do next."""
    import signal
    import time

    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        cmd = [sys.executable, "-m", "ddm.cli", "demo", f"output_dir={tmp_path}", "steps_per_expert=100000"]
        # As from a terminal: SIGINT handled (a test run in a background job would pass on SIG_IGN).
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 120
            while "expert 1/4" not in log.read_text():  # started: imports done, training under way
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            proc.kill()  # never leave it training for the rest of the test run
    err = log.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted. Everything committed to the store is kept; run the same command again" in err


def test_no_command_prints_help_and_exits_2():
    out = run()
    assert out.returncode == 2 and "usage: ddm" in out.stderr and out.stdout == ""


def test_progress_is_plain_lines_off_a_terminal(caplog):
    """Piped or logged, progress is a log line (no carriage returns), at least at the end."""
    import logging

    from ddm.core.logs import progress

    with caplog.at_level(logging.INFO, logger="ddm.progress"):
        assert list(progress(range(5), desc="things", unit="thing")) == list(range(5))
        bar = progress(total=3, desc="job", unit="step")
        bar.update(3)
        bar.set_postfix_str("loss 0.5 done")
        bar.close()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["things: started (5 thing)", lines[1]] and lines[1].startswith("things: 5/5 thing")
    assert "\r" not in "".join(lines) and len(lines) == 4 and lines[2] == "job: started (3 step)"
    assert lines[3].startswith("job: 3/3 step") and lines[3].endswith("loss 0.5 done)")
    assert progress([1, 2], disable=True) == [1, 2]


def test_queued_progress_starts_its_clock_when_it_starts(caplog, monkeypatch):
    """A job waiting for a slot says so, and its rate counts from when it starts, not from when it
    was queued (``ddm run``: 7 jobs on 2 slots); a resumed job's earlier steps are not in its rate."""
    import logging

    import ddm.core.logs
    from ddm.core.logs import progress

    now = [100.0]
    monkeypatch.setattr(ddm.core.logs.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="ddm.progress"):
        bar = progress(total=10, desc="experts/02", unit="step", queued=True)
        now[0] += 1000  # in the queue
        bar.reset()
        bar.initial = bar.n = 4  # resumed at step 4
        now[0] += 3
        bar.update(6)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["experts/02: queued (10 step)", "experts/02: started (10 step)"]
    assert lines[2] == "experts/02: 10/10 step (2.0 step/s)"  # 6 steps in 3 s, not 10 in 1003


def test_stdout_to_stderr_moves_native_writes_too(capfd):
    import os

    from ddm.core.logs import stdout_to_stderr

    with stdout_to_stderr():
        print("python line", flush=True)
        os.write(1, b"native line\n")  # what a C extension or a subprocess would write
    print("result")
    out, err = capfd.readouterr()
    assert out == "result\n" and "python line" in err and "native line" in err
