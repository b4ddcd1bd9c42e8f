"""The station's parts without a server: the audit log, the decision store, the drift figures and the
watched folder."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_workflow import texture

from patchcore.deploy.audit import AuditLog, Decision, DecisionStore, StoredDecision, replay
from patchcore.deploy.drift import clopper_pearson, drift_figures
from patchcore.deploy.learning import ReadWriteLock
from patchcore.deploy.watch import FolderWatcher, SkipFile, open_for_writing


def _decision(i: int, **changes) -> Decision:
    fields = dict(
        id=f"d{i}", time=1000.0 + i, model="m", model_version=0, image=f"{i}.png", source="upload",
        sha256="0" * 64, score=float(i), normalized_score=None, anomalous=False, threshold=10.0, width=8,
        height=8,
    )  # fmt: skip
    fields.update(changes)
    return Decision(**fields)


def _png_bytes(seed: int, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(texture(size, size, seed)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------- audit log


def test_audit_log_rotates_by_size_keeping_a_contiguous_readable_tail(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=2048, keep=3)
    for i in range(200):
        audit.append("decision", n=i, pad="x" * 40)
    audit.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert all((tmp_path / f).stat().st_size <= 2048 for f in files)
    numbers = [e["n"] for e in AuditLog(tmp_path / "audit.jsonl", 2048, 3).read()]
    # The oldest events went with the oldest file; what is left is every event since, in order.
    assert numbers == list(range(numbers[0], 200)) and numbers[0] > 0
    assert len(numbers) > 3 * 2048 // 100  # about three files' worth, not one


def test_audit_log_skips_a_torn_last_line_and_writes_the_next_record_on_its_own_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.append("decision", n=1)
    audit.close()
    with open(path, "ab") as handle:
        handle.write(b'{"event": "decision", "n": 2, "tru')  # a crash in the middle of a line
    audit = AuditLog(path)
    audit.append("decision", n=3)
    audit.close()
    assert [e["n"] for e in AuditLog(path).read()] == [1, 3]


def test_audit_log_lines_written_from_many_threads_never_interleave(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 30)

    def write(t: int) -> None:
        for i in range(150):
            audit.append("decision", thread=t, n=i, pad=str(t) * 300)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    events = [json.loads(line) for line in lines]  # every line parses
    assert len(events) == 8 * 150
    for t in range(8):
        assert [e["n"] for e in events if e["thread"] == t] == list(range(150))


# ---------------------------------------------------------------------- store


def test_decision_store_keeps_the_newest_and_drops_image_payloads_oldest_first_over_budget():
    store = DecisionStore(capacity=5, image_budget=750)
    for i in range(8):
        store.add(StoredDecision(_decision(i), b"t", b"h", Image.new("RGB", (10, 10))))  # 300 bytes each
    assert [d.id for d in store.decisions()] == ["d3", "d4", "d5", "d6", "d7"]
    held = [store.get(f"d{i}").image is not None for i in range(3, 8)]
    assert held == [False, False, False, True, True] and store.image_bytes_held == 600
    assert [i.decision.id for i in store.recent(2)] == ["d7", "d6"]
    with pytest.raises(KeyError):
        store.add(StoredDecision(_decision(7), None, None, None))


def test_recent_filter_lists_only_anomalous_decisions_newest_first():
    store = DecisionStore(capacity=10)
    for i in range(6):
        store.add(StoredDecision(_decision(i, anomalous=i % 2 == 1), None, None, None))
    assert [i.decision.id for i in store.recent(10, anomalous_only=True)] == ["d5", "d3", "d1"]


def test_replay_restores_the_last_decisions_with_their_latest_feedback(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        audit.append("decision", decision=_decision(i).to_dict())
    audit.append("feedback", decision=_decision(3, feedback="good", feedback_version=1).to_dict())
    audit.append("undo", decision=_decision(3).to_dict())
    audit.append("feedback", decision=_decision(4, feedback="defect").to_dict())
    audit.append("feedback", decision=_decision(0, feedback="good").to_dict())  # dropped by the bound
    restored = replay(audit.read(), capacity=3)
    assert [d.id for d in restored] == ["d2", "d3", "d4"]
    assert restored[1].feedback is None and restored[2].feedback == "defect"


# ---------------------------------------------------------------------- drift


def test_clopper_pearson_gives_the_exact_binomial_interval():
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    low, high = clopper_pearson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 10), rel=1e-9)
    low, high = clopper_pearson(5, 100)
    assert low == pytest.approx(0.01643, abs=2e-5) and high == pytest.approx(0.11284, abs=2e-5)


CALIBRATION = {"image_threshold": 10.0, "false_alarm_rate": 0.01, "false_alarm_rate_ci95": [0.0003, 0.0554]}


def test_drift_counts_goods_false_alarms_and_the_anomalous_rate_over_the_window():
    decisions = [_decision(i, model="other", anomalous=True) for i in range(5)]
    decisions += [_decision(100 + i, score=1.0 + i) for i in range(40)]  # passed, not disputed
    decisions += [_decision(200, anomalous=True, score=12.0, feedback="good")]  # a false alarm
    decisions += [_decision(201, anomalous=True, score=30.0)]  # anomalous, no feedback
    decisions += [_decision(202, anomalous=True, score=31.0, feedback="defect")]
    decisions += [_decision(203, score=5.0, feedback="defect")]  # a missed defect: not a good
    figures = drift_figures("m", decisions, CALIBRATION, window=42)
    assert figures.images == 42  # the two oldest of model m fell out of the window
    assert figures.anomalous == 3 and figures.anomalous_rate == pytest.approx(3 / 42)
    assert figures.goods == 38 + 1 and figures.false_alarms == 1 and figures.confirmed_defects == 2
    assert figures.false_alarm_rate == pytest.approx(1 / 39)
    assert figures.false_alarm_rate_ci95 == pytest.approx(clopper_pearson(1, 39))
    scores = [1.0 + i for i in range(2, 40)] + [12.0]
    assert figures.good_score_quantiles["p50"] == pytest.approx(np.quantile(scores, 0.5))
    assert figures.good_score_quantiles["p99"] == pytest.approx(np.quantile(scores, 0.99))
    assert not figures.drift_alarm  # 1 of 39 is compatible with the calibrated interval
    assert len(figures.points) == 42 and figures.points[-1].feedback == "defect"


def test_drift_alarm_rises_only_when_false_alarms_are_significantly_above_the_calibration():
    few = [_decision(i) for i in range(8)] + [_decision(50, anomalous=True, feedback="good")]
    assert drift_figures("m", few, CALIBRATION, 100).false_alarm_rate == pytest.approx(1 / 9)
    assert not drift_figures("m", few, CALIBRATION, 100).drift_alarm  # 1 of 9: not evidence yet
    many = [_decision(i) for i in range(80)]
    many += [_decision(100 + i, anomalous=True, feedback="good") for i in range(20)]
    figures = drift_figures("m", many, CALIBRATION, 100)
    assert figures.false_alarm_rate_ci95[0] > CALIBRATION["false_alarm_rate_ci95"][1]
    assert figures.drift_alarm
    assert not drift_figures("m", many, {}, 100).drift_alarm  # no calibration: nothing to compare with


# ---------------------------------------------------------------------- the model lock


def test_read_write_lock_lets_readers_share_and_a_writer_wait_for_them():
    lock = ReadWriteLock()
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with lock.read():
            order.append("read")
            inside.set()
            release.wait(5)
        order.append("read done")

    def writer() -> None:
        with lock.write():
            order.append("write")

    r = threading.Thread(target=reader)
    r.start()
    inside.wait(5)
    with lock.read():  # a second reader gets in while the first holds it
        order.append("second read")
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.2)
    assert "write" not in order  # the writer waits for the reader
    release.set()
    r.join(5)
    w.join(5)
    assert order == ["read", "second read", "read done", "write"]


# ---------------------------------------------------------------------- watched folder


class _Scorer:
    """Decodes like the station does and counts what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, file, data: bytes) -> dict:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:
            raise SkipFile(f"not an image: {exc}") from exc
        with self.lock:
            self.seen.append((file.path.name, data))
        return {"width": image.width}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_file_written_slowly_in_pieces_is_scored_once_and_only_when_complete(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    scorer = _Scorer()
    watcher = FolderWatcher(folder, tmp_path / "results.jsonl", scorer, poll=0.05, settle=0.6)
    watcher.start()
    data = _png_bytes(1, 96)
    pieces = [data[i : i + len(data) // 5 + 1] for i in range(0, len(data), len(data) // 5 + 1)]
    try:
        # Another process writes the file in pieces (no open handle of ours, so only the size-stable
        # check can tell): 0.3 s between pieces.
        import subprocess
        import sys

        code = (
            "import sys, time\n"
            "pieces = [bytes.fromhex(p) for p in sys.argv[2:]]\n"
            "for p in pieces:\n"
            "    with open(sys.argv[1], 'ab') as f:\n"
            "        f.write(p)\n"
            "    time.sleep(0.3)\n"
        )
        subprocess.run([sys.executable, "-c", code, str(folder / "part.png"), *(p.hex() for p in pieces)],
                       check=True, timeout=60)  # fmt: skip
        deadline = time.monotonic() + 20
        while not scorer.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # more scans: nothing more may happen
        assert watcher.wait_idle(10)
    finally:
        watcher.stop()
    assert [(name, blob == data) for name, blob in scorer.seen] == [("part.png", True)]
    lines = _lines(tmp_path / "results.jsonl")
    assert len(lines) == 1 and lines[0]["event"] == "scored" and lines[0]["width"] == 96
    assert lines[0]["size"] == len(data)


def test_a_file_held_open_for_writing_is_not_taken_until_it_is_closed(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    path = folder / "open.png"
    handle = open(path, "wb")  # noqa: SIM115 - held open on purpose
    try:
        handle.write(_png_bytes(2)[:100])
        handle.flush()
        assert open_for_writing({path}) == {path}
        scorer = _Scorer()
        watcher = FolderWatcher(folder, tmp_path / "results.jsonl", scorer, poll=0.05, settle=0.0)
        assert watcher.scan() == []  # size stable, but a writer holds it
    finally:
        handle.close()
    assert open_for_writing({path}) == set()
    assert [f.path.name for f in watcher.scan()] == ["open.png"]


def test_non_images_are_reported_and_skipped_and_a_restart_scores_nothing_twice(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png_bytes(i))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(_png_bytes(9))
    (folder / "writing.png.part").write_bytes(_png_bytes(9))
    results = tmp_path / "results.jsonl"

    def run_once(scorer: _Scorer) -> None:
        watcher = FolderWatcher(folder, results, scorer, poll=0.05, settle=0.1)
        watcher.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.3)
                if watcher.wait_idle(5) and not watcher.scan():
                    break
        finally:
            watcher.stop()

    first = _Scorer()
    run_once(first)
    assert sorted(name for name, _ in first.seen) == ["0.png", "1.png", "2.png"]
    lines = _lines(results)
    skipped = {line["file"]: line["skipped"] for line in lines if line["event"] == "skipped"}
    assert set(skipped) == {"notes.txt", "empty.png"} and "not an image" in skipped["notes.txt"]
    assert len(lines) == 5

    second = _Scorer()
    (folder / "3.png").write_bytes(_png_bytes(3))  # arrived while the server was down
    time.sleep(0.01)
    (folder / "1.png").write_bytes(_png_bytes(11))  # rewritten under the same name: a new image
    run_once(second)
    assert sorted(name for name, _ in second.seen) == ["1.png", "3.png"]
    assert len(_lines(results)) == 7


def test_the_queue_is_bounded_and_files_beyond_it_wait_in_the_folder(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(_png_bytes(i))
    scorer = _Scorer()
    watcher = FolderWatcher(folder, tmp_path / "r.jsonl", scorer, poll=0.05, settle=0.0, queue_size=2)
    assert len(watcher.scan()) == 2 and watcher.pending == 2
    assert watcher.scan() == []  # full: nothing more is taken, nothing is lost
    while watcher.pending:
        watcher.process(watcher.queue.get_nowait())
        watcher._queued.clear()
    assert len(watcher.scan()) == 2
    while watcher.pending:
        watcher.process(watcher.queue.get_nowait())
        watcher._queued.clear()
    assert len(watcher.scan()) == 1
    watcher.process(watcher.queue.get_nowait())
    assert sorted(name for name, _ in scorer.seen) == [f"{i}.png" for i in range(5)]
