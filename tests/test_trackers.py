"""`run.report_to`: TensorBoard and W&B get metrics.jsonl's rows, one scalar per key per
step, none twice after a resume; W&B stays offline under out_dir; bad values are refused."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from rlhflab import io
from rlhflab.cli import overrides
from rlhflab.config import describe, load_config
from rlhflab.errors import ConfigError, InputError
from rlhflab.io import KILL_ENV, MetricsLog, read_metrics
from rlhflab.stages import sft

from tiny import demo_rows, gpt2_dir, make, tiny_tokenizer, write_jsonl


def need(module: str) -> None:
    """Skip without the tracker's package, except in CI (the test extra installs it)."""
    if not io.tracker_installed(module):
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (pip install -e '.[test]' installs it)")
        pytest.skip(f"{module} is not installed: pip install 'rlhflab[{module}]'")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("trackers")
    tok = tiny_tokenizer()
    return {
        "gpt2": gpt2_dir(d / "gpt2", tok),
        "demos": write_jsonl(d / "demos.jsonl", demo_rows(12)),
        "val": write_jsonl(d / "val.jsonl", demo_rows(16)[12:]),
    }


@pytest.fixture
def offline(monkeypatch):
    """No W&B mode or account from the environment; a server URL where nothing listens."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")


def config(world, out, **kw):
    # 12 demos in batches of 4: 3 steps per epoch, 6 in all, and an epoch row at steps 3 and 6.
    kw = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu", **kw}
    return make(
        sft.SFTConfig,
        base=str(world["gpt2"]),
        data=str(world["demos"]),
        val_data=str(world["val"]),
        out_dir=str(out),
        **kw,
    )


def first_scalars(rows: list[dict]) -> dict[str, dict[int, float]]:
    """What a tracker should hold: {key: {step: the first value a row gave it at that step}}."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(key, {}).setdefault(row["step"], value)
    return out


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_runs(out_dir, finished: int) -> list[tuple[str, bool, list[tuple[int, dict]]]]:
    """(run id, finished, [(step, {key: value})]) of each offline run piece in <out_dir>/wandb,
    in the order they were made, once `finished` of them hold their exit record: W&B's own
    process writes a finished run's file a moment after `finish()` returns."""
    deadline = time.monotonic() + 30
    while True:
        pieces = [
            (path.stem.removeprefix("run-"), wandb_records(path))
            for path in sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        ]
        done = [any(r.WhichOneof("record_type") == "exit" for r in records) for _, records in pieces]
        if sum(done) >= finished:
            break
        assert time.monotonic() < deadline, f"W&B finished {sum(done)} of {finished} runs"
        time.sleep(0.1)
    runs = []
    for (run_id, records), ended in zip(pieces, done):
        history = []
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.append((r.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
        runs.append((run_id, ended, history))
    return runs


def wandb_records(path) -> list:
    """The records of a .wandb file: a LevelDB-style log of protobuf records, a 7-byte file
    header, then in 32 KiB blocks records of (crc32, length, type) + data."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pb.Record.FromString(chunk))
            chunk = b""
    return records


def assert_tensorboard_holds(log_dir, rows: list[dict]) -> None:
    got, want = tensorboard_scalars(log_dir), first_scalars(rows)
    assert set(got) == set(want)
    for tag, events in got.items():
        steps = [step for step, _ in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step twice: {steps}"
        assert dict(events) == pytest.approx(want[tag], rel=1e-6), tag  # event values are float32


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_gets_every_row_one_scalar_per_key_per_step(world, tmp_path):
    need("tensorboard")
    sft.train(config(world, tmp_path / "run", report_to="tensorboard"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "sft/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "sft/val_loss" in r] == [3, 6]
    assert_tensorboard_holds(tmp_path / "run" / "tensorboard", rows)


# --------------------------------------------------------------------------- resume


def test_a_run_killed_after_its_epoch_row_resumes_with_no_step_twice(world, tmp_path, monkeypatch, offline):
    need("tensorboard")
    need("wandb")
    out = tmp_path / "run"
    cfg = config(world, out, save_every=3, report_to="tensorboard,wandb")
    # Killed right after the 4th row, epoch 1's evaluation at step 3: the checkpoint saved at
    # step 3 holds 3 rows, so the resumed run logs that evaluation row again. Every tracker
    # had it already; neither may hold it twice.
    real, calls = io.kill_point, []

    def kill_at_fourth_row(label):
        calls.append(label)
        if calls.count("metrics") == 4:
            raise KeyboardInterrupt
        real(label)

    monkeypatch.setattr(io, "kill_point", kill_at_fourth_row)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg)
    monkeypatch.setattr(io, "kill_point", real)
    run_id = json.loads((out / "wandb" / "rlhflab-run.json").read_text())["id"]
    sft.train(cfg)

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6, 6]
    assert_tensorboard_holds(out / "tensorboard", rows)

    runs = wandb_runs(out, finished=2)
    assert [(rid, ended) for rid, ended, _ in runs] == [(run_id, True)] * 2  # one run, in two pieces
    history = [row for _, _, piece in runs for row in piece]
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]  # step 3 and its evaluation: before the kill only
    got = {key: {} for key in first_scalars(rows)}
    for step, scalars in history:
        for key, value in scalars.items():
            got[key][step] = value
    assert got == first_scalars(rows)  # JSON both ways: exact


# --------------------------------------------------------------------------- W&B


def test_wandb_is_offline_under_out_dir_unless_wandb_mode_says_otherwise(tmp_path, monkeypatch, offline):
    need("wandb")
    log = MetricsLog(tmp_path / "a" / "metrics.jsonl", report_to=["wandb"])
    for step in (1, 2, 2):
        log.log({"step": step, "loss": 1.0 / step, "note": "text is not a scalar"})
    log.close()
    log.close()  # twice is harmless
    runs = list((tmp_path / "a" / "wandb").glob("*run-*"))
    assert [p.name.split("-")[0] for p in runs] == ["offline"]  # nothing went to a server
    [(_, _, history)] = wandb_runs(tmp_path / "a", finished=1)
    assert history == [(1, {"loss": 1.0}), (2, {"loss": 0.5})]
    assert "WANDB_MODE" not in os.environ

    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = MetricsLog(tmp_path / "b" / "metrics.jsonl", report_to="wandb")
    log.log({"step": 1, "loss": 1.0})
    log.close()
    assert not list((tmp_path / "b" / "wandb").glob("*run-*"))
    assert read_metrics(tmp_path / "b" / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]  # the record stays


def test_after_a_kill_9_an_offline_wandb_run_is_started_again_with_every_kept_row(tmp_path, offline):
    need("wandb")
    path = tmp_path / "metrics.jsonl"
    log_three = (
        "import sys; from rlhflab.io import MetricsLog\n"
        "log = MetricsLog(sys.argv[1], report_to='wandb')\n"
        "for step in (1, 2, 3): log.log({'step': step, 'loss': 1.0 / step})\n"
    )
    env = {**os.environ, KILL_ENV: "metrics:3"}  # SIGKILL right after the third row
    killed = subprocess.run([sys.executable, "-c", log_three, str(path)], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = json.loads((tmp_path / "wandb" / "rlhflab-run.json").read_text())
    assert first["last_step"] is None  # it never finished: what W&B holds of it is unknown

    log = MetricsLog(path, truncate_after_step=2, report_to="wandb")  # resumed at step 2's checkpoint
    log.log({"step": 3, "loss": 1 / 3})
    log.log({"step": 4, "loss": 0.25})
    log.close()
    runs = {run_id: (ended, history) for run_id, ended, history in wandb_runs(tmp_path, finished=1)}
    assert len(runs) == 2 and not runs.pop(first["id"])[0]  # the killed piece never ended
    [(new_id, (ended, history))] = runs.items()  # a new run, so no step can be in it twice
    assert ended and history == [(1, {"loss": 1.0}), (2, {"loss": 0.5}), (3, {"loss": 1 / 3}), (4, {"loss": 0.25})]
    assert json.loads((tmp_path / "wandb" / "rlhflab-run.json").read_text()) == {"id": new_id, "last_step": 4}


# --------------------------------------------------------------------------- the config field


def test_report_to_is_read_from_the_command_line_and_checked(tmp_path, monkeypatch):
    need("tensorboard")
    need("wandb")
    base = {"base": "m", "data": "d.jsonl"}
    cfg = load_config(sft.SFTConfig, overrides=overrides(["--run.report_to", "tensorboard"]), base=base)
    assert io.tracker_names(cfg.run.report_to) == ["tensorboard"]
    cfg = load_config(sft.SFTConfig, overrides=["run.report_to=wandb,tensorboard"], base=base)
    assert io.tracker_names(cfg.run.report_to) == ["wandb", "tensorboard"]
    cfg = load_config(sft.SFTConfig, overrides=["run.report_to=[wandb]"], base=base)
    assert io.tracker_names(cfg.run.report_to) == ["wandb"]
    assert io.tracker_names(load_config(sft.SFTConfig, base=base).run.report_to) == []  # 'none'
    assert any(line.startswith("  run.report_to = 'none'") for line in describe(sft.SFTConfig))

    with pytest.raises(ConfigError, match="tensorboard, wandb") as e:
        load_config(sft.SFTConfig, overrides=["run.report_to=tensorboard,mlflow"], base=base)
    assert e.value.field == "run.report_to"
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'rlhflab\[wandb\]'") as e:
        load_config(sft.SFTConfig, overrides=["run.report_to=wandb"], base=base)
    assert e.value.field == "run.report_to" and "\n" not in str(e.value)
    with pytest.raises(InputError, match="unknown tracker 'mlflow'"):
        MetricsLog(tmp_path / "metrics.jsonl", report_to="mlflow")  # a config built without validate()
    assert not list(tmp_path.iterdir())  # refused before anything was written
