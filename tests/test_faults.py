"""Fault injection: data that changes under a running sampler, duplicates and link loops, a full
disk under the provenance log, a double Ctrl-C. Each case runs in a subprocess of its own
(``tests/faults.py``), so that a signal can end only that case; each asserts that the process
survives or stops with an error naming the cause and the file, that no patch is served from a file
that was broken when it was decoded, that each affected file is reported once, and that the
provenance log holds every delivered patch or the run raises."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dali_patches import PatchSampler

ROOT = Path(__file__).resolve().parents[1]


def _scenario(name: str, tmp_path: Path) -> tuple[int, dict]:
    # Nothing may hang: a case that does not end within the bound fails its test (TimeoutExpired).
    run = subprocess.run([sys.executable, "-m", "tests.faults", name, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, check=False)
    assert run.returncode in (0, 3), f"{name}: killed by a signal or crashed (rc {run.returncode}):\n{run.stderr[-3000:]}"
    return run.returncode, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["overwrite", "delete_half", "replace_smaller", "replace_bigger", "replace_text"])
def test_a_run_survives_files_changing_under_it(tmp_path: Path, name: str) -> None:
    rc, r = _scenario(name, tmp_path)
    assert rc == 0, r
    assert r["wrong"] == 0 and r["served"] > 0  # every patch is a crop of a file as it was when decoded intact
    assert r["distinct"] == 1.0
    broken = [file for file, _ in r["broken"]]
    assert set(broken) <= set(r["hit"]) and len(broken) == len(set(broken))  # only changed files, once each
    assert len(broken) >= len(r["hit"]) * 3 // 4  # the reader came back to most of them during the run
    assert all(count == 1 for count in r["reported"].values()) and set(r["reported"]) == set(broken)
    why = dict(r["broken"])
    if name in ("replace_smaller", "replace_bigger"):
        assert all("changed during the run: it decodes to" in reason for reason in why.values())
        assert r["changed"] == len(broken)
    if name == "delete_half":
        assert all("No such file" in reason for reason in why.values())


def test_a_deleted_folder_stops_the_run_with_the_cause_and_a_file(tmp_path: Path) -> None:
    rc, r = _scenario("delete_all", tmp_path)
    assert rc == 3 and r["error"] == "DecodeError"
    assert "still decode, fewer than the 8 distinct images a batch needs" in r["message"]
    assert "No such file or directory" in r["message"] and "img_0" in r["message"]


def test_duplicates_and_link_loops_are_merged_into_distinct_files(tmp_path: Path) -> None:
    rc, r = _scenario("duplicates", tmp_path)
    assert rc == 0, r
    assert r["files"] == 6 and len(r["merged"]) == 1  # 6 images, a hard link to one, a loop: 6 files
    assert r["twice_files"] == 6 and r["twice_distinct_batches"]
    assert "this shard has only 1 images" in r["one_file_six_times"]


def test_a_full_disk_under_the_provenance_log_stops_the_run(tmp_path: Path) -> None:
    rc, r = _scenario("full_disk", tmp_path)
    assert rc == 0, r
    assert r["error"] == "OSError" and "run.prov" in r["message"] and "free space" in r["message"]
    assert r["logged"] == r["delivered"] > 0  # every delivered patch is in the log, and nothing else


def test_two_ctrl_c_end_bench_quietly_with_exit_130(tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "dali_patches.cli", "synth", str(data), "--count", "24", "--size", "200x260",
                    "--no-progress"], check=True, capture_output=True)
    bench = subprocess.Popen([sys.executable, "-m", "dali_patches.cli", "bench", str(data), "--batch", "8", "--cache",
                              "32MiB", "--seconds", "60", "--no-progress", "--device", "cpu"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # sampling by now
    bench.send_signal(signal.SIGINT)
    time.sleep(0.3)
    bench.send_signal(signal.SIGINT)
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "dali-patches: interrupted"


def test_a_moved_data_set_resumes(tmp_path: Path, many_images: Path) -> None:
    settings = {"patch_size": 24, "batch_size": 8, "reuse": 2, "cache_bytes": "900KiB", "seed": 3, "device": "cpu"}
    first = tmp_path / "first"
    shutil.copytree(many_images, first, copy_function=shutil.copy2)  # keeps mtimes, as mv and rsync -a do
    with PatchSampler(first, **settings) as s:
        for _ in range(9):
            next(s)
        state = s.state_dict()
        expected = [(b.source.tolist(), b.anchor.tolist()) for b in (next(s) for _ in range(5))]
    moved = tmp_path / "elsewhere" / "data"
    moved.parent.mkdir()
    os.rename(first, moved)
    with PatchSampler(moved, **settings) as s:
        s.load_state_dict(state)
        assert [(b.source.tolist(), b.anchor.tolist()) for b in (next(s) for _ in range(5))] == expected


# -- from outside the data: object storage, FIFOs and devices, links (tests/faults_outside.py) -----------

def test_objects_deleted_or_replaced_in_object_storage_are_skipped_and_reported(tmp_path: Path) -> None:
    pytest.importorskip("moto.server", reason="the S3 test server needs moto[server]")
    rc, r = _scenario("s3_delete", tmp_path)
    assert rc == 0 and "error" not in r, r
    assert r["wrong"] == 0 and r["served"] == 800 and r["distinct"] == 1.0 and r["lost_batches"] == 0
    broken = [name for name, _ in r["broken"]]
    assert set(broken) <= set(r["hit"]) and len(broken) == len(set(broken)) and len(broken) >= len(r["hit"]) // 2
    assert all(count == 1 for count in r["reported"].values())


def test_an_object_store_that_stops_answering_for_seconds_is_waited_for(tmp_path: Path) -> None:
    pytest.importorskip("moto.server", reason="the S3 test server needs moto[server]")
    rc, r = _scenario("s3_blip", tmp_path)
    assert rc == 0 and "error" not in r, r
    assert r["served"] == 800 and r["wrong"] == 0 and r["broken"] == [] and r["lost_batches"] == 0


def test_an_object_store_that_stops_for_good_ends_the_run_naming_it(tmp_path: Path) -> None:
    pytest.importorskip("moto.server", reason="the S3 test server needs moto[server]")
    rc, r = _scenario("s3_down", tmp_path)
    assert rc == 0, r  # the scenario itself ends normally, with the error it caught
    assert r.get("error") == "DecodeError", r
    assert f"the object store at {r['endpoint']} has not answered for 6 s" in r["message"]
    assert "AWS_ENDPOINT_URL" in r["message"] and r["seconds"] < 60


def test_a_fifo_named_like_an_image_is_skipped_not_opened(tmp_path: Path) -> None:
    rc, r = _scenario("fifo_scan", tmp_path)
    assert rc == 0, r
    assert ["pipe.jpg", "not a regular file"] in r["skipped"] and r["wrong"] == 0 and r["served"] == 960


def test_a_file_replaced_by_a_fifo_during_the_run_is_unblocked_and_set_aside(tmp_path: Path) -> None:
    rc, r = _scenario("fifo_run", tmp_path)
    assert rc == 0, r
    assert r["served"] == 960 and r["wrong"] == 0 and r["lost_batches"] == 0 and r["seconds"] < 60
    assert r["broken"] == [[r["hit"], "became a FIFO (named pipe) during the run"]]
    assert r["reported"] == {r["hit"]: 1}


def test_files_turned_into_devices_lose_no_good_image_ten_times_over(tmp_path: Path) -> None:
    rc, r = _scenario("devices", tmp_path)
    assert rc == 0, r
    assert len(r["runs"]) == 10
    for run in r["runs"]:
        assert run["lost_batches"] == 0 and run["wrong"] == 0 and run["served"] == 480, run
        assert {name for name, _ in run["broken"]} <= set(run["hit"])


def test_a_link_to_the_root_inside_the_data_folder_is_skipped_not_walked(tmp_path: Path) -> None:
    rc, r = _scenario("link_to_root", tmp_path)
    assert rc == 0, r
    assert r["files"] == 8 and r["seconds"] < 10
    assert r["skipped"] == [["everything", "link loop"], ["up", "link loop"]]
