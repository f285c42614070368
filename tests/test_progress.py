"""Progress a person can read and metrics a cluster can scrape: counted per embedded segment, not per finished
recording; a bar on a terminal, plain lines in logs; Ray's own "Progress bars disabled" warning gone; the
metrics exported by Ray's metrics agent in Prometheus format."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.checkpoints import write_random_checkpoint
from pipeline.progress import Progress
from pipeline.synth import music_like, write_audio


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def segments(self, audio_s: float, count: int) -> None:
        self.events.append(("segments", audio_s, count))

    def input_done(self, status: str, error_kind: str | None) -> None:
        self.events.append(("input", status, error_kind))

    def rate(self, segments_per_s: float, audio_s_per_s: float) -> None:
        self.events.append(("rate", segments_per_s, audio_s_per_s))


def test_audio_counts_before_any_recording_is_complete_and_eta_follows_the_bytes():
    counts = {"processed": 0, "ok": 0, "error": 0, "too_short": 0, "errors_by_kind": {}}
    clock, lines, sink = Clock(), [], Sink()
    p = Progress(counts, 8, 8000, lines.append, every_s=0, clock=clock, metrics=sink)
    clock.t += 10
    p.segments(50.0, 10)  # 10 segments of 5 s arrived; no recording is complete yet
    line = p.line()
    assert "50.0 audio s embedded (0/8 inputs done: 0 ok, 0 error, 0 too short)" in line
    assert "5.0 audio s/s" in line and "ETA unknown" in line
    # one recording of 1000 bytes finished with 100 s of audio: 8000 bytes ~ 800 s in all, 750 s to go at 5 s/s
    counts.update(processed=1, ok=1)
    p.segments(50.0, 10)
    clock.t += 10
    p.input_done({"status": "ok", "duration_s": 100.0}, 1000)
    assert p.eta_s() == pytest.approx((800 - 100) / 5.0)
    assert "ETA ~2 min 20 s" in p.line()
    counts.update(processed=2, error=1, errors_by_kind={"decode": 1})
    p.input_done({"status": "error", "error_kind": "decode"}, 10)
    assert "1 error, 0 too short (decode 1)" in p.line()
    assert sink.events == [
        ("segments", 50.0, 10),
        ("segments", 50.0, 10),
        ("input", "ok", None),
        ("input", "error", "decode"),
    ]
    p.close()
    assert lines == []  # every_s=0: no periodic lines


def test_plain_lines_in_logs_and_a_bar_on_a_terminal():
    counts = {"processed": 0, "ok": 0, "error": 0, "too_short": 0, "errors_by_kind": {}}
    lines: list[str] = []
    p = Progress(counts, 2, 100, lines.append, every_s=0.05, bar=False)
    p.segments(5.0, 1)
    time.sleep(0.3)
    p.close()
    assert len(lines) >= 2 and all(ln.startswith("[mert] ") for ln in lines)
    assert "5.0 audio s embedded (0/2 inputs done" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, lines = Tty(), []
    p = Progress(counts, 2, 100, lines.append, every_s=10, stream=out)
    p.segments(12.5, 3)
    p.close()
    shown = out.getvalue()
    assert "12.5 audio s embedded" in shown and "0/2 inputs done" in shown  # tqdm wrote the bar
    assert len(lines) == 1 and "12.5 audio s embedded" in lines[0]  # and the last line goes to the log


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("progress")
    model = write_random_checkpoint(root / "tiny", like="MERT-v1-95M", size="tiny")
    audio = root / "audio"
    audio.mkdir()
    for i, secs in enumerate((11.0, 6.0)):
        write_audio(audio / f"t{i}.flac", music_like(secs, 44100, channels=2, seed=i), 44100, "flac")
    return model, audio


def test_a_cli_run_shows_progress_lines_and_no_ray_progress_warning(small_run, tmp_path):
    model, audio = small_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(audio),
            str(tmp_path / "t"),
            "--model",
            str(model),
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Progress bars disabled" not in r.stderr
    final = [ln for ln in r.stderr.splitlines() if "audio s embedded" in ln]
    assert final, r.stderr[-3000:]
    m = re.search(r"\[mert\] ([\d.]+) audio s embedded \(2/2 inputs done: 2 ok, 0 error", final[-1])
    assert m and float(m.group(1)) == pytest.approx(17.0, abs=0.1), final[-1]  # 5+5+1 s and 5+1 s segments


@pytest.mark.usefixtures("ray_local")
def test_metrics_reach_rays_prometheus_endpoint(small_run, tmp_path):
    import ray

    from pipeline.config import RunConfig
    from pipeline.engine import run

    model, audio = small_run
    summary = run(
        RunConfig(
            input=str(audio), output=str(tmp_path / "t"), model=str(model), progress=False, batch_size=2
        ),
        log=lambda m: None,
    )
    assert summary["counts"]["ok"] == 2
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    want = {
        "ray_mert_audio_seconds_embedded_total": None,
        "ray_mert_segments_embedded_total": None,
        "ray_mert_inputs_total": 'status="ok"',
    }
    deadline = time.monotonic() + 60
    found: dict[str, float] = {}
    while time.monotonic() < deadline and len(found) < len(want):
        time.sleep(2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for name, must in want.items():
            rows = [
                ln
                for ln in text.splitlines()
                if ln.startswith(name + "{") and f'model="{model}"' in ln and (must is None or must in ln)
            ]
            if rows:
                found[name] = sum(float(ln.rsplit(" ", 1)[1]) for ln in rows)
    assert set(found) == set(want), f"metrics missing from the endpoint: {set(want) - set(found)}"
    assert found["ray_mert_audio_seconds_embedded_total"] >= 17.0 - 0.1
    assert found["ray_mert_segments_embedded_total"] >= 5
    assert found["ray_mert_inputs_total"] >= 2
