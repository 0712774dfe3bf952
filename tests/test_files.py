"""The shared infrastructure: atomic writer, file hash, PNG record chunk, signal helper."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import threading
from pathlib import Path

import pytest
from PIL import Image

from cmlora.files import atomic_write_bytes, atomic_write_text, sha256_file
from cmlora.records import RECORD_CHUNK, png_bytes, png_record_text, read_record
from cmlora.signals import InterruptOnSignals, sigterm_as_interrupt


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_whole_file_with_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    old = os.umask(0o027)
    try:
        atomic_write_text(target, "first")
        atomic_write_bytes(target, b"second")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"second"
    assert _mode(target) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]  # fails inside the write

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C between fsync and rename

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_tmp_prefix_names_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(Path(src).name)
        original(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(tmp_path / "a.png", b"x", tmp_prefix=".tmp-r3-", sync_dir=False)
    atomic_write_bytes(tmp_path / "b.json", b"x")
    (prefixed, plain) = seen
    # The owner finds its leftovers by prefix; the target's suffix is kept.
    assert prefixed.startswith(".tmp-r3-") and prefixed.endswith("-a.png")
    assert plain.startswith(".b.json.") and plain.endswith(".tmp")


def test_sha256_file_streams(tmp_path: Path) -> None:
    payload = os.urandom((1 << 20) + 123)  # more than one read chunk
    path = tmp_path / "blob"
    path.write_bytes(payload)
    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()


def test_png_record_chunk_round_trip(tmp_path: Path) -> None:
    image = Image.new("RGB", (5, 3), (10, 20, 30))
    record = {"seed": 7, "prompt": "ü", "nan": float("nan")}
    data = png_bytes(image, record)
    assert json.loads(png_record_text(io.BytesIO(data)))["seed"] == 7
    path = tmp_path / "img.png"
    path.write_bytes(data)
    assert read_record(path)["nan"] == "nan"  # strict JSON: NaN is written as a string
    # Pinned text goes in verbatim; no text and no record: a PNG without the chunk.
    assert png_record_text(io.BytesIO(png_bytes(image, text='{"a":1}'))) == '{"a":1}'
    with Image.open(io.BytesIO(png_bytes(image))) as plain:
        assert RECORD_CHUNK not in plain.info
    with pytest.raises(ValueError):
        png_bytes(image, record, text="{}")


def test_interrupt_on_signals_raises_defers_and_restores() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt() as guard:
        assert guard.active
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt), guard.deferred():
            signal.raise_signal(signal.SIGTERM)
            reached = True  # held off until the block ends
        assert reached
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupt_on_signals_is_inert_outside_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    result: list[bool] = []

    def worker() -> None:
        with InterruptOnSignals((signal.SIGINT, signal.SIGTERM)) as guard:
            result.append(guard.active)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result == [False]
    assert signal.getsignal(signal.SIGTERM) is before
