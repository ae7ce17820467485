"""What `kd cache build` reads back to resume (progress journals, done files, the saved configuration) is checked as
untrusted input: a malformed file is one error naming the file and the field (exit 2), a torn last journal line (a
crash mid-append) is ignored and logged, a recorded shard that is lost is rebuilt."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from typer.testing import CliRunner

from kd_cache import format as fmt
from kd_cache import open_cache
from kd_cache.format import ProgressFileError
from kd_cache.manifest import parse_done
from kd_cache.verify import verify
from kd_cache.writer import parse_journal
from kd_cli.main import app

JOURNAL = f"{fmt.PROGRESS_DIR}/rank-00000-of-00001.jsonl"
DONE = f"{fmt.PROGRESS_DIR}/rank-00000-of-00001.done.json"
SHA = "ab" * 32


def entry(start, end, shard=True, **kw):
    e = {"start": start, "end": end, "skipped": [], "shard": None}
    if shard:
        e.update(shard=f"shards/shard-r00000-of-00001-{start:06d}.parquet", rows=end - start, bytes=100, sha256=SHA,
                 text_rows=3, visual_rows=0, gram_samples=0, write_seconds=0.1)
    return {**e, **kw}


def text(*entries) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in entries)


def test_a_clean_journal_parses_and_a_torn_last_line_is_ignored_and_logged(caplog):
    clean = text(entry(0, 5), entry(5, 10))
    assert [e["end"] for e in parse_journal(clean, "j")] == [5, 10]
    for tail in (b'{"start": 10, "end": 1', b"\x00" * 40, b'{"start"\n', b"\xff\xfe"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kd_cache"):
            assert [e["end"] for e in parse_journal(clean + tail, "j.jsonl")] == [5, 10]
        assert "j.jsonl: ignored 1 torn line at its end (line 3" in caplog.text
    assert parse_journal(b"", "j") == [] and parse_journal(b"\x00\x00", "j") == []
    # a whole last entry without its newline (cut just before it) is kept
    assert len(parse_journal(clean.rstrip(b"\n"), "j")) == 2


def test_a_damaged_line_before_the_last_is_an_error_naming_the_file_and_line():
    with pytest.raises(ProgressFileError, match=r"j\.jsonl line 1: not a JSON entry .*delete it to rebuild"):
        parse_journal(b'{"start": 0, "e\n' + text(entry(0, 5)), "j.jsonl")


@pytest.mark.parametrize("bad, match", [
    (dict(start=-1), "line 1: start must be an integer >= 0, got -1"),
    (dict(start=True), "start must be an integer >= 0, got True"),
    (dict(end="5"), "end must be an integer >= 0, got '5'"),
    (dict(end=0), "end must be > start"),
    (dict(end=99, rows=99), "end 99 is past this rank's 12 samples"),
    (dict(rows=4), r"rows \(4\) \+ skipped \(0\) must equal end - start \(5\)"),
    (dict(rows=1.5), "rows must be an integer >= 0, got 1.5"),
    (dict(bytes=None), "bytes must be an integer >= 0, got None"),
    (dict(sha256="xyz"), "sha256 must be 64 hexadecimal characters"),
    (dict(skipped="x"), "skipped must be a list"),
    (dict(skipped=[{"index": 3, "sample_id": "a", "reason": "r"}], rows=4), None),
    (dict(skipped=[{"index": 7, "sample_id": "a", "reason": "r"}], rows=4),
     r"skipped\[0\].index 7 is not one of this rank's samples 0-4"),
    (dict(skipped=[{"index": 3, "sample_id": 1, "reason": "r"}], rows=4), r"skipped\[0\].sample_id must be a string"),
    (dict(shard="../manifest.json"), "shard '../manifest.json' is not a relative path inside the cache"),
    (dict(shard="shards/../../x.parquet"), "is not a relative path inside the cache"),
    (dict(shard="s3://bucket/x.parquet"), "holds a character outside"),
    (dict(shard="/etc/passwd"), "holds a character outside|is not a relative path"),
    (dict(shard="build_config.json"), r"must be a shards/\*\.parquet file"),
    (dict(shard=5), "shard must be a non-empty string, got 5"),
])
def test_a_malformed_entry_names_the_file_line_and_field(bad, match):
    data = text({**entry(0, 5), **bad}, entry(5, 10))
    if match is None:
        assert len(parse_journal(data, "j.jsonl", rank=0, world_size=1, n_local=12)) == 2
        return
    with pytest.raises(ProgressFileError, match=match) as e:
        parse_journal(data, "j.jsonl", rank=0, world_size=1, n_local=12)
    assert str(e.value).startswith("j.jsonl line 1: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("entries, match", [
    ((entry(0, 5), entry(0, 5)), "line 2: start is 0, but the entry before ends at 5"),  # a duplicated line
    ((entry(5, 10),), "line 1: start is 5, but the entry before ends at 0"),  # a lost first line
    ((entry(0, 5), {**entry(5, 10), "shard": entry(0, 5)["shard"]}), "is recorded twice"),
    ((entry(0, 5), [1, 2]), "line 2: an entry must be a JSON object, got list"),
])
def test_entries_must_follow_each_other_each_shard_once(entries, match):
    with pytest.raises(ProgressFileError, match=match):
        parse_journal(text(*entries), "j.jsonl")


def test_an_entry_without_a_shard_holds_only_skips():
    skips = [{"index": i, "sample_id": f"s{i}", "reason": "missing image", "detail": ""} for i in range(5)]
    assert parse_journal(text(entry(0, 5, shard=False, skipped=skips)), "j", rank=0, world_size=1)[0]["shard"] is None
    with pytest.raises(ProgressFileError, match=r"rows \(0\) \+ skipped \(0\)"):
        parse_journal(text(entry(0, 5, shard=False)), "j")


def done(**kw) -> bytes:
    d = {"rank": 0, "samples_this_run": 12, "wall_seconds": 1.5, "finished_at": "2026-01-01T00:00:00Z",
         "header": {"teacher": {}}}
    return json.dumps({**d, **kw}).encode()


@pytest.mark.parametrize("data, match", [
    (done(), None),
    (done(header=None), None),  # a done file of an older kd
    (b"{", "not valid JSON"),
    (b"\xff", "not valid JSON"),
    (b"[]", "must be a JSON object, got list"),
    (done(rank=1), "rank must be 0, got 1"),
    (done(rank=True), "rank must be 0, got True"),
    (done(wall_seconds="1"), "wall_seconds must be a number >= 0"),
    (done(wall_seconds=float("nan")), "wall_seconds must be a number >= 0"),
    (done(samples_this_run=-1), "samples_this_run must be an integer >= 0"),
    (done(finished_at=3), "finished_at must be a string"),
    (done(header=[]), "header must be a JSON object, got list"),
])
def test_done_files_are_checked(data, match):
    if match is None:
        assert parse_done(data, 0, "d.json")["rank"] == 0
        return
    with pytest.raises(ProgressFileError, match=match) as e:
        parse_done(data, 0, "d.json")
    assert str(e.value).startswith("d.json: ") and "delete it and rerun the build" in str(e.value)


# ---------------------------------------------------------------------------------------------- `kd cache build`
@pytest.fixture
def interrupted(tmp_path, llava_cache):
    """The tiny cache as a build interrupted before it finalized: every shard, journal and done file, no manifest."""
    out = tmp_path / "cache"
    shutil.copytree(llava_cache, out)
    (out / fmt.MANIFEST_NAME).unlink()
    (out / fmt.CARD_NAME).unlink()
    return out


def build(out, llava_teacher, tiny_data):
    data, images = tiny_data
    logging.root.handlers.clear()  # the command configures logging on this invocation's stream
    try:
        return CliRunner().invoke(app, ["cache", "build", "--teacher", str(llava_teacher), "--data", str(data),
                                        "--images", str(images), "--out", str(out), "--batch-size", "3",
                                        "--shard-size", "5", "--quiet"])
    finally:
        logging.root.handlers.clear()


def error_line(r) -> str:
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.output
    return lines[0]


def test_resume_finalizes_from_checked_files_and_refuses_damaged_ones(interrupted, llava_cache, llava_teacher,
                                                                       tiny_data):
    journal = interrupted / JOURNAL
    clean = journal.read_bytes()
    lines = clean.splitlines(keepends=True)
    # a damaged entry before the last: refused, naming the file, the line and the field
    e = json.loads(lines[1])
    e["bytes"] = "many"
    journal.write_bytes(lines[0] + json.dumps(e).encode() + b"\n" + lines[2])
    line = error_line(build(interrupted, llava_teacher, tiny_data))
    assert f"{journal} line 2: bytes must be an integer >= 0, got 'many'" in line
    # a damaged done file: refused, naming it
    journal.write_bytes(clean)
    good_done = (interrupted / DONE).read_bytes()
    (interrupted / DONE).write_bytes(good_done.replace(b'"rank": 0', b'"rank": "0"'))
    assert f"{interrupted / DONE}: rank must be 0, got '0'" in error_line(build(interrupted, llava_teacher, tiny_data))
    # a damaged saved configuration: refused, naming it
    (interrupted / DONE).write_bytes(good_done)
    good_config = (interrupted / fmt.CONFIG_NAME).read_bytes()
    (interrupted / fmt.CONFIG_NAME).write_bytes(good_config[:-20])
    assert f"{interrupted / fmt.CONFIG_NAME}: not valid JSON" in error_line(build(interrupted, llava_teacher,
                                                                                   tiny_data))
    # restored, with a torn line after the last entry (a crash mid-append): finalized, the same cache
    (interrupted / fmt.CONFIG_NAME).write_bytes(good_config)
    journal.write_bytes(clean + lines[0][:30])
    r = build(interrupted, llava_teacher, tiny_data)
    assert r.exit_code == 0 and "ignored 1 torn line" in r.output, r.output
    assert journal.read_bytes() == clean  # rewritten without the torn line
    assert verify(str(interrupted)) == []
    assert (interrupted / fmt.MANIFEST_NAME).read_bytes() == (llava_cache / fmt.MANIFEST_NAME).read_bytes()


def test_a_lost_recorded_shard_is_rebuilt_not_an_endless_missing_shard_error(interrupted, llava_cache, llava_teacher,
                                                                            tiny_data):
    """Before: the journal's resume point stayed after the lost shard, and every rerun failed on it at finalize."""
    entries = [json.loads(line) for line in (interrupted / JOURNAL).read_text().splitlines()]
    (interrupted / entries[1]["shard"]).unlink()
    r = build(interrupted, llava_teacher, tiny_data)
    assert r.exit_code == 0, r.output
    assert "missing or of another size; resuming before it (1 of 3 entries kept)" in r.output
    assert verify(str(interrupted)) == []
    clean = {s["sample_index"]: s for s in open_cache(str(llava_cache))}
    rebuilt = list(open_cache(str(interrupted)))
    assert sorted(s["sample_index"] for s in rebuilt) == sorted(clean)
    for s in rebuilt:
        assert all((s[k] == clean[s["sample_index"]][k]).all() if hasattr(s[k], "shape") else s[k] ==
                   clean[s["sample_index"]][k] for k in s)


def test_a_damaged_header_in_a_done_file_is_named_and_deleting_the_done_file_recovers(interrupted, llava_teacher,
                                                                                      tiny_data):
    d = json.loads((interrupted / DONE).read_text())
    d["header"]["targets"]["text"] = "topk"
    (interrupted / DONE).write_text(json.dumps(d))
    line = error_line(build(interrupted, llava_teacher, tiny_data))
    assert "targets.text must be a JSON object" in line and "delete the done files and rerun the build" in line
    (interrupted / DONE).unlink()
    assert build(interrupted, llava_teacher, tiny_data).exit_code == 0
    assert verify(str(interrupted)) == []
