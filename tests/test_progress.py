"""The rank-0 progress bar: redrawn line with ETA on a terminal, silent elsewhere, rate without start-up."""

from __future__ import annotations

import io

import pytest

from pld_ds.progress import Progress, format_duration


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: a carriage return moves to column 0 and overwrites."""
    lines, col = [[]], 0
    for ch in text:
        if ch == "\n":
            lines.append([])
            col = 0
        elif ch == "\r":
            col = 0
        else:
            line = lines[-1]
            line[col:col + 1] = [ch]
            col += 1
    return ["".join(line).rstrip() for line in lines]


def run_steps(progress: Progress, clock: FakeClock, steps: range, seconds_per_step: float) -> None:
    for step in steps:
        progress.update(step)
        clock.now += seconds_per_step


def test_terminal_line_has_bar_steps_rate_eta_and_scalars(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    tty, clock = FakeTTY(), FakeClock()
    progress = Progress(101, 0, stream=tty, clock=clock, min_interval=0)
    clock.now += 100.0  # start-up and the first step (compilation, data workers): not part of the rate
    run_steps(progress, clock, range(1, 11), 0.5)
    progress.update(11, {"train/loss": 5.125, "train/pld_theta": 0.875, "train/lr": 1e-3})
    out = tty.getvalue()
    assert "\n" not in out, "the bar is redrawn in place until close"
    assert out.count("\r") == 11
    last = out.rsplit("\r", 1)[1]
    assert last.startswith(" 11% [##" + "." * 18 + "]")
    assert "step 11/101" in last and "loss 5.125" in last and "theta 0.875" in last
    assert "lr" not in last
    # 10 steps in 5 s since the first update: 2 steps/s, 90 steps left
    assert "2 steps/s  eta 0:00:45" in last


def test_rate_excludes_the_first_step():
    tty, clock = FakeTTY(), FakeClock()
    progress = Progress(100, 40, stream=tty, clock=clock, min_interval=0)
    clock.now += 60.0  # start-up, resuming from step 40: the first update's step carries it
    progress.update(41)
    run_steps(progress, clock, range(41, 61), 0.5)  # 41 again at the same time: harmless
    progress.update(61)
    assert progress.steps_per_sec() == pytest.approx(2.0)
    assert progress.eta_seconds() == pytest.approx(19.5)
    assert progress.status() == "2 steps/s  eta 0:00:20"
    assert "eta 0:00:20" in tty.getvalue().rsplit("\r", 1)[1]


def test_eta_unknown_until_two_updates():
    clock = FakeClock()
    progress = Progress(10, stream=FakeTTY(), clock=clock)
    assert progress.status() == "eta ?"
    progress.update(1)
    assert progress.status() == "eta ?"
    clock.now += 2
    progress.update(2)
    assert progress.status() == "2 s/step  eta 0:00:16"


def test_redraws_are_throttled_but_the_last_step_is_drawn():
    tty, clock = FakeTTY(), FakeClock()
    progress = Progress(20, stream=tty, clock=clock, min_interval=1.0)
    run_steps(progress, clock, range(1, 21), 0.25)
    draws = tty.getvalue().split("\r")[1:]
    assert len(draws) == 6  # steps 1, 5, 9, 13, 17 (a second apart) and the final step 20
    assert "step 20/20" in draws[-1] and "100% [" + "#" * 20 + "]" in draws[-1]


def test_close_leaves_the_final_line_and_is_idempotent(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    tty, clock = FakeTTY(), FakeClock()
    with Progress(4, stream=tty, clock=clock, min_interval=0) as progress:
        run_steps(progress, clock, range(1, 4), 1.0)
    progress.close()
    progress.update(4)
    assert tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1
    assert screen(tty.getvalue()) == [progress.line(200), ""]
    assert "step 3/4" in progress.line(200)


def test_log_lines_do_not_tear_the_bar(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    tty, clock = FakeTTY(), FakeClock()
    progress = Progress(10, stream=tty, clock=clock, min_interval=0)
    run_steps(progress, clock, range(1, 6), 1.0)
    progress.write("step      5  loss 5.1", file=tty)
    run_steps(progress, clock, range(6, 8), 1.0)
    progress.close()
    shown = screen(tty.getvalue())
    assert shown[0] == "step      5  loss 5.1"
    assert shown[1].startswith(" 70% [") and "step 7/10" in shown[1]
    assert shown[2:] == [""]


@pytest.mark.parametrize("columns, bar", [(80, 13), (60, 0), (40, 0)])
def test_line_fits_the_terminal_numbers_first(columns: int, bar: int, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    tty, clock = FakeTTY(), FakeClock()
    progress = Progress(100000, stream=tty, clock=clock, min_interval=0)
    run_steps(progress, clock, range(1, 5), 1.0)
    progress.update(5, {"train/loss": 7.0, "train/pld_theta": 0.5})
    draws = tty.getvalue().split("\r")[1:]
    assert all(len(draw) <= columns - 1 for draw in draws)
    last = draws[-1]
    assert last.startswith(f"  0% [{'.' * bar}]  step 5/100000" if bar else "  0%  step 5/100000")
    if columns == 80:  # room for everything and a shortened bar
        assert last.endswith("eta 27:46:35  loss 7  theta 0.5")
    else:  # no bar, the tail cut at the edge
        assert len(last) == columns - 1


def test_slow_runs_show_seconds_per_step():
    clock = FakeClock()
    progress = Progress(10, stream=io.StringIO(), clock=clock)
    progress.update(1)
    clock.now += 40
    progress.update(2)
    assert progress.status() == "40 s/step  eta 0:05:20"


def test_not_a_terminal_update_writes_nothing_but_log_lines_pass():
    stream, logs, clock = io.StringIO(), io.StringIO(), FakeClock()
    progress = Progress(10, stream=stream, clock=clock)
    assert not progress.interactive
    run_steps(progress, clock, range(1, 11), 1.0)
    progress.write("step     10  loss 5.0", file=logs)
    progress.close()
    assert stream.getvalue() == ""
    assert logs.getvalue() == "step     10  loss 5.0\n"
    assert progress.status() == "1 steps/s  eta 0:00:00"


def test_interactive_override_and_streams_without_isatty():
    clock = FakeClock()
    forced = Progress(10, stream=io.StringIO(), interactive=True, clock=clock)
    forced.update(1)
    assert forced.stream.getvalue().startswith("\r")
    closed = io.StringIO()
    closed.close()
    assert not Progress(10, stream=closed).interactive
    assert not Progress(10, stream=object()).interactive  # type: ignore[arg-type]


def test_disabled_on_other_ranks_is_silent():
    tty, logs, clock = FakeTTY(), io.StringIO(), FakeClock()
    progress = Progress(10, stream=tty, enabled=False, clock=clock)
    run_steps(progress, clock, range(1, 11), 1.0)
    progress.write("step 10", file=logs)
    progress.close()
    assert tty.getvalue() == "" and logs.getvalue() == ""


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.4, "0:00:59"), (3661, "1:01:01"),
                                           (7 * 24 * 3600, "168:00:00"), (-5, "0:00:00")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_bad_total_and_a_start_past_the_end():
    with pytest.raises(ValueError, match="total_steps"):
        Progress(0)
    tty = FakeTTY()
    progress = Progress(50, 100, stream=tty, clock=FakeClock())  # resumed at 100 with --max-steps 50
    assert "100% [" in progress.line(200) and "step 100/50" in progress.line(200)
    progress.close()
    assert tty.getvalue() == ""


def test_real_pseudo_terminal_is_detected_and_its_width_used(monkeypatch):
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import select
    import struct
    import termios

    monkeypatch.delenv("COLUMNS", raising=False)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))
    with os.fdopen(slave, "w") as stream:
        clock = FakeClock()
        progress = Progress(1000, stream=stream, clock=clock, min_interval=0)
        assert progress.interactive
        run_steps(progress, clock, range(1, 4), 1.0)
        progress.close()
        chunks = []
        while select.select([master], [], [], 0.2)[0]:  # everything written so far, however it is chunked
            chunks.append(os.read(master, 4096))
        shown = b"".join(chunks).decode()
    os.close(master)
    draws = shown.replace("\r\n", "\n").split("\r")[1:]  # the terminal turns "\n" into "\r\n"
    assert len(draws) == 4 and all(len(d.rstrip("\n")) <= 49 for d in draws)
    assert draws[-1] == "  0% [.....]  step 3/1000  1 steps/s  eta 0:16:37\n"  # a 5-wide bar: 50 columns
