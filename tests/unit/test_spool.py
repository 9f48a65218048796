"""The spool file: writes through in large pieces, and its limits never raise into pynetdicom."""

from __future__ import annotations

import errno

from gateway.dimse.spool import Spooler, clean_spool


class FullDisk:
    """Stands in for the spool's file object on a disk that is full after ``room`` bytes."""

    def __init__(self, room: int):
        self.room, self.written, self.truncated = room, 0, False

    def write(self, data):
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return len(data)

    def truncate(self):
        self.truncated = True

    def close(self):
        pass


def test_spool_writes_through_and_names_itself(tmp_path):
    spooler = Spooler(tmp_path, max_bytes=1000, min_free_bytes=0)
    spool = spooler.open()
    spool.write(b"a" * 10)
    spool.file.flush()  # what pynetdicom calls per fragment: must not cost a syscall
    spool.write(b"b" * 10)
    spool.finish()
    spool.close()
    assert spool.problem is None and spool.size == 20
    assert open(spool.name, "rb").read() == b"a" * 10 + b"b" * 10
    assert spooler.take(spool.name) is spool and spooler.take(spool.name) is None


def test_spools_left_untaken_are_removed_when_the_connection_closes(tmp_path):
    spooler = Spooler(tmp_path, max_bytes=1000, min_free_bytes=0)
    spooler.open().write(b"x")
    spooler.open()
    spooler.discard_all()
    assert list(tmp_path.iterdir()) == [] and spooler.files == {}


def test_spool_refuses_more_than_max_instance_bytes_and_frees_the_space(tmp_path):
    spool = Spooler(tmp_path, max_bytes=100, min_free_bytes=0).open()
    for _ in range(5):
        assert spool.write(b"x" * 30) == 30  # never raises into pynetdicom's thread
    spool.finish()
    spool.close()
    assert "max_instance_bytes" in spool.problem
    assert open(spool.name, "rb").read() == b""


def test_spool_on_a_full_disk_records_the_problem_without_raising(tmp_path):
    spool = Spooler(tmp_path, max_bytes=10**9, min_free_bytes=0).open()
    disk = FullDisk(room=50)
    spool._sink.close()
    spool._sink = disk
    spool.write(b"x" * 40)
    spool.write(b"x" * 40)
    spool.write(b"x" * 40)
    spool.finish()  # the buffered bytes hit the full disk here
    assert spool.problem == "the disk is full" and disk.truncated


def test_spool_checks_the_free_space_floor_while_streaming(tmp_path):
    spool = Spooler(tmp_path, max_bytes=10**12, min_free_bytes=10**18).open()
    chunk = b"\0" * (1024 * 1024)
    for _ in range(70):  # the floor is checked every 64 MiB
        spool.write(chunk)
        if spool.problem:
            break
    spool.finish()
    spool.close()
    assert "min_free_bytes" in spool.problem


def test_clean_spool_removes_only_spool_files(tmp_path):
    for name in ("rx-ab12-1.dcm", "rx-ab12-2.dcm.placed", "keep.dcm", "rx-notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    clean_spool(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.dcm", "rx-notes.txt"]
